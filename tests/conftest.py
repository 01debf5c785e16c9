"""Shared test fixtures: a small random TinyVLM (fast), records of the shipped sample, and the
README's two long jobs run as commands beside the other tests."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import data
import models
import world

torch.set_num_threads(1)  # one per test process: more than the idle cores makes torch wait

TINY = models.TinyConfig(vision_layers=1, layers=2, hidden=32, ffn=64, vision_width=32)
ROOT = Path(__file__).resolve().parent.parent
README_JOBS = {  # name -> the README command's options (each also gets --out)
    "main": ["--no-progress"],
    "sequential": ["--protocol", "sequential", "--no-progress"],
}
_jobs = {}  # name -> (process, its --out); started once the tests that need them are collected


@pytest.fixture(scope="module")
def tiny():
    """A random TinyVLM small enough for many edits per test (seeded; fresh per test module)."""
    torch.manual_seed(0)
    return models.TinyVLM(TINY, models.build_tokenizer(world.vocabulary())).eval()


@pytest.fixture(scope="module")
def records():
    return data.load_sample(limit=6)


def pytest_collection_finish(session):
    """Start the README's jobs (each ~40 s of one core) as soon as a test that reads them is
    collected: they run while the other tests do, instead of one after the other."""
    if not any("readme_jobs" in item.fixturenames for item in session.items):
        return
    where = Path(tempfile.mkdtemp(prefix="readme-jobs-"))
    for name, options in README_JOBS.items():
        out = where / f"{name}.json"
        command = [sys.executable, "evaluate.py", *options, "--out", str(out)]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _jobs[name] = (subprocess.Popen(command, cwd=ROOT, **pipes), out)


def pytest_sessionfinish(session):
    for process, out in _jobs.values():
        process.kill()  # a no-op once it has finished
        process.wait()
        shutil.rmtree(out.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def readme_jobs():
    """name -> (the job's output, its JSON's "methods"), once both have finished."""
    done = {}
    for name, (process, out) in _jobs.items():
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, output[-3000:]
        done[name] = (output, json.loads(out.read_text())["methods"])
    return done
