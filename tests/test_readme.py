"""The README is the front door: its Python example must run, its commands must parse, its
set-up/test commands must be what CI runs, its file map must say what each module says of itself,
and its results table must be what `python evaluate.py` measures (and tell the paper's story)."""

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

import bench
import data
import evaluate
import models
import study

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PARSERS = {
    "evaluate.py": evaluate.parse_args,
    "data.py": lambda argv: data.build_parser().parse_args(argv),
    "models.py": lambda argv: models.build_parser().parse_args(argv),
    "bench.py": lambda argv: bench.build_parser().parse_args(argv),
    "study.py": study.parse_args,
}


def _commands():
    """Every `python X.py ...` line of the README's bash blocks (continuations joined)."""
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("python ") and line.split()[1] in PARSERS:
                yield line


def test_readme_opens_with_a_python_example_that_runs():
    """Load TinyVLM and a record, edit, generate before and after, remove: the example's asserts."""
    example = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    assert README.index("```python") < README.index("```bash")  # the first thing a reader sees
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["before"] == [namespace["record"].answer] != [namespace["record"].target]
    assert namespace["report"].d_pos < namespace["report"].radius < namespace["report"].d_neg


def test_readme_commands_parse():
    commands = list(_commands())
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line)[2:]
        PARSERS[shlex.split(line)[1]](argv)  # exits (fails) on a bad option


def test_readme_file_map_says_what_each_module_says_first():
    """Every top-level module is in the file map, beside its docstring's opening sentence."""
    files = README.split("\n## Files\n")[1].split("\n## ")[0]
    said = dict(re.findall(r"^\| `(\w+\.py)` \| (.+?) \|$", files, flags=re.M))
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert sorted(said) == modules
    for name in modules:
        doc = ast.get_docstring(ast.parse((ROOT / name).read_text()))
        first = " ".join(doc.split("\n\n")[0].split())  # the opening paragraph, one line
        assert said[name] == first, name


def test_readme_setup_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("pip install -r requirements.txt", "python -m pytest"):
        assert command in README and command in ci


def _table(text, first):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0] in first:
            rows[cells[0]] = [float(c) if c not in ("-",) else None for c in cells[1:]]
    return rows


def test_readme_results_are_what_the_main_job_measures(tmp_path, capsys):
    """`python evaluate.py` (~30 s): the README's table, and the paper's story."""
    assert evaluate.main(["--no-progress", "--out", str(tmp_path / "main.json")]) == 0
    result = json.loads((tmp_path / "main.json").read_text())["methods"]
    readme = _table(README, ("base", "ft", "grace", "balancedit"))
    assert set(readme) == {"base", "ft", "grace", "balancedit"}
    for method, row in readme.items():
        measured = [result[method][k] for k in evaluate.COLUMNS]
        assert row[:11] == pytest.approx(measured, abs=0.006), method  # to the printed digit
    be = result["balancedit"]
    ft = result["ft"]
    grace = result["grace"]
    assert be["acc"] == 100.0
    assert be["hm"] > ft["hm"] and be["hm"] > grace["hm"]
    assert ft["loc"] < be["loc"] - 20 and grace["i_gen"] < be["i_gen"]
