"""The course assignment (assignments/): the starter that release.py writes has every task
function stubbed, keeps their signatures and docstrings, holds no statement of a solution, and
fails every grader; the graders pass on the finished method. Both grader runs go side by side, one
subprocess each."""

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = [f"task{n}" for n in range(1, 7)]
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
    """The starter (written by release.py's command line), and one grader run on it and one on
    the project."""
    starter = tmp_path_factory.mktemp("assignment") / "starter"
    made = subprocess.run(
        [sys.executable, "assignments/release.py", "--out", str(starter)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    # The starter as a student runs it (its own pytest.ini); the project's graders alike.
    as_student = [sys.executable, "-m", "pytest"]
    grade = [sys.executable, "-m", "pytest", "assignments", "-q", "-p", "no:cacheprovider"]
    grade += ["--tb=no", "-rN"]
    procs = {
        where: subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for where, command, cwd in (
            ("starter", as_student, starter),
            ("reference", grade, ROOT),
        )
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
    grades = _grades(out)
    reference = _grades(runs[1]["reference"][0])
    assert rc == 1 and sorted(grades) == TASKS, out[-3000:]
    for task, (passed, total) in grades.items():
        assert passed == 0 and total == reference[task][1], (
            f"{task}: {passed} of {total} graders pass on the stubs"
        )
    assert "NotImplementedError: Task 1:" in out


def test_the_starter_prints_what_failed_and_the_grades_not_tracebacks(runs):
    out = runs[1]["starter"][0]
    lines = out.strip().splitlines()
    assert "Traceback" not in out and "Falsifying example" not in out, out[:3000]
    assert len(lines) < 200, f"{len(lines)} lines:\n" + "\n".join(lines[:60])
    listed = out.split("What failed, and why")[1].split("\nGrades (")[0]
    for task in TASKS:
        assert f"\n{task} test_" in listed, task
    # The grade table comes last, then only pytest's count.
    assert lines[-2].startswith("  total  0.0 / 85") and " failed in " in lines[-1], lines[-3:]


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return dict(release.functions(ast.parse(path.read_text())))


def test_the_starter_keeps_signatures_and_docstrings_and_stubs_the_bodies(runs):
    starter = runs[0]
    assert sum(map(len, release.TASKS.values())) >= 11
    for name, table in release.TASKS.items():
        ours = _functions(ROOT / name)
        theirs = _functions(starter / name)
        for fn, (task, _) in table.items():
            a = ours[fn]
            b = theirs[fn]
            assert ast.dump(a.args) == ast.dump(b.args), fn
            assert ast.dump(a.returns or ast.Pass()) == ast.dump(b.returns or ast.Pass()), fn
            decorators = [ast.dump(d) for d in a.decorator_list]
            assert decorators == [ast.dump(d) for d in b.decorator_list], fn
            doc = ast.get_docstring(a)
            assert doc is None or doc == ast.get_docstring(b), fn
            body = b.body[1:] if ast.get_docstring(b) is not None else b.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{name}: {fn} is not stubbed"
            assert body[0].exc.func.id == "NotImplementedError", fn
            message = body[0].exc.args[0].value
            assert message.startswith(f"Task {task}: "), message
    assert not (starter / "tests").exists()
    assert "testpaths = assignments" in (starter / "pytest.ini").read_text()


def test_the_starter_and_the_handout_carry_no_teacher_material(runs):
    """The teachers' notes and release.py stay with the project; study.py, whose editor restates
    the probe of Task 5, too. The handout speaks to students only."""
    starter = runs[0]
    for gone in ["assignments/TEACHERS.md", "assignments/release.py", "study.py"]:
        assert (ROOT / gone).exists() and not (starter / gone).exists(), gone
    handout = (starter / "assignments" / "README.md").read_text()
    for word in ["For teachers", "release.py", "mutants", "tests/", "TEACHERS"]:
        assert word not in handout, word
    assert "python assignments/release.py --out" in (ROOT / "assignments/TEACHERS.md").read_text()


def _simple_statements(tree: ast.AST) -> list[ast.stmt]:
    """The statements in ``tree`` that hold no other statement (compared here by ast.dump, apart
    from release.py's own ast.unparse)."""
    compound = (ast.FunctionDef, ast.ClassDef, ast.If, ast.For, ast.While, ast.With, ast.Try)
    return [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and not isinstance(n, compound)]


def test_no_statement_of_a_solution_survives_in_the_starter(runs):
    starter = runs[0]
    kept = set()
    for path in starter.rglob("*.py"):
        kept |= {ast.dump(n) for n in _simple_statements(ast.parse(path.read_text()))}
    checked = 0
    for name, table in release.TASKS.items():
        for fn, node in _functions(ROOT / name).items():
            if fn not in table:
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            for top in body:
                for statement in _simple_statements(top):
                    code = ast.unparse(statement)
                    if len(code) >= 12 and code not in release.IDIOMS:
                        checked += 1
                        assert ast.dump(statement) not in kept, (
                            f"{name}: {fn}: {code!r} survives in the starter"
                        )
    assert checked > 40


def test_the_leak_check_compares_statements_not_lines(tmp_path):
    solution = (
        "def f(x, y):\n"
        "    if x is None:\n"
        "        raise ValueError(\n"
        '            f"no x for {y}"\n'
        "        )\n"
        "    return (x - y).clamp(\n"
        "        min=0.0\n"
        "    )  # d >= 0\n"
    )
    _, removed = release.stub(solution, {"f": (1, "f")})
    assert "return (x - y).clamp(min=0.0)" in removed
    kept = tmp_path / "kept.py"
    # Another statement that shares the solution's first physical line is no leak.
    kept.write_text('def g():\n    raise ValueError(\n        "other"\n    )\n')
    assert release.leaks(tmp_path, removed) == []
    # The solution's statement on one line, with a comment, is one.
    kept.write_text("def g(x, y):\n    return (x - y).clamp(min=0.0)  # copied\n")
    assert release.leaks(tmp_path, removed) == ["return (x - y).clamp(min=0.0)"]


def test_a_task_function_missing_from_its_file_is_named_with_the_file_that_has_it():
    with pytest.raises(SystemExit, match=r"no Router\.route \(defined in: balancedit\.py\)"):
        release.stub((ROOT / "evaluate.py").read_text(), {"Router.route": (3, "")}, "evaluate.py")


def _project_copy(where: Path) -> Path:
    """A copy of the project that release.py can run in (assets/ left empty: it is only copied)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    where.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, where / path.name)
    for name in ["README.md", "requirements.txt", ".gitignore", "pytest.ini"]:
        shutil.copy2(ROOT / name, where / name)
    shutil.copytree(ROOT / "assignments", where / "assignments", ignore=skip)
    (where / "assets").mkdir()
    return where


def test_release_refuses_a_starter_that_keeps_a_solution_statement(tmp_path):
    """A solution statement that stays elsewhere in the starter (here, written on one line in a
    grader, where the solution spreads it over several) makes release.py delete it and fail."""
    project = _project_copy(tmp_path / "project")
    path = project / "balancedit.py"
    tree = ast.parse(path.read_text())
    nodes = dict(release.functions(tree))
    candidates = []
    for fn in release.TASKS["balancedit.py"]:
        node = nodes[fn]
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        for statement in _simple_statements(ast.Module(body, [])):
            code = ast.unparse(statement)
            if len(code) >= 12 and code not in release.IDIOMS:
                candidates.append((statement.end_lineno == statement.lineno, code))
    code = min(candidates)[1]  # one that the solution spreads over several lines, if any
    grader = project / "assignments" / "test_task5.py"
    grader.write_text(grader.read_text() + f"\n\ndef _copied():\n    {code}\n")
    # A new folder (and its parent) is removed again; a folder that was there is emptied.
    for out, left in ((tmp_path / "new" / "starter", False), (tmp_path / "empty", True)):
        if left:
            out.mkdir()
        r = subprocess.run(
            [sys.executable, str(project / "assignments" / "release.py"), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1, r
        assert "solution statements would survive" in r.stderr and code in r.stderr, r.stderr
        assert out.exists() == left and not (left and any(out.iterdir()))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out", ["/proc/no/starter", "a file/starter"])
def test_release_tries_whether_out_can_be_written_before_any_work(out, tmp_path):
    """Root passes os.access on /proc, yet cannot make a folder there: only trying tells."""
    (tmp_path / "a file").write_text("mine")
    r = subprocess.run(
        [sys.executable, str(ROOT / "assignments" / "release.py"), "--out", out],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r
    assert f"--out {out} cannot be written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_release_refuses_an_existing_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run(
        [sys.executable, str(ROOT / "assignments" / "release.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r
    assert "not an empty folder" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
