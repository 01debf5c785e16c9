"""Not a test: the course kit's graders against wrong implementations. Each mutant is one
mistake that students make in one task function, patched into a copy of the project; the graders
of that function's task run on the copy (one pytest each, OMP_NUM_THREADS=1), and every mutant
must lose points there. Prints, for each, the score, the points lost and the graders that caught
it with their messages. 54 mutants: 10 minutes of CPU in all, two copies at a time (measured: 13
minutes of wall time on a 2-core machine busy with other jobs; one mutant alone, 10 to 45 s):

    python tests/mutants.py                       # every mutant, then a table
    python tests/mutants.py adam-without-lr       # some of them, by name
    python tests/mutants.py --list                # the names and the mistakes

The mutants themselves are in tests/mistakes.py. tests/test_mutations.py checks in the suite that
every mutant still applies to the code, and runs a few of them against the grader that must
catch each.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mistakes import MUTANTS, ROOT, Mutant, release  # noqa: E402

GRADE = re.compile(r"^\s*(task\d)\s+(\d+) pts\s+(\d+)/(\d+)\s+passed", re.M)
__all__ = ["MUTANTS", "Mutant", "ROOT", "release"]  # read by tests/test_mutations.py


class Stale(Exception):
    """A mutant's old text is no longer in its function: the reference changed."""


def mutated(mutant: Mutant, source: str | None = None) -> str:
    """The source of the mutant's file (or ``source``) with its function patched; Stale if a
    swap's old text is not in the function exactly once (the reference changed: update the
    mutant)."""
    if source is None:
        source = (ROOT / mutant.file).read_text()
    node = dict(release.functions(ast.parse(source)))[mutant.function]
    lines = source.splitlines(keepends=True)
    body = "".join(lines[node.lineno - 1 : node.end_lineno])
    for old, new in mutant.swaps:
        n = body.count(old)
        if n != 1:
            where = f"{mutant.file}: {mutant.function}"
            raise Stale(f"mutant {mutant.name}: {old!r} occurs {n} times in {where}, not once")
        body = body.replace(old, new)
    text = "".join(lines[: node.lineno - 1]) + body + "".join(lines[node.end_lineno :])
    ast.parse(text)
    return text


def copy_project(where: Path) -> Path:
    """A copy of the project's code and graders (assets/ linked, not copied: nothing writes it)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    where.mkdir(parents=True)
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, where / path.name)
    shutil.copy2(ROOT / "pytest.ini", where / "pytest.ini")
    shutil.copytree(ROOT / "assignments", where / "assignments", ignore=skip)
    (where / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    return where


def failures(output: str) -> dict[str, str]:
    """test name -> message, from the graders' "What failed" list (names on lines that start
    with the task or with 4 spaces, the message on lines that start with 6)."""
    found = {}
    part = output.split("What failed, and why")[1:]
    if not part:
        return found
    names = []
    message = []
    for line in part[0].split("\n")[1:] + ["task"]:
        if line.startswith("task") or not line.strip():
            for name in names:
                found[name.split("[")[0]] = " ".join(message)
            names = [n.strip() for n in line[5:].split(",") if n.strip()] if line.strip() else []
            message = []
            if not line.strip():
                break
        elif line.startswith("      "):
            message.append(line.strip())
        else:
            names += [n.strip() for n in line.split(",") if n.strip()]
    return found


class Score(NamedTuple):
    """A task's grade."""

    passed: int  # graders passed
    total: int  # graders
    points: int  # the task's points


def grade(project: Path, tests: list[str]) -> tuple[dict[str, Score], str]:
    """Run the graders ``tests`` (pytest arguments) in ``project``: task -> (passed, total,
    the task's points), and the output."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rN"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        command + tests, cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    output = run.stdout + run.stderr
    scores = {t: Score(int(p), int(n), int(pts)) for t, pts, p, n in GRADE.findall(output)}
    return scores, output


def try_mutants(mutants: list[Mutant], where: Path, tests: list[str] | None = None) -> list:
    """Patch the mutants into one copy of the project at ``where`` and run ``tests`` (default:
    the graders of the first mutant's task). One result per mutant: its task's score and the
    points it lost, the graders that failed with their messages, and whether its own grader
    said ``says``."""
    project = copy_project(where)
    for m in mutants:
        path = project / m.file
        path.write_text(mutated(m, path.read_text()))
    tests = tests or ["assignments", "-m", f"task{mutants[0].task}"]
    start = time.perf_counter()
    scores, output = grade(project, tests)
    seconds = time.perf_counter() - start
    caught = failures(output)
    results = []
    for m in mutants:
        s = scores.get(f"task{m.task}", Score(0, 0, 0))
        says = m.says in caught.get(m.catcher, "")
        results.append(
            dict(mutant=m, passed=s.passed, total=s.total, caught=caught, as_expected=says)
        )
        lost = s.points * (s.total - s.passed) / s.total if s.total else 0.0
        results[-1].update(lost=lost, seconds=seconds, output=output)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the graders against wrong implementations.")
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--jobs", type=int, default=2, help="copies graded at a time (2)")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"no mutant {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} task {m.task}  {m.function}: {m.mistake}")
        return 0
    try:
        for m in chosen:
            mutated(m)  # every patch applies, before any work
    except Stale as e:
        print(f"mutants.py: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            jobs = [pool.submit(try_mutants, [m], Path(tmp, m.name)) for m in chosen]
            results = [job.result()[0] for job in jobs]
    print("| mutant | task | score | points lost | s | caught by | the expected grader's message |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for r in results:
        m = r["mutant"]
        caught = r["passed"] < r["total"]
        bad += not caught or not r["as_expected"]
        mark = "" if r["as_expected"] else " (NOT the expected grader or words)"
        message = r["caught"].get(m.catcher, "-")
        print(
            f"| {m.name}: {m.mistake} | {m.task} | {r['passed']}/{r['total']} | {r['lost']:.1f} | "
            f"{r['seconds']:.0f} | "
            f"{', '.join(sorted(r['caught'])) or 'nothing'}{mark} | {message} |"
        )
    seconds = time.perf_counter() - start
    print(f"\n{len(results)} mutants, {len(results) - bad} caught as expected, in {seconds:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
