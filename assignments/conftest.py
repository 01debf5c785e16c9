"""The graders' shared set-up: the task markers, the project folder on the import path, small
models built in memory (fresh for every test, so that nothing one test leaves on a model reaches
another), and at the end of every run what failed, each with its message, then the grade table.

    python -m pytest assignments            # every task, then the grade table
    python -m pytest assignments -m task2   # one task
"""

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the project (or the starter) folder
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import balancedit` works from any working directory

import torch  # noqa: E402

# The graders' models are tiny: one thread is the fastest, and never waits on another.
torch.set_num_threads(1)

# task -> (title, points). Task 7 (the experiments) is answered in writing and graded by hand.
TASKS = {
    "task1": ("Eq. 3, the radius (Appendix D's direction)", 10),
    "task2": ("the distance and the lookup (Eq. 1)", 10),
    "task3": ("the key and the routing hooks (Eq. 1)", 25),
    "task4": ("Eq. 2, training the value", 15),
    "task5": ("Eq. 3's probes: the key, Pos and Neg", 15),
    "task6": ("the metrics (Appendix C)", 10),
}
WRITTEN = ("task7", "experiments, answered in writing (graded by hand)", 15)

_task_of: dict[str, str] = {}  # test id -> task
_outcome: dict[str, str] = {}  # test id -> "passed" / "failed" / "skipped"
_message: dict[str, str] = {}  # test id -> the message of its first failure


def pytest_configure(config):
    for task, (title, points) in TASKS.items():
        config.addinivalue_line("markers", f"{task}: Task {task[-1]}, {title} ({points} points)")


def pytest_collection_finish(session):
    for item in session.items:  # after -m / -k deselection
        task = next((m.name for m in item.iter_markers() if m.name in TASKS), None)
        if task:
            _task_of[item.nodeid] = task


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    finally:  # else hypothesis writes patch files that add the failing examples to the graders
        item.__dict__.pop("_hypothesis_failing_examples", None)


def lesson(error: BaseException) -> str:
    """A failure's message on one line: the grader's own words (an assertion's message, without
    pytest's `assert ...` explanation below it), and hypothesis's falsifying example if any."""
    text = str(error)
    if isinstance(error, AssertionError):
        text = text.split("\nassert ")[0]
    elif not isinstance(error, pytest.fail.Exception):  # pytest.fail's message says it all
        text = f"{type(error).__name__}: {text}"
    notes = getattr(error, "__notes__", [])
    if isinstance(error, NotImplementedError):
        notes = []  # any example fails on a stub: tests that fail so are listed together
    text += "".join(f" ({n})" for n in notes if n.startswith("Falsifying example"))
    return " ".join(text.split())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and item.nodeid in _task_of:
        _message.setdefault(item.nodeid, lesson(call.excinfo.value))
    return report


def pytest_runtest_logreport(report):
    if report.nodeid not in _task_of:
        return
    if report.failed:
        _outcome[report.nodeid] = "failed"
    elif report.skipped and _outcome.get(report.nodeid) != "failed":
        _outcome[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        _outcome.setdefault(report.nodeid, "passed")


def pytest_terminal_summary(terminalreporter):
    if not _task_of or terminalreporter.config.option.collectonly:
        return
    write = terminalreporter.write_line
    failed = [i for i in _task_of if _outcome.get(i) == "failed"]
    if failed:
        write("")
        write("What failed, and why (`--tb=short` prints a test's whole failure)")
    # Tests of one task that fail with the same message are listed together.
    groups: dict[tuple[str, str], list[str]] = {}
    for i in failed:
        key = (_task_of[i], _message.get(i, "(no message: see the failure above)"))
        groups.setdefault(key, []).append(i.split("::")[-1])
    whole = dict(break_on_hyphens=False, break_long_words=False)  # wrap between words only
    for (task, message), names in groups.items():
        line = f"{task} " + ", ".join(names)
        write(textwrap.fill(line, 100, subsequent_indent="    ", **whole))
        for line in textwrap.wrap(message, 94, max_lines=8, placeholder=" [...]", **whole):
            write(f"      {line}")
    write("")
    write("Grades (points are shared equally among a task's tests)")
    total = 0.0
    got = 0.0
    for task, (title, points) in TASKS.items():
        ids = [i for i, t in _task_of.items() if t == task]
        if not ids:
            continue
        passed = sum(_outcome.get(i) == "passed" for i in ids)
        score = points * passed / len(ids)
        total += points
        got += score
        write(f"  {task}  {points:2d} pts  {passed:>2}/{len(ids):<2} passed  {score:5.1f}  {title}")
    write(f"  {WRITTEN[0]}  {WRITTEN[2]:2d} pts  in writing        -    {WRITTEN[1]}")
    write(f"  total  {got:.1f} / {total:.0f} points of the graded tasks run")


# ---------------------------------------------------------------- shared fixtures
# Each test gets its own: a hook or a change that one test leaves behind cannot reach another.


@pytest.fixture
def tiny():
    """A small random TinyVLM (2 decoder layers, fc2: 64 -> 32), seeded: fast enough for many
    edits."""
    import models
    import world

    torch.manual_seed(0)
    return models.TinyVLM(
        models.TinyConfig(vision_layers=1, layers=2, hidden=32, ffn=64, vision_width=32),
        models.build_tokenizer(world.vocabulary()),
    ).eval()


@pytest.fixture
def shipped():
    """The trained TinyVLM of assets/tinyvlm (it knows the world; the edits are made on it)."""
    import models

    return models.TinyVLM.from_pretrained()


@pytest.fixture
def records():
    """The first records of the shipped sample (assets/okedit_tiny)."""
    import data

    return data.load_sample(limit=5)
