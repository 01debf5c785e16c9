"""A run's journal: each scored record on disk as soon as it is scored, so that a run stopped at
any instant (a kill, Ctrl-C, a full disk) resumes where it stopped, in one process or several.

The journal of ``results/main.json`` is the folder ``results/main.journal``: one file of JSON
lines per process (``rank0.jsonl``, ``rank1.jsonl`` under torchrun), each line a record's scores
and seconds, appended and synced (fsync) before the next record starts, and the sequential
protocol's checkpoints. Each file's first line is the run's header (the command and its options,
hashes of the data, of the model's checkpoint and of the code): a journal whose header differs is
refused, naming what differs, never mixed in. Outputs are written to a temporary file and renamed
over the old one (``replacing``); the journal is removed once they are.
"""

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import is_dataclass
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

import data

FORMAT = 1  # the journal's format, in every header
ROOT = Path(__file__).resolve().parent  # the project's modules
BLOCK = 2**20  # bytes read at a time
SAMPLED = 256  # blocks: a larger file is hashed by this many blocks, evenly spaced


class JournalError(Exception):
    """A journal that cannot be used or written, in one line that names it."""


# ---------------- What a run is: its header


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]  # 64 bits: enough to tell runs apart


def code_version() -> str:
    """A hash of the project's modules (every top-level .py file): a run resumes only on the code
    that began it. Not git's commit, which misses edits not committed yet, and which a copy
    without .git does not have."""
    return _sha(b"".join(p.name.encode() + p.read_bytes() for p in sorted(ROOT.glob("*.py"))))


def files_hash(*paths) -> str:
    """A hash of the files at ``paths`` (a folder: every file in it that is not hidden), each by
    its name, size and bytes; a file over SAMPLED MiB by SAMPLED blocks of 1 MiB evenly spaced,
    as reading a 15 GB checkpoint whole would add minutes to every start."""
    h = hashlib.sha256()
    for top in map(Path, paths):
        if not top.exists():  # the loader will say so
            continue
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for path in files:
            name = path.relative_to(top)
            if any(part.startswith(".") for part in name.parts):  # .git, .cache
                continue
            size = path.stat().st_size
            h.update(f"{name}\0{size}\0".encode())
            with path.open("rb") as f:
                if size <= SAMPLED * BLOCK:
                    h.update(f.read())
                    continue
                for k in range(SAMPLED):
                    f.seek(k * (size - BLOCK) // (SAMPLED - 1))
                    h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


def plain(x):
    """``x`` as JSON, each image by a hash of its bytes: an image file's (not decoded), or the
    pixels of one made in memory. Records and samples by their fields as stored (``vars``: a
    data.Decoded field holds the image file, undecoded)."""
    if isinstance(x, data.ImageFile):
        return f"file {_sha(x.path.read_bytes())}"
    if isinstance(x, Image.Image):
        return f"{x.mode} {x.size} {_sha(x.tobytes())}"
    if isinstance(x, (list, tuple)):
        return [plain(y) for y in x]
    if is_dataclass(x):
        return {k: plain(v) for k, v in vars(x).items()}
    return x


def fingerprint(records) -> str:
    """A hash of what the records hold, in their order: every field and every image."""
    return _sha(json.dumps([plain(r) for r in records], sort_keys=True).encode())


def header(command: str, options: dict, paths: dict, data: str, checkpoint: str) -> dict:
    """A run's header: ``paths`` (the options naming files) are kept to be named when something
    differs, not compared: the same data or checkpoint moved elsewhere resumes."""
    fields = dict(format=FORMAT, command=command, options=options, data=data)
    fields.update(checkpoint=checkpoint, code=code_version(), paths=paths)
    return json.loads(json.dumps(fields))  # as read back: lists, not tuples


def differences(then: dict, now: dict) -> list[str]:
    """What differs between two headers: each option by its flag, else the header's field."""
    said = []
    for key, value in now.items():
        old = then.get(key)
        if key == "options":
            old = old or {}
            for name in {**old, **value}:
                if old.get(name) != value.get(name):
                    flag = "--" + name.replace("_", "-")
                    said.append(f"{flag} {old.get(name)} then, {value.get(name)} now")
        elif key != "paths" and old != value:
            said.append(f"the {key} {old} then, {value} now")
    if said:  # a path that differs may say why
        for name, path in now["paths"].items():
            if then.get("paths", {}).get(name) != path:
                flag = "--" + name.replace("_", "-")
                said.append(f"{flag} {then.get('paths', {}).get(name)} then, {path} now")
    return said


# ---------------- The files of lines


def append(fd: int, line: bytes) -> None:
    """Write ``line`` at the end of the file ``fd`` and sync it to the disk."""
    while line:
        line = line[os.write(fd, line) :]
    os.fsync(fd)


def read(path: Path) -> list[dict]:
    """A journal file's lines, its header first; a last line cut mid-write (no newline yet) is
    left out."""
    lines = path.read_text().split("\n")[:-1]  # after the last newline: "" or a cut line
    try:
        return [json.loads(line) for line in lines]
    except ValueError as e:
        raise JournalError(f"{path}: damaged ({e}); --fresh starts again, keeping it") from None


def _sync(path: Path) -> None:
    """Sync a file to the disk, or a folder, so that a file made or renamed in it stays after a
    crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside ``path`` (its suffix kept, for writers that read it), renamed over
    ``path`` once the block ends: a kill at any instant leaves the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        _sync(temporary)
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (``replacing``)."""
    with replacing(path) as temporary:
        temporary.write_text(text)


# ---------------- Processes: torchrun's, joined with torch.distributed (gloo)


def processes() -> tuple[int, int]:
    """This process's rank and the number of processes: torchrun's RANK and WORLD_SIZE, else 0
    and 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join(world: int) -> None:
    """Join torchrun's other processes (gloo: it waits on CPUs and GPUs alike), each with its own
    GPU if there are GPUs (the LOCAL_RANK-th: ``--device cuda`` then means it)."""
    import torch
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def wait_for_all(world: int) -> None:
    """Wait until every process gets here."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()


def guarded(prog: str, argv, journal, work: Callable, cleanup: Callable) -> int:
    """``work()``, with SIGTERM taken as Ctrl-C. A stop, or a write that fails (a full disk, a
    read-only folder), ends in one line: the scored records ``journal`` holds, and the command
    that resumes (the same, without --fresh). Returns the exit status."""
    import torch.distributed as dist

    rank, world = processes()
    launcher = ["python"] if world == 1 else ["torchrun", f"--nproc-per-node={world}"]
    resume = shlex.join([*launcher, prog.split()[0], *(a for a in argv if a != "--fresh")])
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C
    try:
        work()
        return 0
    except KeyboardInterrupt:
        said, status = "stopped", 130
    except (JournalError, OSError) as e:
        said, status = f"error: {e}", 1
    finally:
        signal.signal(signal.SIGTERM, before)
        cleanup()  # the folders made for the output, if still empty
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        safe = ""
        if journal.folder is not None:
            safe = f"{journal.safe()} scored records are safe in {journal.folder}; "
        print(f"{prog}: {said}; {safe}to resume, run the same command: {resume}", file=sys.stderr)
    return status


# ---------------- The journal
class Journal:
    """A run's journal: this process's file of lines, and every process's lines read back.
    ``folder`` None: one in memory, that nothing resumes (a run from Python). ``every``: the
    sequential protocol saves its editor every ``every`` edits (0: never)."""

    def __init__(self, folder=None, head=None, every=0):
        self.folder = None if folder is None else Path(folder)
        self.header = head
        self.rank, self.world = processes() if folder is not None else (0, 1)
        self.every = every
        self.lines = {}  # (method, record id) -> its line
        self.fd = None  # this process's file, open for appending

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("rank*.jsonl")) if self.folder else []

    def check(self) -> None:
        """Refuse a journal of another run (read only: before any process writes)."""
        for path in self.files():
            lines = read(path)
            said = differences(lines[0], self.header) if lines else []
            if said:
                raise JournalError(
                    f"{self.folder} is the journal of another run ({'; '.join(said)}): run that "
                    "command to finish it, or add --fresh to start this one (the old journal is "
                    "kept under another name)"
                )

    def open(self, fresh: bool) -> "Journal":
        """Resume this run's journal, or begin it; another run's is refused, unless ``fresh``:
        then it is kept under another name (NAME.journal.old-N). Every process calls it, and
        each appends to its own file (a line cut mid-write cut off; a new file begins with the
        header). In memory: nothing to do."""
        if self.folder is None:
            return self
        if not fresh:
            self.check()  # every process, before any writes
        elif self.rank == 0 and self.folder.exists():
            k = 1
            while self.folder.with_name(f"{self.folder.name}.old-{k}").exists():
                k += 1
            os.replace(self.folder, self.folder.with_name(f"{self.folder.name}.old-{k}"))
        wait_for_all(self.world)
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.folder / f"rank{self.rank}.jsonl"
        self.fd = os.open(own, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        text = own.read_bytes()
        os.ftruncate(self.fd, text.rfind(b"\n") + 1)  # to its last whole line
        if text.rfind(b"\n") < 0:
            self.write_line(self.header)
            _sync(self.folder)
        self.read_all()
        return self

    def read_all(self) -> None:
        for path in self.files():
            for line in read(path)[1:]:
                self.lines.setdefault((line["method"], line["id"]), line)

    def write_line(self, line: dict) -> None:
        """Append ``line`` to this process's file, synced; a write that fails (a full disk, a
        read-only folder) is a JournalError naming the file."""
        try:
            append(self.fd, (json.dumps(line) + "\n").encode())
        except OSError as e:
            own = self.folder / f"rank{self.rank}.jsonl"
            raise JournalError(f"{own}: cannot write ({e.strerror or e})") from e

    def safe(self) -> int:
        """How many scored records the journal holds now, every process's."""
        return sum(len(read(p)) - 1 for p in self.files()) if self.folder else len(self.lines)

    def part(self, method: str) -> "Part":
        return Part(self, method)

    def finish(self) -> None:
        """Remove the journal (its outputs are written): renamed first, so that a kill while it
        is removed leaves no half of it."""
        if self.fd is not None:
            os.close(self.fd)
        wait_for_all(self.world)  # until every process has read the lines
        if self.folder is not None and self.rank == 0:
            gone = self.folder.with_name(f".{self.folder.name}.removed-{os.getpid()}")
            os.replace(self.folder, gone)
            shutil.rmtree(gone)


class Part:
    """One method's lines of a journal (a method, a setting, a world's method: any label). This
    process scores every ``world``-th record from its ``rank``-th."""

    def __init__(self, journal: Journal, method: str):
        self.journal = journal
        self.method = method
        self.every = journal.every

    def todo(self, records) -> list:
        """This process's records that the journal does not hold yet, in order."""
        j = self.journal
        return [r for r in records[j.rank :: j.world] if (self.method, r.id) not in j.lines]

    def resumed(self, records) -> int:
        """This process's records that the journal holds already."""
        j = self.journal
        return len(records[j.rank :: j.world]) - len(self.todo(records))

    def add(self, record_id: str, scores: dict, seconds: Optional[float]) -> None:
        """Journal a scored record: every score, and its edit's seconds (None: no edit)."""
        line = {"method": self.method, "id": record_id, "scores": scores, "seconds": seconds}
        if self.journal.fd is not None:
            self.journal.write_line(line)
        self.journal.lines[(self.method, record_id)] = line

    def collect(self, records) -> tuple[list[dict], list]:
        """Each record's scores and seconds, in the records' order, once every process has
        scored its share (then each reads the others' lines)."""
        j = self.journal
        if j.world > 1:
            wait_for_all(j.world)
            j.read_all()
        lines = [j.lines.get((self.method, r.id)) for r in records]
        missing = [r.id for r, line in zip(records, lines) if line is None]
        if missing:
            raise JournalError(f"{j.folder}: {self.method}: no line for records {missing[:5]}")
        return [line["scores"] for line in lines], [line["seconds"] for line in lines]

    def checkpoints(self) -> Path:
        return self.journal.folder / "checkpoints" / re.sub(r"[^\w.=,-]+", "_", self.method)

    def latest(self) -> Optional[tuple[Path, list[float]]]:
        """The last checkpoint of this method's edits: its folder, and the seconds of the edits
        it holds; None if there is none."""
        if self.journal.folder is None or not self.checkpoints().is_dir():
            return None
        done = [p for p in self.checkpoints().iterdir() if p.name.isdigit()]
        if not done:
            return None
        folder = max(done, key=lambda p: int(p.name))
        return folder, json.loads((folder / "edits.json").read_text())["seconds"]

    def save(self, save: Callable[[Path], None], seconds: list[float]) -> None:
        """A checkpoint after ``len(seconds)`` edits: ``save(folder)`` and the edits' seconds
        into a temporary folder, synced, renamed once whole; the older ones then go."""
        where = self.checkpoints()
        temporary = where / f".{len(seconds)}"
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            save(temporary)
            (temporary / "edits.json").write_text(json.dumps({"seconds": seconds}))
            for path in temporary.iterdir():
                _sync(path)
            os.replace(temporary, where / str(len(seconds)))
            _sync(where)
        except OSError as e:
            raise JournalError(f"{temporary}: cannot write a checkpoint ({e.strerror or e})") from e
        for old in where.iterdir():
            if old.name.isdigit() and int(old.name) < len(seconds):
                shutil.rmtree(old)
