"""The course kit's graders against wrong implementations (the mutants of tests/mutants.py):
every mutant still applies to the code, every task function has some, and three of the four
mistakes that once scored full marks are caught, each by its grader with a message that names
it. The whole list (38 mutants, each graded by its task's graders) runs with
`python tests/mutants.py`: minutes, too slow for the suite."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutants  # noqa: E402

BY_NAME = {m.name: m for m in mutants.MUTANTS}
# In functions and graders that do not meet (the two routing mistakes only show in a float16
# model and in decoding, the Adam mistake only in train_value), so that one copy and one pytest
# run grade all three.
IN_THE_SUITE = ["hold-refreshed-only-on-a-hit", "value-in-model-dtype", "adam-without-lr"]


def test_every_mutant_applies_and_every_task_function_has_one():
    assert len(BY_NAME) == len(mutants.MUTANTS) >= 15  # names are unique
    for m in mutants.MUTANTS:
        original = (mutants.ROOT / m.file).read_text()
        assert mutants.mutated(m) != original, m.name  # raises Stale if a swap no longer fits
        assert m.catcher.startswith("test_") and m.says, m.name
    functions = {fn for table in mutants.release.TASKS.values() for fn in table}
    assert {m.function for m in mutants.MUTANTS} == functions


def test_a_mutant_whose_text_is_gone_is_named():
    stale = mutants.Mutant("x", "hm", "", [("no such text", "")], "test_x", "x")
    with pytest.raises(mutants.Stale, match="mutant x: 'no such text' occurs 0 times in"):
        mutants.mutated(stale)


def test_the_mistakes_that_once_scored_full_marks_are_caught_and_named(tmp_path):
    chosen = [BY_NAME[n] for n in IN_THE_SUITE]
    tests = [f"assignments/test_task{m.task}.py::{m.catcher}" for m in chosen]
    for r in mutants.try_mutants(chosen, tmp_path / "project", tests):
        m = r["mutant"]
        message = r["caught"].get(m.catcher)
        assert message is not None, f"{m.name}: {m.catcher} passes\n{r['output'][-3000:]}"
        assert r["passed"] < r["total"] and m.says in message, (m.name, message)
