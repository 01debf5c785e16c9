"""The study across worlds (study.py): statistics, tuning on dev worlds only, the JSON, the
command line (its own entry point), and the authors' every-position key of ablate-key."""

import json
import math

import pytest
import torch

import evaluate
import journal
import study
import world
from balancedit import BalancEditConfig, prompt_key


def test_stats_golden_mean_sample_std_and_per_seed():
    rows = [
        {c: 10.0 for c in (*evaluate.COLUMNS, "seconds_per_edit")},
        {c: 20.0 for c in (*evaluate.COLUMNS, "seconds_per_edit")},
    ]
    rows[1]["q_loc"] = None  # a column one world did not measure
    s = study.stats(rows)
    assert s["hm"] == {
        "mean": 15.0,
        "std": pytest.approx(math.sqrt(50)),
        "per_seed": [10.0, 20.0],
    }  # n - 1
    assert s["q_loc"] == {"mean": 10.0, "std": 0.0, "per_seed": [10.0, None]}
    assert study.stats(rows[:1])["acc"]["std"] == 0.0


@pytest.fixture()
def small(monkeypatch):
    """The study at toy size: one dev world of 4 records, two values per knob."""
    monkeypatch.setattr(study, "DEV_SEEDS", (1001,))
    monkeypatch.setattr(study, "N_RECORDS", 4)
    made = []
    make_records = world.make_records
    monkeypatch.setattr(
        world, "make_records", lambda seed, n: made.append(seed) or make_records(seed, n)
    )
    return made


def test_compare_tunes_on_dev_worlds_then_reports_every_test_world(tiny, small):
    rows = {
        "base": study.STUDY_ROWS["base"],
        "grace": study.STUDY_ROWS["grace"]._replace(grid=(0.5, 64.0)),
        "balancedit": study.STUDY_ROWS["balancedit"]._replace(grid=(0.0, 1.0)),
    }
    result = study.compare(tiny, BalancEditConfig(steps=3), rows, [1, 2], (2, 4), progress=False)
    assert small == [1001, 1, 2]  # the dev world is made (and used) before any test world
    assert result["seeds"] == {"dev": [1001], "test": [1, 2]}
    for name, knob in (("grace", "eps0"), ("balancedit", "alpha")):
        dev = result["tuned"][name]["dev_hm"]
        best = max(dev.values())
        assert result["tuned"][name][knob] == float(
            next(v for v, hm in dev.items() if hm == best)
        )  # ties: first
    assert list(result["single"]) == list(rows)
    for name, columns in result["single"].items():
        assert set(columns) == {*evaluate.COLUMNS, "seconds_per_edit"}
        assert len(columns["hm"]["per_seed"]) == 2
        assert columns["hm"]["mean"] == pytest.approx(sum(columns["hm"]["per_seed"]) / 2)
    assert list(result["sequential"]) == ["2", "4"]
    assert list(result["sequential"]["2"]) == ["grace", "balancedit"]  # no base: it makes no edits
    text = study.report(result, "toy")
    assert (
        "## Sequential, 4 edits" in text
        and " ± " in text
        and "| q_loc |" in text
        and "gen q_loc" in text
    )


def test_the_study_command_writes_json_markdown_and_png(tiny, small, tmp_path, monkeypatch, capsys):
    tiny.save_pretrained(tmp_path / "tiny")
    monkeypatch.delitem(study.STUDY_ROWS, "mend")  # no MEND editor is trained for this model
    monkeypatch.delitem(study.STUDY_ROWS, "ike")  # nor is it a shipped world's, IKE's store
    for name, row in list(study.STUDY_ROWS.items()):
        monkeypatch.setitem(study.STUDY_ROWS, name, row._replace(grid=row.grid[:1]))
    monkeypatch.setattr(study, "SIZES", (2,))
    out = tmp_path / "s.json"
    assert (
        study.main(
            [
                "--model",
                str(tmp_path / "tiny"),
                "--seeds",
                "1",
                "--steps",
                "2",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert {"seeds", "tuned", "single", "sequential", "config"} <= result.keys()
    assert (
        result["tuned"]["balancedit"]["alpha"] == study.ALPHAS[0]
        and result["tuned"]["grace"]["eps0"] == study.EPS0S[0]
    )
    assert result["config"]["steps"] == 2
    assert set(result["single"]) == {"base", "ft", "grace", "balancedit", "balancedit_last"}
    assert out.with_suffix(".md").read_text() in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0
    assert not out.with_suffix(".journal").exists()  # removed once the outputs are written


def test_a_stopped_study_resumes_by_world_and_method(tiny, small, tmp_path, monkeypatch):
    """Stopped (Ctrl-C) at a record of the first test world, the study resumes: only the records
    its journal does not hold are scored, and the result is the uninterrupted one's."""
    rows = {
        "base": study.STUDY_ROWS["base"],
        "balancedit": study.STUDY_ROWS["balancedit"]._replace(grid=(0.0, 1.0)),
    }

    def run(log=None):
        result = study.compare(tiny, BalancEditConfig(steps=2), rows, [1], (2,), False, log=log)
        for part in ("single", *(f"sequential {n}" for n in result["sequential"])):
            table = result[part] if part == "single" else result["sequential"][part.split()[1]]
            for columns in table.values():
                del columns["seconds_per_edit"]  # a run's own
        return result

    want = run()
    folder = tmp_path / "s.journal"
    calls = []
    append = journal.append

    def stop(fd, line):  # Ctrl-C at the 12th line: the header, 8 tuning records, 2 of world 1
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        append(fd, line)

    monkeypatch.setattr(journal, "append", stop)
    with pytest.raises(KeyboardInterrupt):
        run(journal.Journal(folder, {"run": "toy"}).open(fresh=False))
    monkeypatch.setattr(journal, "append", append)
    added = []
    add = journal.Part.add
    monkeypatch.setattr(
        journal.Part, "add", lambda p, *a: added.append((p.method, a[0])) or add(p, *a)
    )
    assert run(journal.Journal(folder, {"run": "toy"}).open(fresh=False)) == want
    assert len(added) == 2 * 4 + 4 + 4 + 2 - 10  # tuning, base, balancedit, 2 sequential edits
    assert added[0] == ("world 1: base, single edits", "3")  # the first one not journaled


@pytest.mark.parametrize(
    "argv",
    [
        ["study", "--seeds", "0"],
        ["study", "--seeds", "1001"],
        ["study", "--out", "x.png"],
        ["ablate-key", "--alpha", "0.5"],
        ["study", "--data", "x"],
        ["study", "--pool", "last"],
        ["study", "--device", "cuda:7"],
        ["ablate-key", "--model", "/no/such/dir"],
        ["study", "--out", "/proc/x/s.json"],  # root passes os.access here: only trying tells
        ["study", "--threads", "0"],
    ],
)
def test_study_commands_refuse_bad_input_before_any_work(argv, capsys, monkeypatch):
    monkeypatch.setattr(study, "compare", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        study.main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and len(err.splitlines()) == 1
        and "error" in err
        and "Traceback" not in err
    ), err


@pytest.mark.parametrize("command", ["study", "ablate-key"])
def test_study_help_offers_only_what_works(command, capsys):
    with pytest.raises(SystemExit) as e:
        study.main([command, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and study.HELP[command][:40] in text
    assert "--seeds" in text and "--steps" in text
    for absent in ("--data", "--backbone", "--protocol", "--alpha", "--pool", "--limit"):
        assert absent not in text, absent
    other = next(c for c in study.HELP if c != command)
    assert study.HELP[other][:40] not in text  # each command says what it does, not the other


def test_study_py_is_an_entry_point_that_explains_itself():
    """`python study.py --help` (in a fresh interpreter) lists both commands and exits 0;
    evaluate does not import study."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(study.__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "study.py", "--help"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "study" in done.stdout and "ablate-key" in done.stdout and "dev worlds" in done.stdout
    check = "import sys, evaluate; assert 'study' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=root).returncode == 0


def test_every_position_key_holds_the_answer_and_its_queries_find_it(tiny, records):
    """The authors' key: the mean over every attended position of the teacher-forced edit input."""
    record = records[0]
    editor = study.EveryPosition(tiny, BalancEditConfig(steps=2))
    editor.target = record.target
    batch = tiny.encode([record.image], [record.question], [record.target])
    seen = []
    with tiny.get_submodule(tiny.target_layer).register_forward_hook(
        lambda m, a, o: seen.append(a[0])
    ):
        tiny(**batch)
    every = batch["attention_mask"].bool()
    want = prompt_key(seen[0].reshape(*every.shape, -1), every)
    torch.testing.assert_close(editor.keys_of([record.image], [record.question]), want)
    assert not torch.allclose(
        want, prompt_key(seen[0].reshape(*every.shape, -1), batch["prompt_mask"])
    )
    report = editor.edit(record)
    torch.testing.assert_close(editor.codebook.keys[report.index], want[0])  # the entry's key
    with editor.attached() as router, torch.no_grad():
        tiny(**batch)  # the edit's own teacher-forced input: its query is the key
        assert router.last_index.tolist() == [report.index]
        step = {
            "prompt_mask": torch.zeros(1, 1, dtype=torch.bool),
            "attention_mask": torch.ones(1, 9),
        }
        router.read_attention(tiny, (), step)  # a KV-cache decoding step's masks
        q = router.query(seen[0][:1].reshape(1, 1, -1), step["prompt_mask"])
        assert torch.isnan(q).all()  # it pools no position (no prompt one), so the route is held
