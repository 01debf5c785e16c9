"""Every file is formatted by ruff (line length 100) and passes its linter (pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", *args, str(ROOT)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_every_file_is_formatted():
    result = ruff("format", "--check", "--diff")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout[-3000:]


def test_every_file_passes_the_linter():
    result = ruff("check")
    assert result.returncode == 0, "run `ruff check .`:\n" + result.stdout[-3000:]
