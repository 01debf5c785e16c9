"""Results that survive another world: the main comparison, on fresh samples of the TinyVLM world.

A table from one sample, with alpha tuned on that same sample, proves little. Here each
method's one radius knob (BalancEdit's alpha, GRACE's eps0) is chosen by HM on dev worlds and
then frozen, and every method runs on test worlds it never saw: ``world.make_records(seed)`` for
seeds 1..N, disjoint from the shipped sample's seed 0 and from the dev seeds. Single edits, and
sequential edits at 10, 20 and 40 (how generality and locality fall as the codebook fills);
mean +- std over the test seeds.

    python study.py [--seeds 5] [--out results/study.json]   # also .md and .png beside it
    python study.py ablate-key [--seeds 5]                   # three keys, tuned the same way
    python study.py --world easyvqa [--seeds 5]              # the same on easy-VQA (easyvqa.py)
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

import cli
import data
import easyvqa
import evaluate as ev
import ike
import journal
import mend
import models
import pictures
import world
from balancedit import BalancEditor, Probe, Router, distance, prompt_key

DEV_SEEDS = (1001, 1002)  # tuning worlds; the test worlds are 1..N (N <= 1000)
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # BalancEdit's grid for alpha (Eq. 3)
EPS0S = (0.5, 1.0, 2.0, 4.0, 8.0)  # GRACE's grid for eps0 (Euclidean, at TinyVLM's layer)
SIZES = (10, 20, 40)  # sequential: edits in the codebook
N_RECORDS = 40  # records per world (make_records' default)


class World(NamedTuple):
    """Where a study's records come from, and the TinyVLM trained there."""

    records: Callable  # (seed, dev) -> N_RECORDS records; dev: a tuning world's
    model: Path


WORLDS = {
    "tiny": World(lambda seed, dev: world.make_records(seed, N_RECORDS), models.TINY_DIR),
    "easyvqa": World(  # dev and test worlds draw from disjoint halves of the test images
        lambda seed, dev: easyvqa.make_records(seed, N_RECORDS, "dev" if dev else "test"),
        easyvqa.MODEL_DIR,
    ),
}


# ---------------- The authors' key, for ablate-key only
class EveryPositionRouter(Router):
    """The query over every attended position of a full forward, the teacher-forced answer
    included (the call's attention mask); a KV-cache decoding step still holds its prompt's
    route."""

    def __init__(self, model, layer_path, codebook):
        super().__init__(model, layer_path, codebook)
        self.attention_mask = None  # (B, T) of the model's call in progress
        self.reader = model.register_forward_pre_hook(self.read_attention, with_kwargs=True)

    def read_attention(self, model, args, kwargs):
        self.attention_mask = kwargs.get("attention_mask")

    def detach(self) -> None:
        super().detach()
        self.reader.remove()

    def query(self, h, prompt):
        every = self.attention_mask
        if every is None or every.shape != prompt.shape:  # a decoding step, or no mask at all
            return super().query(h, prompt)
        return prompt_key(h, every.to(h.device, torch.bool))  # (B, D)


class EveryPosition(BalancEditor):
    """BalancEdit with the authors' key: the mean of h^{l-1} over every position of the edit's
    teacher-forced input, the target answer included (for k, Pos and Neg alike)."""

    def keys_of(self, images, questions) -> torch.Tensor:
        answers = [self.target] * len(questions)
        batch = self.backbone.to_device(self.backbone.encode(images, questions, answers))
        every = batch["attention_mask"].bool()  # (B, T): the prompt and the answer
        return prompt_key(self.backbone.layer_input(batch, self.layer_path), every)  # (B, D)

    def edit(self, record):
        self.target = record.target  # the answer that keys_of appends
        return super().edit(record)

    def probe(self, record, image):
        """k, d(Pos, k) and d(Neg, k) from the authors' keys (one more forward); the edit's row
        and its tail for Eq. 2 as BalancEdit's."""
        ours = super().probe(record, image)
        cfg = self.config
        black = data.anchor_image(cfg.negative, image.size, seed=cfg.seed)
        images = [image, image, black]
        questions = [record.question, self.positive_question(record), record.question]
        keys = self.keys_of(images, questions)  # (3, D) over every attended position
        d = distance(keys[1:], keys[:1], cfg.distance)  # (2, 1): d(Pos, k), d(Neg, k)
        return Probe(keys[0], float(d[0, 0]), float(d[1, 0]), ours.batch, ours.tail)

    def attached(self) -> Router:
        return EveryPositionRouter(self.backbone, self.layer_path, self.codebook)


# ---------------- The rows of a comparison
class Row(NamedTuple):
    """A method of a comparison: its knob, tuned on the dev worlds, and the knob's grid."""

    knob: Optional[str]  # None: nothing to tune
    grid: Sequence
    make: Optional[Callable]  # (backbone, cfg, value) -> the method; None: the unedited model


STUDY_ROWS = {
    "base": Row(None, (None,), None),
    "ft": Row(None, (None,), lambda b, cfg, v: ev.make_editor("ft", b, cfg)),
    "grace": Row("eps0", EPS0S, lambda b, cfg, v: ev.make_editor("grace", b, cfg, v)),
    "balancedit": Row(
        "alpha", ALPHAS, lambda b, cfg, v: BalancEditor(b, replace(cfg, alpha=v, pool="mean"))
    ),
    "balancedit_last": Row(
        "alpha", ALPHAS, lambda b, cfg, v: BalancEditor(b, replace(cfg, alpha=v, pool="last"))
    ),
    "mend": Row(None, (None,), lambda b, cfg, v: ev.make_editor("mend", b, cfg)),
    "ike": Row(None, (None,), lambda b, cfg, v: ev.make_editor("ike", b, cfg)),
}
KEY_ROWS = {  # ablate-key: BalancEdit with each key
    "prompt mean (ours)": STUDY_ROWS["balancedit"],
    "every position (authors' code)": Row(
        "alpha", ALPHAS, lambda b, cfg, v: EveryPosition(b, replace(cfg, alpha=v))
    ),
    "last prompt token (GRACE's)": STUDY_ROWS["balancedit_last"],
}


def stats(results: list[dict]) -> dict:
    """{column: {"mean", "std", "per_seed"}} over the test worlds (std: the sample's, 0 for one)."""
    out = {}
    for column in (*ev.COLUMNS, "seconds_per_edit"):
        xs = [r[column] for r in results]
        ok = [x for x in xs if x is not None]
        if not ok:
            std = None
        elif len(ok) == 1:
            std = 0.0
        else:
            std = statistics.stdev(ok)
        out[column] = {
            "mean": statistics.fmean(ok) if ok else None,
            "std": std,
            "per_seed": xs,
        }
    return out


def tune(rows: dict, run: Callable) -> dict:
    """Each row's knob by mean HM over the dev worlds (single edits; ties: the first in the
    grid): {name: {knob: value, "dev_hm": {value: HM}}} for the rows that have a knob.
    ``run(name, seed, protocol, n, value)`` is one result."""
    tuned = {}
    for name, row in rows.items():
        if row.knob:
            hm = {}
            for v in row.grid:
                hm[v] = statistics.fmean(
                    run(name, s, "single", N_RECORDS, v)["hm"] for s in DEV_SEEDS
                )
            best = max(row.grid, key=hm.get)  # ties: the first in the grid
            tuned[name] = {row.knob: best, "dev_hm": {str(v): x for v, x in hm.items()}}
    return tuned


def runner(backbone, cfg, rows: dict, world_name: str, log: journal.Journal, bar) -> Callable:
    """``run(name, seed, protocol, n, value)``: one result of a row on a world, each record
    journaled in ``log`` under the run's label, which ``bar`` shows. A world's records, and
    their pre-edit observations, are made once, when first needed."""
    worlds = {}

    def run(name, seed, protocol, n, value):
        row = rows[name]
        setting = f" {row.knob}={value}" if value is not None else ""
        edits = "single edits" if protocol == "single" else f"{n} edits"
        label = f"world {seed}: {name}{setting}, {edits}"
        bar.set_description(label)
        if seed not in worlds:  # records, and their pre-edit observations by id
            worlds[seed] = (WORLDS[world_name].records(seed, seed in DEV_SEEDS), {})
        records, refs = worlds[seed]
        part = log.part(label)
        resumed = part.resumed(records[:n])
        if row.make is None:
            result = ev.run_base(backbone, records, False, refs, part)
        else:
            method = row.make(backbone, cfg, value)
            result = ev.PROTOCOLS[protocol](method, backbone, records[:n], False, refs, part)
        bar.update(n - resumed)
        return result

    return run


def compare(
    backbone,
    cfg,
    rows: dict,
    seeds: list[int],
    sizes,
    progress: bool = True,
    world_name: str = "tiny",
    log: Optional[journal.Journal] = None,
) -> dict:
    """Tune each row's knob on the dev worlds (``tune``) and freeze it, then run every row on the
    test worlds: single edits, and sequential at each of ``sizes``. ``world_name``: a key of
    WORLDS, where the records come from; ``log``: the journal that holds each scored record
    (default: one in memory), so that a stopped study resumes by world and method."""
    log = journal.Journal() if log is None else log
    knobs = sum(len(DEV_SEEDS) * len(row.grid) * N_RECORDS for row in rows.values() if row.knob)
    edits = sum(N_RECORDS + sum(sizes) * (row.make is not None) for row in rows.values())
    resumed = len(log.lines)  # records read back from the journal
    bar = ev.progress_bar(range(knobs + len(seeds) * edits - resumed), progress, "study", resumed)
    run = runner(backbone, cfg, rows, world_name, log, bar)
    tuned = tune(rows, run)
    # the value of each row's knob from now on (None: nothing to tune)
    frozen = {name: tuned[name][row.knob] if row.knob else None for name, row in rows.items()}
    single = {}
    for name in rows:
        single[name] = stats([run(name, s, "single", N_RECORDS, frozen[name]) for s in seeds])
    sequential = {}
    for n in sizes:
        sequential[str(n)] = {}
        for name, row in rows.items():
            if row.make is not None:  # the unedited model has no edits to add up
                results = [run(name, s, "sequential", n, frozen[name]) for s in seeds]
                sequential[str(n)][name] = stats(results)
    bar.close()
    return {
        "world": world_name,
        "seeds": {"dev": list(DEV_SEEDS), "test": seeds},
        "tuned": tuned,
        "single": single,
        "sequential": sequential,
    }


def mean_std(cell: dict) -> str:
    """A table cell: mean ± std over the test worlds, "-" if it was not measured."""
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def report(result: dict, title: str) -> str:
    """The markdown of a comparison: the tuned knobs, single edits, then each sequential size."""
    knobs = []
    for name, values in result["tuned"].items():
        knobs += [f"{name} {k}={v}" for k, v in values.items() if k != "dev_hm"]
    parts = [
        f"# {title}",
        f"World: {result['world']}. Test worlds (seeds) {result['seeds']['test']}; knobs tuned "
        f"on the dev worlds {result['seeds']['dev']} by HM: {', '.join(knobs) or 'none'}. "
        "Cells: mean ± std over the test worlds.",
        "## Single edits",
        ev.table(result["single"], cell=mean_std, seconds=False),
    ]
    for n, rows in result["sequential"].items():
        parts.append(f"## Sequential, {n} edits")
        parts.append(ev.table(rows, cell=mean_std, seconds=False))
    return "\n\n".join(parts) + "\n"


# ---------------- Command line
HELP = {
    "study": "FT, GRACE, BalancEdit (both keys), MEND and IKE on fresh TinyVLM worlds, knobs "
    "tuned on dev worlds: mean +- std over test worlds, single and 10/20/40 sequential edits",
    "ablate-key": "BalancEdit's key three ways (prompt mean, every position as the authors' "
    "code, last prompt token), alpha tuned as in study: single and 40 sequential edits",
}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="study.py",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nWith no command: study.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, text in HELP.items():
        p = sub.add_parser(command, help=text, description=text + ".", allow_abbrev=False)
        p.add_argument(
            "--seeds",
            type=cli.number(int, lambda n: 1 <= n <= 1000, "an integer in 1..1000"),
            default=5,
            help=f"test worlds: seeds 1..N (default 5); the dev worlds are seeds {DEV_SEEDS}",
        )
        p.add_argument(
            "--world",
            choices=tuple(WORLDS),
            default="tiny",
            help="where the records come from: the project's world (default), or easy-VQA's "
            "test images with a TinyVLM trained on its train split (pip install easy-vqa)",
        )
        p.add_argument(
            "--model",
            help="TinyVLM checkpoint dir (default: the world's, assets/tinyvlm or "
            "assets/tinyvlm_easyvqa)",
        )
        p.add_argument("--device", help="torch device (default: cpu)")
        default = f"results/{command.replace('-', '_')}.json"
        p.add_argument(
            "--out",
            help=f"JSON output; the .md (and .png) go beside it (default: {default}, "
            f"{default[:-5]}_easyvqa.json for --world easyvqa)",
        )
        cli.add_threads(p)
        p.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bar"
        )
        cli.add_journal(p, checkpoints=False)
        c = p.add_argument_group("BalancEditConfig (alpha is tuned; each row sets its key)")
        for option, kwargs in cli.CONFIG_HELP.items():
            if option not in ("alpha", "pool"):
                c.add_argument("--" + option.replace("_", "-"), **kwargs)  # dest: option
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``[study | ablate-key] [options]``; with no command, study. Bad options: one error line,
    exit 2."""
    args = build_parser().parse_args(cli.default_command(argv, "study"))
    args.backbone = "tiny"  # what cli's checks and loader read
    if args.model is None:
        args.model = str(WORLDS[args.world].model)
    if args.out is None:
        suffix = "" if args.world == "tiny" else f"_{args.world}"
        args.out = f"results/{args.command.replace('-', '_')}{suffix}.json"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Check the options, run the comparison (resumed from its journal), write the JSON, the .md
    (and, for study, the .png)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        if journal.processes()[1] > 1:
            raise cli.UsageError("study.py runs in one process: run it without torchrun")
        cli.check_environment(args)
        if args.world == "easyvqa":
            easyvqa.package()  # one line if easy-vqa is not installed
        cfg = cli.make_config(args)
        cleanup = cli.check_writable(out)  # by trying: makes the folder, removed if we fail
        backbone, log = prepare(args, out, cleanup)
    except (cli.UsageError, journal.JournalError, OSError, ValueError, RuntimeError) as e:
        build_parser().exit(2, f"study.py {args.command}: error: {e}\n")

    def work():
        comparison(args, backbone, cfg, out, log)
        log.finish()

    return journal.guarded(f"study.py {args.command}", argv, log, work, cleanup)


def prepare(args, out: Path, cleanup) -> tuple:
    """The backbone and the journal (resumed, or with --fresh begun again), another run's
    journal refused before the model is loaded; ``cleanup()`` if either fails."""
    try:
        log = journal.Journal(out.with_suffix(".journal"), header(args))
        if not args.fresh:
            log.check()
        backbone = cli.load_backbone(args)
        if args.command == "study" and {"mend", "ike"} & set(STUDY_ROWS):
            mend.shipped(backbone)  # MEND's editor and IKE's world for this model, or one line
        return backbone, log.open(args.fresh)
    except BaseException:
        cleanup()
        raise


def header(args) -> dict:
    """The header of the study's journal: its options, and a hash of every world's records (as
    generated here and now: a change of world.py, of easy-VQA's files or of PIL's drawing would
    change them)."""
    seeds = [*DEV_SEEDS, *range(1, args.seeds + 1)]
    records = [r for s in seeds for r in WORLDS[args.world].records(s, s in DEV_SEEDS)]
    return cli.journal_header("study.py", args, journal.fingerprint(records))


def comparison(args, backbone, cfg, out: Path, log: journal.Journal) -> None:
    """The comparison of ``args.command``; writes its JSON, .md (and .png), each through a
    temporary file."""
    torch.manual_seed(cfg.seed)
    if args.command == "study":
        rows = {n: r for n, r in STUDY_ROWS.items() if n != "ike" or ike.reads_prompts(backbone)}
        if len(rows) < len(STUDY_ROWS):
            print("IKE left out: this TinyVLM was never taught to read a fact in its prompt")
        sizes = SIZES
    else:
        rows = KEY_ROWS
        sizes = SIZES[-1:]
    seeds = list(range(1, args.seeds + 1))
    result = {
        "model": args.model,
        "config": asdict(cfg),
        **compare(backbone, cfg, rows, seeds, sizes, args.progress, args.world, log),
    }
    text = HELP[args.command]
    text = report(result, text[0].upper() + text[1:])  # the help line, capitalised, as title
    print(text)
    journal.write_atomic(out, json.dumps(result, indent=1) + "\n")
    journal.write_atomic(out.with_suffix(".md"), text)
    if args.command == "study":
        pictures.plot_study(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
