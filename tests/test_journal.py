"""Long runs (journal.py): a run killed (SIGKILL, in a child process) at several points, mid-line
and during the final write among them, or stopped (Ctrl-C), or out of disk, resumes to the table
of an uninterrupted run, in both protocols; a journal of another run is refused, naming what
differs; two processes under torch.distributed.run merge to the one-process table."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

import cli
import data
import evaluate
import journal
import world
import writers
from baselines import FineTune, FTConfig, Grace, GraceConfig

RUN = ["--limit", "5", "--steps", "2", "--no-progress"]
SINGLE = [*RUN, "--methods", "base,balancedit"]
SEQUENTIAL = [*RUN, "--protocol", "sequential", "--methods", "grace,balancedit"]
SEQUENTIAL += ["--checkpoint-every", "2"]  # checkpoints after edits 2, 4 and 5


def killed(at: str, argv: list[str]) -> None:
    """``cli.main(argv)`` in a child process that SIGKILLs itself: "line N" in the middle of
    writing its N-th journal line, "NAME N" just before its N-th rename onto a path ending in NAME.
    The child is forked, as a DataLoader's workers are: torch is imported already."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            kill_at(*at.split())
            cli.main(argv)
        finally:
            os._exit(1)
    for _ in range(1200):  # two minutes
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the run to be killed at {at} did not get there")


def kill_at(where: str, at: str) -> None:
    """In this process, SIGKILL at the ``at``-th journal line or rename (``killed``)."""
    calls = []

    def due():
        calls.append(1)
        return len(calls) == int(at)

    if where == "line":
        append = journal.append

        def cut(fd, line):
            if due():
                os.write(fd, line[: len(line) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            append(fd, line)

        journal.append = cut
    else:
        replace = os.replace

        def rename(source, target):
            if str(target).endswith(where) and due():
                os.kill(os.getpid(), signal.SIGKILL)
            replace(source, target)

        os.replace = rename


def scores(out: Path) -> dict:
    """The output's results without their seconds (a run's own)."""
    methods = json.loads(out.read_text())["methods"]
    return {m: {k: v for k, v in r.items() if k != "seconds_per_edit"} for m, r in methods.items()}


def stopping(monkeypatch, at: int, error: BaseException) -> None:
    """journal.append raises ``error`` at its ``at``-th call, half of that line written."""
    calls = []
    append = journal.append

    def stop(fd, line):
        calls.append(1)
        if len(calls) == at:
            os.write(fd, line[: len(line) // 2])
            raise error
        append(fd, line)

    monkeypatch.setattr(journal, "append", stop)


def counting(monkeypatch, cls, name) -> list:
    """Each call of ``cls.name`` appends to the list returned."""
    calls = []
    method = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda *a, **k: calls.append(1) or method(*a, **k))
    return calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("tinyvlm")
    tiny.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """The uninterrupted runs' outputs: {"single": path, "sequential": path}."""
    where = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, argv in (("single", SINGLE), ("sequential", SEQUENTIAL)):
        out[name] = where / f"{name}.json"
        assert cli.main([*argv, "--model", str(checkpoint), "--out", str(out[name])]) == 0
    return out


def lines(folder: Path) -> list[tuple]:
    """(method, record id) of every whole line of a journal, the headers left out."""
    return [
        (x["method"], x["id"]) for p in sorted(folder.glob("*.jsonl")) for x in journal.read(p)[1:]
    ]


def test_a_run_killed_mid_line_resumes_scoring_the_cut_record_alone(
    checkpoint, reference, tmp_path, monkeypatch
):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    argv = [*SINGLE, "--model", str(checkpoint), "--out", str(out)]
    killed("line 4", argv)  # the header, two records, then half of the third
    folder = out.with_suffix(".journal")
    assert not (folder / "rank0.jsonl").read_bytes().endswith(b"\n")
    assert len(lines(folder)) == 2 and out.read_text() == "old\n"
    added = counting(monkeypatch, journal.Part, "add")
    assert cli.main(argv) == 0
    assert len(added) == 2 * 5 - 2  # the cut record again, the two whole ones not
    assert scores(out) == scores(reference["single"])
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_sequential_run_killed_and_stopped_resumes_from_its_checkpoints(
    checkpoint, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "s.json"
    out.write_text("old\n")
    argv = [*SEQUENTIAL, "--model", str(checkpoint), "--out", str(out)]
    killed("/4 1", argv)  # while GRACE's checkpoint after 4 edits is renamed into place
    assert lines(out.with_suffix(".journal")) == []
    stopping(monkeypatch, 2, KeyboardInterrupt())  # Ctrl-C at GRACE's second scored record
    edits = counting(monkeypatch, Grace, "edit")
    assert cli.main(argv) == 130
    assert len(edits) == 5 - 2  # from the checkpoint after 2 edits on
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped; 1 scored records are safe in" in err, err
    assert "to resume, run the same command: python evaluate.py --limit 5" in err
    monkeypatch.undo()
    killed("s.json 1", argv)  # in the final write: the old output stays whole
    assert out.read_text() == "old\n" and len(lines(out.with_suffix(".journal"))) == 10
    added = counting(monkeypatch, journal.Part, "add")
    assert cli.main(argv) == 0 and added == []  # every record was in the journal
    assert scores(out) == scores(reference["sequential"])
    assert not out.with_suffix(".journal").exists()


def test_a_full_disk_is_one_line_and_keeps_every_earlier_record(
    checkpoint, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "r.json"
    argv = [*SINGLE, "--model", str(checkpoint), "--out", str(out)]
    stopping(monkeypatch, 4, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank0.jsonl: cannot write (No space left on device)" in err
    assert "2 scored records are safe" in err and "run the same command" in err, err
    assert lines(out.with_suffix(".journal")) == [("base", "1"), ("base", "2")]
    monkeypatch.undo()

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(journal, "write_atomic", read_only)  # the folder turned read-only
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and "10 scored" in err, err
    monkeypatch.undo()
    assert cli.main(argv) == 0 and scores(out) == scores(reference["single"])


def test_a_journal_of_another_run_is_refused_naming_what_differs(
    checkpoint, tiny, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "r.json"
    argv = [*SINGLE, "--model", str(checkpoint), "--out", str(out)]
    stopping(monkeypatch, 2, KeyboardInterrupt())
    assert cli.main(argv) == 130
    monkeypatch.undo()
    head = journal.read(out.with_suffix(".journal") / "rank0.jsonl")[0]
    other_data = tmp_path / "data"
    writers.write_okedit(world.make_records(7, 6), other_data)
    other_model = tmp_path / "model"
    tiny.save_pretrained(other_model)
    with open(other_model / "config.json", "a") as f:
        f.write("\n")  # the same weights, another file
    says = {  # another run's options -> what the refusal says
        ("--steps", "3"): "--steps 2 then, 3 now",
        ("--data", str(other_data)): f"the data {head['data']} then, ",
        ("--model", str(other_model)): f"the checkpoint {head['checkpoint']} then, ",
        ("ablate-distance",): "the command evaluate.py run then, evaluate.py ablate-distance now",
    }
    for change, said in says.items():
        if change == ("ablate-distance",):
            change = ("ablate-distance", *RUN, "--model", str(checkpoint), "--out", str(out))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, *change] if change[0].startswith("-") else list(change))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and said in err, (change, err)
        assert "is the journal of another run" in err and "--fresh" in err
    assert cli.main([*argv, "--steps", "3", "--fresh"]) == 0
    assert journal.read(tmp_path / "r.journal.old-1" / "rank0.jsonl")[0]["options"]["steps"] == 2


SCORING = """
import sys
sys.path.insert(0, {root!r})
import cli, journal
scored = []
add = journal.Part.add
journal.Part.add = lambda part, *a: scored.append(1) or add(part, *a)
status = cli.main(sys.argv[1:])
print(f"rank {{journal.processes()[0]}} scored {{len(scored)}}")
sys.exit(status)
"""


def test_two_processes_merge_to_the_one_process_table(checkpoint, reference, tmp_path):
    script = tmp_path / "scoring.py"  # evaluate.py that says how many records it scored
    script.write_text(SCORING.format(root=str(ROOT)))
    out = tmp_path / "r.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    argv = [*SINGLE, "--model", str(checkpoint), "--out", str(out)]
    done = subprocess.run(
        [*command, "2", str(script), *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 records spread over 2 processes" in done.stdout
    assert "rank 0 scored 6" in done.stdout and "rank 1 scored 4" in done.stdout  # 3 + 3, 2 + 2
    assert scores(out) == scores(reference["single"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "scoring.py"]


def test_the_sequential_protocol_is_refused_under_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["--protocol", "sequential", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--protocol sequential runs in one process" in err and "torchrun" in err


def test_the_progress_bar_shows_done_resumed_and_an_eta():
    bar = evaluate.progress_bar(list(range(6)), True, "x", resumed=4)
    for _ in bar:
        pass
    text = str(bar)
    bar.close()
    assert "10/10" in text and "4 resumed" in text and "<00:00" in text, text


def test_write_atomic_leaves_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), journal.replacing(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and list(tmp_path.iterdir()) == [path]
    journal.write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and list(tmp_path.iterdir()) == [path]


def test_a_large_file_is_hashed_by_blocks_that_see_a_change(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "SAMPLED", 4)
    monkeypatch.setattr(journal, "BLOCK", 8)
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(100))
    before = journal.files_hash(path)
    path.write_bytes(bytes(99) + b"\1")  # the last block is always read
    assert journal.files_hash(path) != before
    assert journal.files_hash(tmp_path) == journal.files_hash(tmp_path)


def test_ft_and_grace_load_what_they_saved(tiny, tmp_path):
    records = data.load_sample(limit=3)
    for editor in (FineTune(tiny, FTConfig(steps=2)), Grace(tiny, GraceConfig(steps=2))):
        for record in records:
            editor.edit(record)
        editor.save(tmp_path / type(editor).__name__)
        loaded = type(editor).load(tmp_path / type(editor).__name__, tiny)
        assert len(loaded) == len(editor) and loaded.config == editor.config
        with editor.attached():
            before = [evaluate.observe(tiny, r).tokens for r in records]
        with loaded.attached():
            assert [evaluate.observe(tiny, r).tokens for r in records] == before
