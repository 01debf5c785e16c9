"""Score model editors: the paper's metrics (Appendix C), protocols, ablations and command line.

For an edit (i, t, y^o -> y^n) of an ``EditRecord`` (data.py), on the edited model f_e, in
percent: Acc (Eq. 4) f_e(i, t) = y^n; T-Gen (Eq. 5) the same on rephrased questions; I-Gen
(Eq. 6) on other images of the same scope; Loc (Eq. 7) f_e = f on similar out-of-scope samples,
f the unedited model (q_loc: the edit's images asked other questions; m_loc: unrelated samples);
HM of T-Gen, I-Gen and Loc. "= y^n" is teacher-forced token accuracy, as in the authors' and
EasyEdit's code (EOS not counted); Loc compares post- with pre-edit argmax tokens. ``gen_*``:
exact match of greedy generations.

Protocols: single (each edit alone: edit, score, remove; Table 3) and sequential (all edits,
then every record; Table 4); both check at the end that the backbone is bit-identical to before.
The methods: the unedited model, the baselines of baselines.py (FT, GRACE) and BalancEdit.

    python evaluate.py [--protocol sequential]   # TinyVLM, the shipped sample, every method
    python evaluate.py sweep-alpha | ablate-distance | ablate-negative   # Fig. 5, Tables 6, 7
    python evaluate.py show-edit | show-codebook   # pictures of Eq. 3 and of Fig. 7
"""

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

import data
import models
import pictures
from balancedit import BalancEditConfig, BalancEditor
from baselines import FineTune, Grace

# ---------------- Metrics on predictions (pure Python: testable on hand-made token lists)
PARTS = ("acc", "t_gen", "i_gen", "loc", "q_loc", "m_loc")  # what a record is probed on
TARGET_PARTS = ("acc", "t_gen", "i_gen")  # scored against the target y^n
LOCALITY_PARTS = ("loc", "q_loc", "m_loc")  # scored against the pre-edit model
GEN_PARTS = ("acc", "t_gen", "i_gen", "loc", "q_loc")  # also scored by generation (gen_*)
HEADERS = {  # the tables' columns (keys of a result) and their headers
    "acc": "Acc",
    "t_gen": "T-Gen",
    "i_gen": "I-Gen",
    "loc": "Loc",
    "q_loc": "q_loc",
    "hm": "HM",
    "gen_acc": "gen Acc",
    "gen_t_gen": "gen T-Gen",
    "gen_i_gen": "gen I-Gen",
    "gen_loc": "gen Loc",
    "gen_q_loc": "gen q_loc",
}
COLUMNS = tuple(HEADERS)


def hm(t_gen: Optional[float], i_gen: Optional[float], loc: Optional[float]) -> Optional[float]:
    """Harmonic mean of T-Gen, I-Gen and Loc (Table 3): 3 / (1/a + 1/b + 1/c); 0 if any is 0
    (the formula's limit), None if any is None (not measured)."""
    xs = (t_gen, i_gen, loc)
    if any(x is None for x in xs):
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def token_accuracy(
    predicted: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
) -> Optional[float]:
    """Mean over samples of the fraction of a sample's tokens where predicted == reference, in %.
    Reference: the answer's tokens (Acc, T-Gen, I-Gen) or the pre-edit argmax tokens (Loc)."""
    assert len(predicted) == len(reference)
    assert all(len(p) == len(r) > 0 for p, r in zip(predicted, reference))
    if not predicted:
        return None
    per_sample = [sum(a == b for a, b in zip(p, r)) / len(r) for p, r in zip(predicted, reference)]
    return 100.0 * sum(per_sample) / len(per_sample)


def exact_match(generated: Sequence[str], reference: Sequence[str]) -> Optional[float]:
    """Percent of samples whose generated string equals the reference; None for no samples."""
    assert len(generated) == len(reference)
    if not generated:
        return None
    same = sum(g.strip() == r.strip() for g, r in zip(generated, reference))
    return 100.0 * same / len(generated)


def mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Observation:
    """One model on one record's probes: per sample, (argmax, answer) tokens without EOS, and the
    generated answers."""

    tokens: dict[str, list[tuple[list[int], list[int]]]]
    texts: dict[str, list[str]]


def score(post: Observation, pre: Observation, target: str) -> dict[str, Optional[float]]:
    """One record's metrics: the edited model's observation ``post`` against the target y^n
    (Eqs. 4-6) and against the unedited model's observation ``pre`` (Eq. 7)."""
    m: dict[str, Optional[float]] = {}
    for part in TARGET_PARTS:  # Eqs. 4-6: f_e(.) = y^n
        predicted = [p for p, _ in post.tokens[part]]
        m[part] = token_accuracy(predicted, [y for _, y in post.tokens[part]])
    for part in LOCALITY_PARTS:  # Eq. 7: f_e(i_l, t_l) = f(i_l, t_l)
        predicted = [p for p, _ in post.tokens[part]]
        m[part] = token_accuracy(predicted, [p for p, _ in pre.tokens[part]])
    for part in GEN_PARTS:
        if part in LOCALITY_PARTS:
            reference = pre.texts[part]
        else:
            reference = [target] * len(post.texts[part])
        m[f"gen_{part}"] = exact_match(post.texts[part], reference)
    return m


def summarize(rows: list[dict], seconds: Optional[list[float]]) -> dict:
    """Average per-record metrics into one method's result (HM of the averages, as the paper)."""
    keys = list(rows[0]) if rows else list(PARTS)
    out = {k: mean([r[k] for r in rows]) for k in keys}
    out["hm"] = hm(out["t_gen"], out["i_gen"], out["loc"])
    out["seconds_per_edit"] = mean(seconds) if seconds is not None else None
    out["n_records"] = len(rows)
    return out


# ---------------- Observing a backbone (batched forward passes and generations)


def probes(record: data.EditRecord) -> dict[str, list[data.Sample]]:
    """The (image, question, answer) samples each metric is measured on."""
    y = record.target
    return {
        "acc": [data.Sample(record.image, record.question, y)],  # Eq. 4
        "t_gen": [data.Sample(record.image, q, y) for q in record.rephrases],  # Eq. 5
        "i_gen": [data.Sample(im, record.question, y) for im in record.rephrase_images],  # Eq. 6
        "loc": list(record.locality),  # Eq. 7
        "q_loc": list(record.q_locality),
        "m_loc": list(record.m_locality),
    }


def _batches(samples: Sequence[data.Sample], batch_size: int):
    """Index chunks of at most batch_size samples, never mixing image and text-only samples
    (the backbones' encode takes one or the other)."""
    for has_image in (True, False):
        idx = [i for i, s in enumerate(samples) if (s.image is not None) == has_image]
        for k in range(0, len(idx), batch_size):
            yield idx[k : k + batch_size]


def token_predictions(
    backbone, samples: Sequence[data.Sample], batch_size: int = 32
) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced predictions: per sample, (argmax tokens, answer tokens) over its answer
    tokens, EOS excluded. Position t-1's argmax predicts the token at t."""
    out: list = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        chunk = [samples[i] for i in idx]
        batch = backbone.encode(
            [s.image for s in chunk], [s.question for s in chunk], [s.answer for s in chunk]
        )
        batch = backbone.to_device(batch)
        with torch.no_grad():
            logits = backbone(**batch).logits  # (B, T, V)
        pred = logits[:, :-1].argmax(-1).cpu()  # (B, T-1): predicts token t+1
        gold = batch["labels"][:, 1:].cpu()  # (B, T-1)
        scored = (gold != -100) & (gold != backbone.eos_token_id)  # (B, T-1): answer, no EOS
        for b, i in enumerate(idx):
            out[i] = (pred[b][scored[b]].tolist(), gold[b][scored[b]].tolist())
    return out


def generations(backbone, samples: Sequence[data.Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers, one per sample (the question alone is the prompt)."""
    out: list = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        images = [samples[i].image for i in idx]
        questions = [samples[i].question for i in idx]
        for i, answer in zip(idx, backbone.generate(images, questions)):
            out[i] = answer
    return out


def _per_part(run: Callable, backbone, parts: dict, names: Sequence[str], batch_size: int):
    """``run`` on every sample of the named parts at once, its outputs split back per part."""
    flat = run(backbone, [s for p in names for s in parts[p]], batch_size)
    out = {}
    start = 0
    for p in names:
        out[p] = flat[start : start + len(parts[p])]
        start += len(parts[p])
    return out


def observe(backbone, record: data.EditRecord, batch_size: int = 32) -> Observation:
    """Run the backbone (as it is now: attached or not) on all of a record's probes, batched
    across parts: one teacher-forced pass and one generation per batch."""
    parts = probes(record)
    tokens = _per_part(token_predictions, backbone, parts, PARTS, batch_size)
    texts = _per_part(generations, backbone, parts, GEN_PARTS, batch_size)
    return Observation(tokens, texts)


def references(
    backbone, records: Sequence[data.EditRecord], progress: bool = True
) -> list[Observation]:
    """Pre-edit observations, on the unedited model (call before any edit)."""
    return [observe(backbone, r) for r in progress_bar(records, progress, "pre-edit")]


def progress_bar(items, enabled: bool, desc: str):
    """``items`` with a tqdm bar on stderr (or none)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=not enabled)


# ---------------- The model-unchanged check and the protocols


class ModelChanged(RuntimeError):
    """A method left the backbone different from before its edits."""


@torch.no_grad()
def _edit_logits(backbone, record: data.EditRecord) -> torch.Tensor:
    batch = backbone.encode([record.image], [record.question], [record.target])
    return backbone(**backbone.to_device(batch)).logits.cpu()  # (1, T, V)


def _state(backbone) -> dict:
    state = {f"param {n}": p for n, p in backbone.named_parameters()}
    state.update({f"buffer {n}": b for n, b in backbone.named_buffers()})
    return state


class Snapshot(NamedTuple):
    """The backbone before the edits, to check against later."""

    state: dict  # a copy of every parameter and buffer, by name
    record: data.EditRecord
    logits: torch.Tensor  # (1, T, V): the plain model on the record's edit input


def snapshot(backbone, record: data.EditRecord) -> Snapshot:
    """Copy every parameter and buffer, and the outputs on one record, to check against later."""
    state = {k: v.detach().clone() for k, v in _state(backbone).items()}
    return Snapshot(state, record, _edit_logits(backbone, record))


def check_unchanged(backbone, before: Snapshot, method_name: str = "method") -> None:
    """Raise ModelChanged unless every parameter and buffer is ``torch.equal`` to the snapshot
    and the outputs on the snapshot's record (no attachment) are bit-identical."""
    now = _state(backbone)
    changed = sorted(now.keys() ^ before.state.keys())  # names that came or went
    if not changed:
        changed = [k for k, v in now.items() if not torch.equal(v, before.state[k])]
    if changed:
        raise ModelChanged(
            f"{method_name} left the backbone's parameters/buffers changed: {changed[:5]}"
        )
    if not torch.equal(_edit_logits(backbone, before.record), before.logits):
        raise ModelChanged(
            f"{method_name} left the backbone's outputs changed on record "
            f"{before.record.id} (a hook left behind?)"
        )


def run_base(
    backbone,
    records: Sequence[data.EditRecord],
    progress: bool = True,
    refs: Optional[list[Observation]] = None,
) -> dict:
    """The unedited model scored against the targets (no edit; Loc is 100 by definition)."""
    if refs is None:
        refs = references(backbone, records, progress)
    return summarize([score(ref, ref, r.target) for r, ref in zip(records, refs)], None)


def run_single(
    method,
    backbone,
    records: Sequence[data.EditRecord],
    progress: bool = True,
    refs: Optional[list[Observation]] = None,
) -> dict:
    """Single-edit protocol (paper Table 3): for each record, edit, score the edited model,
    remove the edit. Raises ModelChanged if the backbone is not as before at the end."""
    before = snapshot(backbone, records[0])
    if refs is None:
        refs = references(backbone, records, progress)
    rows = []
    seconds = []
    for record, ref in progress_bar(list(zip(records, refs)), progress, type(method).__name__):
        report = method.edit(record)
        with method.attached():
            rows.append(score(observe(backbone, record), ref, record.target))
        method.remove(report.index)
        seconds.append(report.seconds)
    check_unchanged(backbone, before, type(method).__name__)
    return summarize(rows, seconds)


def run_sequential(
    method,
    backbone,
    records: Sequence[data.EditRecord],
    progress: bool = True,
    refs: Optional[list[Observation]] = None,
) -> dict:
    """Sequential protocol (paper Table 4): all edits in order, then every record scored on the
    model holding all of them; then every edit is removed and the unchanged check runs."""
    before = snapshot(backbone, records[0])
    if refs is None:
        refs = references(backbone, records, progress)
    name = type(method).__name__
    seconds = [method.edit(r).seconds for r in progress_bar(records, progress, f"{name} edits")]
    with method.attached():
        rows = [
            score(observe(backbone, r), ref, r.target)
            for r, ref in zip(progress_bar(records, progress, f"{name} scoring"), refs)
        ]
    while len(method):
        method.remove(len(method) - 1)
    check_unchanged(backbone, before, name)
    return summarize(rows, seconds)


PROTOCOLS = {"single": run_single, "sequential": run_sequential}
METHODS = ("base", "ft", "grace", "balancedit")


def run_method(
    name: str,
    backbone,
    records,
    cfg,
    protocol: str,
    refs: list[Observation],
    progress: bool = True,
    grace_eps0: float = 1.0,
) -> dict:
    """One method of METHODS, its averaged result under a protocol, against precomputed
    pre-edit references."""
    if name == "base":
        return run_base(backbone, records, progress, refs)
    if name == "ft":
        method = FineTune(backbone, cfg)
    elif name == "grace":
        method = Grace(backbone, cfg, eps0=grace_eps0)
    else:
        method = BalancEditor(backbone, cfg)
    return PROTOCOLS[protocol](method, backbone, records, progress, refs)


# ---------------- Reporting


def two_places(x: Optional[float]) -> str:
    """A table cell: the value with two decimals, "-" if it was not measured."""
    return "-" if x is None else f"{x:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(
    results: dict[str, dict],
    first: str = "Method",
    cell: Callable = two_places,
    seconds: bool = True,
) -> str:
    """Markdown: one row per result, one column per entry of HEADERS (the teacher-forced scores,
    HM, the generated ones), then s/edit if ``seconds``; ``cell`` writes each cell from the
    result's value."""
    columns = list(COLUMNS)
    headers = list(HEADERS.values())
    if seconds:
        columns.append("seconds_per_edit")
        headers.append("s/edit")
    lines = [_row([first, *headers]), "|" + "---|" * (len(headers) + 1)]
    for name, r in results.items():
        lines.append(_row([name, *(cell(r[c]) for c in columns)]))
    return "\n".join(lines)


# ---------------- Command line


class UsageError(Exception):
    """Bad command-line input found after parsing: one line, exit status 2."""


def load_backbone(args):
    """The backbone named by --backbone, from local files, on --device."""
    if args.backbone == "minigpt4":
        return models.MiniGPT4.from_pretrained(
            args.blip2, args.model, args.projection, device=args.device
        )
    if args.backbone == "tiny":
        return models.TinyVLM.from_pretrained(
            args.model or models.TINY_DIR, device=args.device or "cpu"
        )
    return models.Blip2OPT.from_pretrained(args.model, device=args.device)


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


def check_writable(path: Path, flag: str = "--out", suffix: str = ".json") -> Callable:
    """Refuse, before any work, an output path with another suffix or that cannot be written
    (found by trying: ``data.claim_output``). Returns its ``cleanup()``, for a run that fails
    before writing."""
    if path.suffix != suffix:
        raise UsageError(f"{flag} {path}: give a path ending in {suffix}")
    try:
        return data.claim_output(path, flag)
    except data.OutputError as e:  # a UsageError for callers: one line, exit status 2
        raise UsageError(str(e)) from None


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
    for name in needs.get(args.backbone, ()):  # local copies, made as the README says
        path = getattr(args, name)
        if not (path and Path(path).expanduser().exists()):
            raise UsageError(
                f"--backbone {args.backbone} needs --{name}, a local copy "
                "(see the README: nothing downloads)"
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


def setup(args) -> Setup:
    """Everything that can fail on bad input, cheapest first (options, device, output, data, the
    model). The output is claimed by trying (``data.claim_output``), and released if a later
    check fails."""
    cfg = make_config(args)
    check_environment(args)
    out = output_path(args)
    picture = args.command.startswith("show") and args.out  # --out names the .png
    cleanup = check_writable(out, suffix=".png" if picture else ".json")
    out = out.with_suffix(".json")  # a picture's numbers go beside it
    try:
        records, data_name = load_records(args)
        n = len(records)
        if n == 0:
            raise UsageError(f"no records in {data_name}")
        if not 0 <= getattr(args, "record", 0) < n:
            raise UsageError(f"{n} records in {data_name}: --record is an index, 0..{n - 1}")
        check_images(records)
        backbone = load_backbone(args)
        backbone.check(records)  # targets it cannot spell, questions too long for it
    except BaseException:
        cleanup()
        raise
    torch.manual_seed(cfg.seed)
    return Setup(backbone, records, data_name, cfg, out, cleanup)


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
    refs = references(s.backbone, s.records, args.progress)
    results = {}
    for name in args.methods:
        results[name] = run_method(
            name, s.backbone, s.records, s.cfg, args.protocol, refs, args.progress, args.grace_eps0
        )
    print(table(results))
    return {**header(args, s), "grace_eps0": args.grace_eps0, "methods": results}


def ablate(parameter: str, values: Sequence = ()) -> Callable:
    """The command for an ablation: BalancEdit under --protocol once per value of one config
    field (``values``, else --alphas); sweep-alpha also draws paper Fig. 5."""

    def command(args, s: Setup) -> dict:
        refs = references(s.backbone, s.records, args.progress)
        results = {}
        for v in values or args.alphas:
            cfg = make_config(args, **{parameter: v})
            results[str(v)] = run_method(
                "balancedit", s.backbone, s.records, cfg, args.protocol, refs, args.progress
            )
        print(table(results, first=parameter))
        if parameter == "alpha":
            pictures.plot_sweep(results, "alpha", s.out.with_suffix(".png"))
        return {**header(args, s), "parameter": parameter, "settings": results}

    return command


def cmd_show_edit(args, s: Setup) -> dict:
    """One edit's probes against its radius: why each was, or was not, edited (Eq. 3)."""
    record = s.records[args.record]
    report, probes = pictures.edit_probes(BalancEditor(s.backbone, s.cfg), record)
    title = f"--record {args.record} (id {record.id}): {record.question!r} -> {record.target!r}"
    pictures.show_edit(report, probes, s.out.with_suffix(".png"), title)
    drawn = {"record": args.record, "record_id": record.id, **report, "probes": probes}
    return {**header(args, s), **drawn}


def cmd_show_codebook(args, s: Setup) -> dict:
    """The codebook after editing every record in order, its keys and balls in 2-D (Fig. 7)."""
    editor = BalancEditor(s.backbone, s.cfg)
    for record in progress_bar(s.records, args.progress, "edits"):
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
UNNAMED = ("command", "out", "progress", "device", "protocol", "threads")  # not in an output name
PATHS = (  # named by their last part
    "model",
    "blip2",
    "projection",
    "data",
    "coco_root",
    "rephrase_root",
    "locality_root",
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
    g.add_argument(
        "--device", help="torch device (default: cpu for tiny, cuda if available for blip2)"
    )
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="single", help="default: single")
    g.add_argument("--out", help=OUT_HELP)
    add_threads(g)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="evaluate.py",
        allow_abbrev=False,
        description="Score model editors (paper Appendix C). With no command: run (TinyVLM, "
        "the shipped sample, every method, single edits). Across many worlds: python study.py.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        add_common(p, name)
    run = sub.choices["run"]
    method = number(str, METHODS.__contains__, f"one of {','.join(METHODS)}")
    run.add_argument(
        "--methods",
        type=comma_list(method),
        default=list(METHODS),
        help=f"comma list of {','.join(METHODS)} (default: all)",
    )
    run.add_argument(
        "--grace-eps0",
        type=POSITIVE,
        default=1.0,
        help="GRACE's fixed initial radius, Euclidean (default 1.0, GRACE's own)",
    )
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


def default_command(argv: Sequence[str], command: str) -> list[str]:
    """``argv``, with ``command`` put first if it names none (it starts with an option other
    than --help, or is empty)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, command)
    return argv


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; with no command, ``run``."""
    argv = default_command(argv, "run")
    return build_parser().parse_args(argv)  # bad options: one error line, exit 2


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    try:
        s = setup(args)
    except (UsageError, data.DataError, OSError, ValueError, RuntimeError) as e:
        build_parser().exit(2, f"evaluate.py {args.command}: error: {e}\n")
    try:
        result = COMMANDS[args.command].run(args, s)
    except BaseException:  # an error or Ctrl-C: no empty results/ folder left behind
        s.cleanup()
        raise
    s.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
