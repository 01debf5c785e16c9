"""The command line shared by every script, and the commands of ``python evaluate.py``.

Every script parses with these parts (one-line errors, option types, the BalancEditConfig options
and the authors' presets, --threads) and checks what a user hands in before any work, cheapest
first: options, device, output, data, model. An output path is claimed by trying: a run that
cannot write it says so at once, in one line naming the option and the path, not after minutes
of work (root passes os.access, then fails). The commands (COMMANDS) run the metrics and
protocols of evaluate.py; ``python evaluate.py`` calls ``main``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

import blip2
import data
import evaluate
import ike
import journal
import mend
import minigpt4
import models
from balancedit import BalancEditConfig, BalancEditor


# ---------------- Output paths, claimed by trying
class OutputError(OSError):
    """An output path that cannot be written, in one line that names the option and path."""


def claim_output(path: Union[str, os.PathLike], flag: str = "--out", folder: bool = False):
    """Try, before any work, that a command can write ``path``: a file, or with ``folder`` the
    folder it fills. Makes the missing folders, creates and removes a file in the one that will
    hold the output, and opens an existing output file for appending (which changes nothing).
    Returns ``cleanup()``, which removes the folders made here if still empty: call it when the
    run fails before writing. Raises OutputError, e.g. "--out /proc/x/r.json: cannot write
    there (No such file or directory)"."""
    path = Path(path)
    where = path if folder else path.parent
    made = [p for p in (where, *where.parents) if not p.exists()]  # deepest first

    def cleanup():
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (or gone): keep it and what holds it
                return

    if path.is_dir() and not folder:
        raise OutputError(f"{flag} {path}: is a folder; give a file's path")
    try:
        where.mkdir(parents=True, exist_ok=True)
        trial = where / f".write-test-{os.getpid()}"
        trial.open("xb").close()  # x: never an existing file
        trial.unlink()
        if path.is_file():
            path.open("ab").close()
    except OSError as e:
        cleanup()
        raise OutputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return cleanup


class UsageError(Exception):
    """Bad command-line input found after parsing: one line, exit status 2."""


def check_writable(path: Path, flag: str = "--out", suffix: str = ".json") -> Callable:
    """Refuse, before any work, an output path with another suffix or that cannot be written
    (found by trying: ``claim_output``). Returns its ``cleanup()``, for a run that fails
    before writing."""
    if path.suffix != suffix:
        raise UsageError(f"{flag} {path}: give a path ending in {suffix}")
    try:
        return claim_output(path, flag)
    except OutputError as e:  # a UsageError for callers: one line, exit status 2
        raise UsageError(str(e)) from None


# ---------------- Option types and the options every script shares


def number(cast: type, ok: Callable, want: str) -> Callable:
    """An argparse type: ``cast(text)`` for which ``ok`` holds, else one line saying ``want``."""

    def parse(text: str):
        try:
            x = cast(text)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return x

    return parse


def comma_list(item: Callable) -> Callable:
    """An argparse type: a comma-separated list, each part parsed by ``item``."""
    return lambda text: [item(t.strip()) for t in text.split(",")]


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump): ``prog: error: message``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


UNIT = number(float, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]")
POSITIVE_INT = number(int, lambda n: n > 0, "a positive integer")
POSITIVE = number(float, lambda x: 0 < x < math.inf, "a positive number")
CONFIG_HELP = {  # the BalancEditConfig options: argparse keywords
    "alpha": dict(type=UNIT, help="Eq. 3 radius interpolation in [0, 1]"),
    "distance": dict(choices=("cos", "euc"), help="key distance (paper Table 6)"),
    "pool": dict(
        choices=("mean", "last"),
        help="the key: the mean over the prompt (the paper's) or its last position",
    ),
    "negative": dict(choices=data.ANCHORS, help="negative anchor image (paper Table 7)"),
    "steps": dict(type=POSITIVE_INT, help="optimizer steps per edit (Eq. 2)"),
    "lr": dict(type=POSITIVE, help="learning rate per edit (Eq. 2)"),
    "value_form": dict(
        choices=("full", "lora"), help="value v_k: a full copy of the layer, or low-rank"
    ),
    "rank": dict(type=POSITIVE_INT, help="rank of a lora value"),
    "seed": dict(type=int, help="seed"),
}


class Preset(NamedTuple):
    """The authors' settings for one backbone: their hparams/BalancEdit/{name}.yaml."""

    backbone: str
    config: dict  # BalancEditConfig fields


# Their Adam: 50 steps (n_iter) at edit_lr 0.01 * 0.01 (their balancedit.py, line 141)
AUTHORS_TRAINING = dict(steps=50, lr=1e-4)
BLIP2_LAYER = "model.language_model.model.decoder.layers.31.fc2"  # inner_params of the yaml
MINIGPT4_LAYER = "llama_model.model.layers.31.mlp.up_proj"
PRESETS = {  # which of their scripts read each file: multimodal_edit.py
    "blip2": Preset("blip2", dict(layer=BLIP2_LAYER, distance="cos", alpha=0.05)),  # OKEDIT
    "blip2_cos": Preset("blip2", dict(layer=BLIP2_LAYER, distance="cos", alpha=0.1)),  # E-VQA
    "blip2_euc": Preset("blip2", dict(layer=BLIP2_LAYER, distance="euc", alpha=0.05)),
    "minigpt4": Preset("minigpt4", dict(layer=MINIGPT4_LAYER, distance="cos", alpha=0.25)),
    "minigpt4_cos": Preset("minigpt4", dict(layer=MINIGPT4_LAYER, distance="cos", alpha=0.35)),
    "minigpt4_euc": Preset("minigpt4", dict(layer=MINIGPT4_LAYER, distance="euc", alpha=0.2)),
}
OUT_HELP = (
    "JSON output path (default: results/main.json for the main job, results/COMMAND.json for "
    "another command; --protocol sequential, or any option off its default, adds to the name: "
    "--methods grace --grace-eps0 4 writes results/main_methods-grace_grace-eps0-4.0.json)"
)


def add_threads(p) -> None:
    """--threads N, for every command line that runs torch on the CPU (call
    ``torch.set_num_threads(args.threads)`` before any work)."""
    p.add_argument(
        "--threads",
        type=POSITIVE_INT,
        default=1,
        help="torch CPU threads (default 1: more threads than idle cores make torch wait on "
        "itself, 5-9x slower on a busy 2-core machine; give it the cores that are idle)",
    )


def default_command(argv: Sequence[str], command: str) -> list[str]:
    """``argv``, with ``command`` put first if it names none (it starts with an option other
    than --help, or is empty)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, command)
    return argv


# ---------------- What a command works on: checked before any work, cheapest first


def load_backbone(args):
    """The backbone named by --backbone, from local files, on --device."""
    if args.backbone == "minigpt4":
        return minigpt4.MiniGPT4.from_pretrained(
            args.blip2, args.model, args.projection, device=args.device
        )
    if args.backbone == "tiny":
        return models.TinyVLM.from_pretrained(
            args.model or models.TINY_DIR, device=args.device or "cpu"
        )
    return blip2.Blip2OPT.from_pretrained(args.model, device=args.device)


def load_records(args) -> tuple[list[data.EditRecord], str]:
    """Records from --data (an OKEDIT folder, or an MMEdit E-VQA json with --coco-root), else
    the shipped sample; and a name for them. Prints how many records were read and how many
    the authors' loaders would skip."""
    roots = ("coco_root", "rephrase_root", "locality_root")
    given = [o for o in (*roots, "counterfact_types") if getattr(args, o) is not None]
    if args.data is None:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --data")
        return data.load_sample(limit=args.limit), f"sample ({data.SAMPLE_DIR.name})"
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    for option in roots:
        root = getattr(args, option)
        if root is not None and not Path(root).is_dir():
            raise UsageError(f"--{option.replace('_', '-')} {root}: no such folder")
    skipped = {}
    if path.is_dir():
        records = data.load_okedit(
            path,
            args.coco_root,
            args.rephrase_root,
            args.locality_root,
            limit=args.limit,
            types=args.counterfact_types,
            skipped=skipped,
        )
    elif path.suffix != ".json":
        raise UsageError(f"--data {path}: neither an OKEDIT folder nor an E-VQA .json file")
    elif args.coco_root is None:
        raise UsageError(
            f"--data {path} is an E-VQA json file: it needs --coco-root DIR, the folder its "
            "image paths are relative to"
        )
    elif args.locality_root is not None or args.counterfact_types is not None:
        raise UsageError(
            f"--data {path} is an E-VQA json file: --locality-root and --counterfact-types "
            "are OKEDIT's"
        )
    else:
        records = data.load_mmedit(
            path, args.coco_root, args.rephrase_root, limit=args.limit, skipped=skipped
        )
    counts = [f"{n} ({reason})" for reason, n in skipped.items()]
    print(f"--data {path}: records read: {len(records)}; skipped: {', '.join(counts) or 'none'}")
    return records, str(path)


def make_config(args, **overrides) -> BalancEditConfig:
    """BalancEditConfig from its defaults, then --preset's settings, the options given (not
    None) and ``overrides``."""
    given = {}
    preset = getattr(args, "preset", None)
    if preset is not None:
        if PRESETS[preset].backbone != args.backbone:
            raise UsageError(
                f"--preset {preset} holds the authors' settings for "
                f"--backbone {PRESETS[preset].backbone}, not {args.backbone}"
            )
        given = {**PRESETS[preset].config, **AUTHORS_TRAINING}
    for option in CONFIG_HELP:
        if getattr(args, option, None) is not None:
            given[option] = getattr(args, option)
    return BalancEditConfig(**{**given, **overrides})


def check_environment(args) -> None:
    """Refuse at once a device this machine cannot run on, and model files that are not on the
    disk (nothing downloads)."""
    n_gpus = torch.cuda.device_count()
    here = ["cpu", *(f"cuda:{i}" for i in range(n_gpus))]  # the devices a run can use
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError:  # a name torch does not know (its message lists every device type)
        device = None
    cuda_here = device is not None and device.type == "cuda" and (device.index or 0) < n_gpus
    if device is None or (device.type != "cpu" and not cuda_here):
        raise UsageError(f"--device {args.device}: not a device to run on here ({', '.join(here)})")
    needs = {"blip2": ("model",), "minigpt4": ("model", "blip2", "projection")}
    for name in needs.get(args.backbone, ()):  # local copies, made as docs/replicate.md says
        path = getattr(args, name)
        if not (path and Path(path).expanduser().exists()):
            raise UsageError(
                f"--backbone {args.backbone} needs --{name}, a local copy "
                "(see docs/replicate.md: nothing downloads)"
            )


MIN_SIDE = 8  # pixels: the smallest edit image worth editing on (the smallest ViT patch we run)


def check_images(records: Sequence[data.EditRecord]) -> None:
    """Refuse, before any work, an edit image too small to show an object (1x1, say): every
    backbone would stretch it to its input size and edit a flat colour. One decode per record
    (the loaders decode images when they are read)."""
    for r in records:
        w, h = r.image.size
        if min(w, h) < MIN_SIDE:
            raise UsageError(
                f"record {r.id}: its edit image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} "
                "is needed to show an object"
            )


@dataclass
class Setup:
    """What a command works on, made by ``setup`` from the options."""

    backbone: object
    records: list
    data_name: str
    cfg: BalancEditConfig
    out: Path  # the JSON output
    cleanup: Callable  # removes the folders made for ``out``, if the run fails before writing
    journal: journal.Journal  # where each scored record goes (a picture's: in memory)
    retriever: object = None  # IKE's sentence encoder (--retriever), else its own default


def setup(args) -> Setup:
    """Everything that can fail on bad input, cheapest first (options, device, output, data, the
    journal, the model). The output is claimed by trying (``claim_output``), and released if a
    later check fails."""
    cfg = make_config(args)
    check_environment(args)
    out = output_path(args)
    scores = not args.command.startswith("show")  # a picture scores nothing: no journal
    cleanup = check_writable(out, suffix=".png" if args.out and not scores else ".json")
    out = out.with_suffix(".json")  # a picture's numbers go beside it
    try:
        records, data_name = load_records(args)
        n = len(records)
        if n == 0:
            raise UsageError(f"no records in {data_name}")
        if not 0 <= getattr(args, "record", 0) < n:
            raise UsageError(f"{n} records in {data_name}: --record is an index, 0..{n - 1}")
        check_images(records)
        log = journal.Journal()
        if scores:
            head = journal_header("evaluate.py", args, journal.fingerprint(records))
            log = journal.Journal(out.with_suffix(".journal"), head, args.checkpoint_every)
            if not args.fresh:
                log.check()  # before the model's minutes
        methods = getattr(args, "methods", ())
        folder = getattr(args, "retriever", None)
        retriever = ike.SentenceEncoder(folder) if folder and "ike" in methods else None
        backbone = load_backbone(args)
        backbone.check(records)  # targets it cannot spell, questions too long for it
        if "mend" in methods or "ike" in methods:  # a shipped world's model, or one line
            mend.shipped(backbone)  # MEND's editor; IKE's demonstrations are its world's
        if "ike" in methods:  # a prompt too long for the model: refused before any work
            ike_editor = evaluate.make_editor("ike", backbone, cfg, retriever=retriever)
            for r in records:
                ike_editor.remove(ike_editor.edit(r).index)
        log.open(getattr(args, "fresh", False))  # resumed, or with --fresh begun again
    except BaseException:
        cleanup()
        raise
    torch.manual_seed(cfg.seed)
    return Setup(backbone, records, data_name, cfg, out, cleanup, log, retriever)


# ---------------- Long runs: the journal, several processes, a stop in one line
NOT_IN_HEADER = ("command", "out", "progress", "threads", "fresh", "checkpoint_every")  # no score
UNNAMED = (*NOT_IN_HEADER, "device", "protocol")  # not in an output name


def journal_header(prog: str, args, data_hash: str) -> dict:
    """The header of a run's journal: the command, the options that change what it scores (the
    paths apart), the data's hash, a hash of the files the model is loaded from, the code's."""
    options = {k: v for k, v in vars(args).items() if k not in (*NOT_IN_HEADER, *PATHS)}
    paths = {k: str(v) for k, v in vars(args).items() if k in PATHS and v is not None}
    files = [paths[o] for o in ("model", "blip2", "projection") if o in paths] or [models.TINY_DIR]
    checkpoint = journal.files_hash(*files)
    return journal.header(f"{prog} {args.command}", options, paths, data_hash, checkpoint)


def check_spread(args) -> None:
    """Refuse, under torchrun, a command that cannot spread its records over processes."""
    if args.protocol == "sequential" or args.command.startswith("show"):
        what = args.command if args.command.startswith("show") else "--protocol sequential"
        why = "it draws one picture" if "show" in what else "each edit builds on the ones before"
        raise UsageError(f"{what} runs in one process ({why}): run it without torchrun")


# ---------------- The commands of evaluate.py


def header(args, s: Setup) -> dict:
    """The run's settings, at the top of every JSON output."""
    return {
        "backbone": args.backbone,
        "model": args.model,
        "data": s.data_name,
        "protocol": args.protocol,
        "config": asdict(s.cfg),
    }


def cmd_run(args, s: Setup) -> dict:
    """Each method of --methods under --protocol."""
    refs = {}  # the pre-edit observations, made once for every method
    results = {}
    for name in args.methods:
        results[name] = evaluate.run_method(
            name,
            s.backbone,
            s.records,
            s.cfg,
            args.protocol,
            refs,
            args.progress,
            s.journal.part(name),
            args.grace_eps0,
            s.retriever,
        )
    if s.journal.rank == 0:
        print(evaluate.table(results))
    return {**header(args, s), "grace_eps0": args.grace_eps0, "methods": results}


def ablate(parameter: str, values: Sequence = ()) -> Callable:
    """The command for an ablation: BalancEdit under --protocol once per value of one config
    field (``values``, else --alphas); sweep-alpha also draws paper Fig. 5."""

    def command(args, s: Setup) -> dict:
        refs = {}  # the pre-edit observations, made once for every value
        results = {}
        for v in values or args.alphas:
            cfg = make_config(args, **{parameter: v})
            log = s.journal.part(f"{parameter}={v}")
            results[str(v)] = evaluate.run_method(
                "balancedit", s.backbone, s.records, cfg, args.protocol, refs, args.progress, log
            )
        if s.journal.rank > 0:  # the first process reports
            return {}
        print(evaluate.table(results, first=parameter))
        if parameter == "alpha":
            import pictures  # only a picture needs it

            pictures.plot_sweep(results, "alpha", s.out.with_suffix(".png"))
        return {**header(args, s), "parameter": parameter, "settings": results}

    return command


def cmd_show_edit(args, s: Setup) -> dict:
    """One edit's probes against its radius: why each was, or was not, edited (Eq. 3)."""
    import pictures  # only a picture needs it

    record = s.records[args.record]
    report, probes = pictures.edit_probes(BalancEditor(s.backbone, s.cfg), record)
    title = f"--record {args.record} (id {record.id}): {record.question!r} -> {record.target!r}"
    pictures.show_edit(report, probes, s.out.with_suffix(".png"), title)
    drawn = {"record": args.record, "record_id": record.id, **report, "probes": probes}
    return {**header(args, s), **drawn}


def cmd_show_codebook(args, s: Setup) -> dict:
    """The codebook after editing every record in order, its keys and balls in 2-D (Fig. 7)."""
    import pictures  # only a picture needs it

    editor = BalancEditor(s.backbone, s.cfg)
    for record in evaluate.progress_bar(s.records, args.progress, "edits"):
        editor.edit(record)
    drawn = pictures.show_codebook(editor, s.records, s.out.with_suffix(".png"))
    return {**header(args, s), **drawn}


class Command(NamedTuple):
    """A command of the command line: what it runs, its help line, what it leaves out."""

    run: Callable  # (args, Setup) -> the JSON output
    help: str
    sets: Optional[str] = None  # the config option an ablation sets itself, not an option


COMMANDS = {
    "run": Command(cmd_run, "evaluate methods (the default command)"),
    "sweep-alpha": Command(
        ablate("alpha"), "BalancEdit for each alpha: table + PNG plot (paper Fig. 5)", "alpha"
    ),
    "ablate-distance": Command(
        ablate("distance", ["cos", "euc"]),
        "BalancEdit with cos vs euc distance (paper Table 6)",
        "distance",
    ),
    "ablate-negative": Command(
        ablate("negative", data.ANCHORS),
        "BalancEdit with black/white/noise negatives (paper Table 7)",
        "negative",
    ),
    "show-edit": Command(
        cmd_show_edit, "a picture of one edit's probes against its radius (--out FILE.png)"
    ),
    "show-codebook": Command(
        cmd_show_codebook, "a picture of the codebook after sequential edits (--out FILE.png)"
    ),
}
PATHS = (  # named by their last part
    "model",
    "blip2",
    "projection",
    "data",
    "coco_root",
    "rephrase_root",
    "locality_root",
    "retriever",
)


def output_path(args: argparse.Namespace) -> Path:
    """The file a command writes: --out (for a picture, its .png), else ``default_out``."""
    return Path(args.out or default_out(args))


def default_out(args: argparse.Namespace) -> str:
    """Where a command writes without --out: results/main.json for the main job (``run`` with
    every default), else a name of its own: the command, _sequential, and each option that
    differs from its default, e.g. results/main_methods-grace_grace-eps0-4.0.json."""
    name = "main" if args.command == "run" else args.command.replace("-", "_")
    if args.protocol != "single":
        name += f"_{args.protocol}"
    defaults = vars(build_parser().parse_args([args.command]))
    for option, value in vars(args).items():
        if option in UNNAMED or value == defaults.get(option):
            continue
        if option in PATHS:
            value = Path(value).name
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        text = re.sub(r"[^\w.,+-]+", "-", f"{option}-{value}")  # no / or spaces in a name
        name += "_" + text.replace("_", "-")
    return f"results/{name}.json"


def add_data(g) -> None:
    """The options of ``load_records``: where the records come from, and how many."""
    g.add_argument(
        "--data",
        help="OKEDIT as the authors release it (the folder of "
        f"{data.ANNOTATION_FILES[0]}), or an E-VQA .json with --coco-root "
        "(default: the shipped sample)",
    )
    g.add_argument(
        "--coco-root",
        help="the folder holding val2014/ (OKEDIT; default: --data), or the folder an E-VQA "
        "json's image and m_loc paths are relative to",
    )
    g.add_argument(
        "--rephrase-root",
        help="OKEDIT: the folder of a {question_id}/ of rephrase images each (default: "
        f"--data/{data.REPHRASE_DIR}); E-VQA: the folder image_rephrase paths are relative "
        "to (default: --coco-root)",
    )
    g.add_argument(
        "--locality-root",
        help="OKEDIT: the folder of a {question_id}/ of locality images each, 0.png asked "
        f"(default: --data/{data.LOCALITY_DIR})",
    )
    g.add_argument(
        "--counterfact-types",
        type=comma_list(str),
        help="OKEDIT: keep only these counterfact_types, a comma list (e.g. 'text based')",
    )
    g.add_argument(
        "--limit", type=POSITIVE_INT, help="first N records only (nothing after them is read)"
    )


def add_common(p: argparse.ArgumentParser, name: str) -> None:
    """The backbone, data and config options of every command."""
    g = p.add_argument_group("backbone and data")
    g.add_argument(
        "--backbone", choices=("tiny", "blip2", "minigpt4"), default="tiny", help="default: tiny"
    )
    g.add_argument(
        "--model",
        help="tiny: checkpoint dir (default assets/tinyvlm); blip2: a BLIP-2 OPT model "
        "dir; minigpt4: a Vicuna dir (local copies: nothing is downloaded)",
    )
    g.add_argument(
        "--blip2",
        help="minigpt4: a BLIP-2 dir for the ViT and Q-Former (Salesforce/blip2-flan-t5-xxl)",
    )
    g.add_argument(
        "--projection", help="minigpt4: MiniGPT-4's released checkpoint (.pth, read weights-only)"
    )
    add_data(g)
    g.add_argument(
        "--device", help="torch device (default: cpu for tiny, cuda if available for blip2)"
    )
    g.add_argument(
        "--protocol", choices=tuple(evaluate.PROTOCOLS), default="single", help="default: single"
    )
    g.add_argument("--out", help=OUT_HELP)
    add_threads(g)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    if not name.startswith("show"):  # the commands that score records
        add_journal(p)
    c = p.add_argument_group("BalancEditConfig (default: the config's own defaults)")
    c.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="the authors' settings (their hparams/BalancEdit/PRESET.yaml): layer, distance, "
        "alpha, 50 steps at lr 1e-4; the options below override it",
    )
    for option, kwargs in CONFIG_HELP.items():
        if option != COMMANDS[name].sets:  # an ablation sets its own
            c.add_argument("--" + option.replace("_", "-"), **kwargs)  # dest: option


JOURNAL_HELP = (
    "Each record is journaled as it is scored, beside the output (NAME.journal for NAME.json). "
    "To resume a stopped run (a kill, Ctrl-C, a full disk), run the same command again: no "
    "flag, so that a retry resumes. A journal of another run is refused. It is removed once "
    "the output is written."
)


def add_journal(p, checkpoints: bool = True) -> None:
    """--fresh, and with ``checkpoints`` --checkpoint-every: the journal's options."""
    g = p.add_argument_group("long runs", JOURNAL_HELP)
    fresh = "start again, keeping the journal there as NAME.journal.old-N"
    g.add_argument("--fresh", action="store_true", help=fresh)
    if checkpoints:
        every = "sequential protocol: save the editor every N edits and after the last (default 20)"
        g.add_argument("--checkpoint-every", type=POSITIVE_INT, default=20, metavar="N", help=every)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="evaluate.py",
        allow_abbrev=False,
        description="Score model editors (paper Appendix C). With no command: run (TinyVLM, "
        "the shipped sample, every method, single edits). Across many worlds: python study.py. "
        "Single edits over N processes (GPUs): torchrun --nproc-per-node N evaluate.py ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        add_common(p, name)
    run = sub.choices["run"]
    methods = evaluate.METHODS
    method = number(str, methods.__contains__, f"one of {','.join(methods)}")
    listed = f"comma list of {','.join(methods)} (default: all)"
    run.add_argument("--methods", type=comma_list(method), default=list(methods), help=listed)
    eps0 = "GRACE's fixed initial radius, Euclidean (default 1.0, GRACE's own)"
    run.add_argument("--grace-eps0", type=POSITIVE, default=1.0, help=eps0)
    folder = "IKE's retriever: a sentence-transformers folder such as all-MiniLM-L6-v2, EasyEdit's"
    run.add_argument("--retriever", metavar="DIR", help=f"{folder} (default: word counts)")
    sub.choices["show-edit"].add_argument(
        "--record", type=int, default=0, help="which record: its index, 0 the first (default 0)"
    )
    sub.choices["sweep-alpha"].add_argument(
        "--alphas",
        type=comma_list(UNIT),
        default=[i / 10 for i in range(11)],
        help="comma list of alphas in [0, 1] (default 0,0.1,...,1)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; with no command, ``run``."""
    argv = default_command(argv, "run")
    return build_parser().parse_args(argv)  # bad options: one error line, exit 2


def main(argv: Optional[list[str]] = None) -> int:
    """Check everything, run the command (under torchrun, each process its share of the
    records), then the first process writes the output, through a temporary file."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world = journal.processes()
    try:
        if world > 1:
            check_spread(args)
            journal.join(world)
        s = setup(args)
    except (UsageError, journal.JournalError, OSError, ValueError, RuntimeError) as e:
        build_parser().exit(2, f"evaluate.py {args.command}: error: {e}\n" if rank == 0 else None)
    if world > 1 and rank == 0:
        print(f"{len(s.records)} records spread over {world} processes")

    def work():
        result = COMMANDS[args.command].run(args, s)
        if rank == 0:
            journal.write_atomic(s.out, json.dumps(result, indent=1) + "\n")
            print(f"wrote {s.out}")
        s.journal.finish()

    return journal.guarded(f"evaluate.py {args.command}", argv, s.journal, work, s.cleanup)
