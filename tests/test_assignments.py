"""The course assignment (assignments/): the starter that release.py writes has every task function
stubbed, keeps their signatures and docstrings, holds no line of a solution, and fails every grader;
the graders pass on the finished method. Both grader runs go side by side, one subprocess each."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = [f"task{n}" for n in range(1, 6)]
GRADE = re.compile(r"^\s*(task\d)\s+\d+ pts\s+(\d+)/(\d+)\s+passed", re.M)


def _release_module():
    spec = importlib.util.spec_from_file_location("release", ROOT / "assignments" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = _release_module()


def _grades(output: str) -> dict[str, tuple[int, int]]:
    """task -> (passed, tests), from the grade table the graders' conftest prints."""
    return {task: (int(passed), int(total)) for task, passed, total in GRADE.findall(output)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The starter (written by release.py's command line) and one grader run on it and one on the project."""
    starter = tmp_path_factory.mktemp("assignment") / "starter"
    made = subprocess.run(
        [sys.executable, "assignments/release.py", "--out", str(starter)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    grade = [
        sys.executable,
        "-m",
        "pytest",
        "assignments",
        "-q",
        "-p",
        "no:cacheprovider",
        "--tb=line",
    ]
    procs = {
        where: subprocess.Popen(
            grade, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for where, cwd in (("starter", starter), ("reference", ROOT))
    }
    done = {where: (p.communicate(timeout=600)[0], p.returncode) for where, p in procs.items()}
    return starter, done


def test_the_graders_pass_on_the_finished_method(runs):
    out, rc = runs[1]["reference"]
    grades = _grades(out)
    assert rc == 0 and sorted(grades) == TASKS, out[-3000:]
    assert all(passed == total > 0 for passed, total in grades.values()), grades


def test_every_grader_of_every_task_fails_in_the_starter(runs):
    out, rc = runs[1]["starter"]
    grades, reference = _grades(out), _grades(runs[1]["reference"][0])
    assert rc == 1 and sorted(grades) == TASKS, out[-3000:]
    for task, (passed, total) in grades.items():
        assert passed == 0 and total == reference[task][1], (
            f"{task}: {passed} of {total} graders pass on the stubs"
        )
    assert "NotImplementedError: Task 1:" in out


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return dict(release.functions(ast.parse(path.read_text())))


def _body_lines(path: Path, node: ast.FunctionDef) -> list[str]:
    lines = path.read_text().splitlines()
    first = 1 if ast.get_docstring(node) is not None else 0
    return lines[node.body[first].lineno - 1 : node.end_lineno] if len(node.body) > first else []


def test_the_starter_keeps_signatures_and_docstrings_and_stubs_the_bodies(runs):
    starter = runs[0]
    assert sum(map(len, release.TASKS.values())) >= 11
    for name, table in release.TASKS.items():
        ours, theirs = _functions(ROOT / name), _functions(starter / name)
        for fn, (task, _) in table.items():
            a, b = ours[fn], theirs[fn]
            assert ast.dump(a.args) == ast.dump(b.args) and ast.dump(
                a.returns or ast.Pass()
            ) == ast.dump(b.returns or ast.Pass())
            assert [ast.dump(d) for d in a.decorator_list] == [
                ast.dump(d) for d in b.decorator_list
            ], fn
            assert ast.get_docstring(a) is None or ast.get_docstring(a) == ast.get_docstring(b), fn
            body = b.body[1:] if ast.get_docstring(b) is not None else b.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{name}: {fn} is not stubbed"
            message = body[0].exc.args[0].value
            assert body[0].exc.func.id == "NotImplementedError" and message.startswith(
                f"Task {task}: "
            ), message
    assert (
        not (starter / "tests").exists()
        and "testpaths = assignments" in (starter / "pytest.ini").read_text()
    )


def test_no_line_of_a_solution_survives_in_the_starter(runs):
    starter = runs[0]
    text = "\n".join(
        release.code(line) for p in starter.rglob("*.py") for line in p.read_text().splitlines()
    )
    checked = 0
    for name, table in release.TASKS.items():
        for fn, node in _functions(ROOT / name).items():
            if fn in table:
                for line in map(release.code, _body_lines(ROOT / name, node)):
                    if len(line) >= 12 and line not in release.IDIOMS:
                        checked += 1
                        assert line not in text, f"{name}: {fn}: {line!r} survives in the starter"
    assert checked > 60


def test_the_leak_check_finds_a_surviving_line(tmp_path):
    (tmp_path / "copy.py").write_text("def f(x):\n    return x.clamp(min=0.0)  # copied\n")
    assert release.leaks(tmp_path, ["    return x.clamp(min=0.0)\n", "    return x\n"]) == [
        "return x.clamp(min=0.0)"
    ]


def test_release_refuses_an_existing_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run(
        [sys.executable, str(ROOT / "assignments" / "release.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r
    assert "not an empty folder" in r.stderr and [p.name for p in tmp_path.iterdir()] == [
        "notes.txt"
    ]
