"""Score model editors: the metrics, protocols and ablations of the paper (the main job).

Implements DESIGN.md section 6 and the paper's Appendix C (Guo et al.,
"BalancEdit", ICML 2025). For an edit ``(i, t, y^o -> y^n)`` of an
``EditRecord`` (data.py), scored on the edited model ``f_e`` (all in percent,
averaged over records):

- **Acc** (Eq. 4): ``f_e(i, t) = y^n``, on the edit input itself;
- **T-Gen** (Eq. 5): ``f_e(i, R(t)) = y^n``, rephrased questions (``record.rephrases``);
- **I-Gen** (Eq. 6): ``f_e(i', t) = y^n``, other images of the same scope
  (``record.rephrase_images``);
- **Loc** (Eq. 7): ``f_e(i_l, t_l) = f(i_l, t_l)``, similar but out-of-scope
  samples (``record.locality``) answer as the *unedited* model ``f`` did;
  ``m_loc`` is the same on MMEdit's unrelated samples (``record.m_locality``);
- **HM**: the harmonic mean of T-Gen, I-Gen and Loc (0 if any is 0), the
  paper's single trade-off number (Table 3).

"``= y^n``" is measured as the authors' and EasyEdit's code do: *teacher-forced
token accuracy*. The answer is fed in; the argmax of the logits at position
``t-1`` is compared with the answer token at ``t``, over the answer tokens only
(the closing EOS is not counted); a sample scores the fraction of its tokens
right. Loc compares post-edit with pre-edit argmax tokens at the positions of
the locality sample's own answer. Secondary columns (``gen_*``) use exact
match of greedy generations: ``generated == y^n``, and for ``gen_loc``
post-edit generation == pre-edit generation.

Pre-edit references (``observe`` on the unedited model) are taken once per
record before the protocol makes any edit, never on an edited model.

Protocols: **single** (each edit on its own, scored, removed; Table 3) and
**sequential** (all edits in order, then every record scored; Table 4). Both
end by checking that the backbone is bit-identical to what it was before.

Command line::

    python evaluate.py                       # TinyVLM on the shipped sample: base, ft, grace, balancedit
    python evaluate.py --backbone blip2 --data OKEDIT_DIR --protocol sequential
    python evaluate.py sweep-alpha           # Fig. 5: Acc/T-Gen/I-Gen/Loc/HM against alpha (+ PNG)
    python evaluate.py ablate-distance       # Table 6: cos vs euc
    python evaluate.py ablate-negative       # Table 7: black, white, noise negative anchors
    python evaluate.py bench [--json PATH] [--quick]   # speed and memory (issue 6)

Each prints a markdown table and writes a JSON file (path printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import data

# ----------------------------------------------------------------------------
# Metrics on predictions (pure Python: testable on hand-made token lists)

PARTS = ("acc", "t_gen", "i_gen", "loc", "m_loc")  # what a record is probed on
TARGET_PARTS = ("acc", "t_gen", "i_gen")            # scored against the target y^n
LOCALITY_PARTS = ("loc", "m_loc")                   # scored against the pre-edit model
GEN_PARTS = ("acc", "t_gen", "i_gen", "loc")        # also scored by generation (gen_*)
COLUMNS = ("acc", "t_gen", "i_gen", "loc", "hm")    # the table's score columns
HEADERS = ("Acc", "T-Gen", "I-Gen", "Loc", "HM")


def hm(t_gen: Optional[float], i_gen: Optional[float], loc: Optional[float]) -> Optional[float]:
    """Harmonic mean of T-Gen, I-Gen and Loc (paper Table 3): 3 / (1/a + 1/b + 1/c).

    0 if any is 0 (the limit of the formula); None if any is None (not measured)."""
    xs = (t_gen, i_gen, loc)
    if any(x is None for x in xs):
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def token_accuracy(predicted: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> Optional[float]:
    """Mean over samples of the fraction of a sample's tokens where ``predicted == reference``, in %.

    Reference = the answer's tokens (Acc, T-Gen, I-Gen) or the pre-edit argmax
    tokens (Loc). None for no samples; a sample with no tokens is an error."""
    if len(predicted) != len(reference):
        raise ValueError(f"token_accuracy: {len(predicted)} predictions for {len(reference)} references")
    if not predicted:
        return None
    per_sample = []
    for p, r in zip(predicted, reference):
        if len(p) != len(r) or not r:
            raise ValueError(f"token_accuracy: token lists of lengths {len(p)} and {len(r)}")
        per_sample.append(sum(a == b for a, b in zip(p, r)) / len(r))
    return 100.0 * sum(per_sample) / len(per_sample)


def exact_match(generated: Sequence[str], reference: Sequence[str]) -> Optional[float]:
    """Percent of samples whose generated string equals the reference; None for no samples."""
    if len(generated) != len(reference):
        raise ValueError(f"exact_match: {len(generated)} generations for {len(reference)} references")
    if not generated:
        return None
    return 100.0 * sum(g.strip() == r.strip() for g, r in zip(generated, reference)) / len(generated)


def mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Observation:
    """What one model does on one record's probes (see ``probes``).

    tokens[part]: per sample, (argmax tokens, answer tokens), teacher-forced, EOS excluded;
    texts[part]:  per sample, the greedy generation (parts in GEN_PARTS only)."""
    tokens: dict[str, list[tuple[list[int], list[int]]]]
    texts: dict[str, list[str]]


def score(post: Observation, pre: Observation, target: str) -> dict[str, Optional[float]]:
    """One record's metrics: the edited model's observation ``post`` against the target y^n
    (Eqs. 4-6) and against the unedited model's observation ``pre`` (Eq. 7)."""
    m: dict[str, Optional[float]] = {}
    for part in TARGET_PARTS:  # Eqs. 4-6: f_e(.) = y^n
        m[part] = token_accuracy([p for p, _ in post.tokens[part]], [y for _, y in post.tokens[part]])
    for part in LOCALITY_PARTS:  # Eq. 7: f_e(i_l, t_l) = f(i_l, t_l)
        m[part] = token_accuracy([p for p, _ in post.tokens[part]], [p for p, _ in pre.tokens[part]])
    for part in GEN_PARTS:
        reference = pre.texts[part] if part in LOCALITY_PARTS else [target] * len(post.texts[part])
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


# ----------------------------------------------------------------------------
# Observing a backbone (batched forward passes and generations)


def probes(record: data.EditRecord) -> dict[str, list[data.Sample]]:
    """The (image, question, answer) samples each metric is measured on."""
    y = record.target
    return {
        "acc": [data.Sample(record.image, record.question, y)],                     # Eq. 4
        "t_gen": [data.Sample(record.image, q, y) for q in record.rephrases],        # Eq. 5
        "i_gen": [data.Sample(im, record.question, y) for im in record.rephrase_images],  # Eq. 6
        "loc": list(record.locality),                                                # Eq. 7
        "m_loc": list(record.m_locality),
    }


def _batches(samples: Sequence[data.Sample], batch_size: int):
    """Index chunks of at most batch_size samples, never mixing image and text-only samples
    (the backbones' encode takes one or the other)."""
    for has_image in (True, False):
        idx = [i for i, s in enumerate(samples) if (s.image is not None) == has_image]
        for k in range(0, len(idx), batch_size):
            yield idx[k:k + batch_size]


def token_predictions(backbone, samples: Sequence[data.Sample], batch_size: int = 32
                      ) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced predictions: per sample, (argmax tokens, answer tokens) over its answer
    tokens, EOS excluded. Position t-1's argmax predicts the token at t."""
    import torch

    out: list = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        chunk = [samples[i] for i in idx]
        batch = backbone.to_device(backbone.encode([s.image for s in chunk], [s.question for s in chunk],
                                                   [s.answer for s in chunk]))
        with torch.no_grad():
            logits = backbone(**batch).logits                       # (B, T, V)
        pred = logits[:, :-1].argmax(-1).cpu()                       # (B, T-1): predicts token t+1
        gold = batch["labels"][:, 1:].cpu()                          # (B, T-1)
        scored = (gold != -100) & (gold != backbone.eos_token_id)    # (B, T-1): answer tokens, no EOS
        for b, i in enumerate(idx):
            out[i] = (pred[b][scored[b]].tolist(), gold[b][scored[b]].tolist())
    return out


def generations(backbone, samples: Sequence[data.Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers, one per sample (the question alone is the prompt)."""
    out: list = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        answers = backbone.generate([samples[i].image for i in idx], [samples[i].question for i in idx])
        for i, a in zip(idx, answers):
            out[i] = a
    return out


def _split(flat: list, counts: dict[str, int]) -> dict[str, list]:
    out, k = {}, 0
    for part, n in counts.items():
        out[part], k = flat[k:k + n], k + n
    return out


def observe(backbone, record: data.EditRecord, batch_size: int = 32) -> Observation:
    """Run the backbone (as it is now: attached or not) on all of a record's probes, batched
    across parts: one teacher-forced pass and one generation per batch."""
    parts = probes(record)
    flat = [s for p in PARTS for s in parts[p]]
    tokens = _split(token_predictions(backbone, flat, batch_size), {p: len(parts[p]) for p in PARTS})
    gen_flat = [s for p in GEN_PARTS for s in parts[p]]
    texts = _split(generations(backbone, gen_flat, batch_size), {p: len(parts[p]) for p in GEN_PARTS})
    return Observation(tokens, texts)


def references(backbone, records: Sequence[data.EditRecord], progress: bool = True) -> list[Observation]:
    """Pre-edit observations, on the unedited model (call before any edit)."""
    return [observe(backbone, r) for r in _progress(records, progress, "pre-edit")]


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------
# The model-unchanged check and the protocols


class ModelChanged(RuntimeError):
    """A method left the backbone different from before its edits."""


@dataclass
class Snapshot:
    state: dict        # name -> a copy of every parameter and buffer
    record: data.EditRecord
    logits: object     # the plain model's logits on the record's edit input


def _edit_logits(backbone, record: data.EditRecord):
    import torch

    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    with torch.no_grad():
        return backbone(**batch).logits.detach().cpu()  # (1, T, V)


def snapshot(backbone, record: data.EditRecord) -> Snapshot:
    """Copy every parameter and buffer, and the outputs on one record, to check against later."""
    state = {f"param {n}": p.detach().clone() for n, p in backbone.named_parameters()}
    state.update({f"buffer {n}": b.detach().clone() for n, b in backbone.named_buffers()})
    return Snapshot(state, record, _edit_logits(backbone, record))


def check_unchanged(backbone, before: Snapshot, method_name: str = "method") -> None:
    """Raise ModelChanged unless every parameter and buffer is ``torch.equal`` to the snapshot
    and the outputs on the snapshot's record (no attachment) are bit-identical."""
    import torch

    now = {f"param {n}": p for n, p in backbone.named_parameters()}
    now.update({f"buffer {n}": b for n, b in backbone.named_buffers()})
    if now.keys() != before.state.keys():
        diff = sorted(now.keys() ^ before.state.keys())
        raise ModelChanged(f"{method_name} changed the backbone's parameters/buffers: {diff[:5]}")
    changed = [k for k, v in now.items() if not torch.equal(v.detach(), before.state[k])]
    if changed:
        raise ModelChanged(f"{method_name} left the backbone changed: {changed[:5]}")
    if not torch.equal(_edit_logits(backbone, before.record), before.logits):
        raise ModelChanged(f"{method_name} left the backbone's outputs changed on record "
                           f"{before.record.id} (a hook left behind?)")


def run_base(backbone, records: Sequence[data.EditRecord], progress: bool = True,
             refs: Optional[list[Observation]] = None) -> dict:
    """The unedited model scored against the targets (no edit; Loc is 100 by definition)."""
    refs = refs if refs is not None else references(backbone, records, progress)
    return summarize([score(ref, ref, r.target) for r, ref in zip(records, refs)], None)


def run_single(method, backbone, records: Sequence[data.EditRecord], progress: bool = True,
               refs: Optional[list[Observation]] = None) -> dict:
    """Single-edit protocol (paper Table 3): for each record, edit, score the edited model,
    remove the edit. Raises ModelChanged if the backbone is not as before at the end."""
    before = snapshot(backbone, records[0])
    refs = refs if refs is not None else references(backbone, records, progress)
    rows, seconds = [], []
    for record, ref in _progress(list(zip(records, refs)), progress, type(method).__name__):
        report = method.edit(record)
        with method.attached():
            rows.append(score(observe(backbone, record), ref, record.target))
        method.remove(report.index)
        seconds.append(report.seconds)
    check_unchanged(backbone, before, type(method).__name__)
    return summarize(rows, seconds)


def run_sequential(method, backbone, records: Sequence[data.EditRecord], progress: bool = True,
                   refs: Optional[list[Observation]] = None) -> dict:
    """Sequential protocol (paper Table 4): all edits in order, then every record scored on the
    model holding all of them; then ``reset()`` and the unchanged check."""
    before = snapshot(backbone, records[0])
    refs = refs if refs is not None else references(backbone, records, progress)
    name = type(method).__name__
    seconds = [method.edit(r).seconds for r in _progress(records, progress, f"{name} edits")]
    with method.attached():
        rows = [score(observe(backbone, r), ref, r.target)
                for r, ref in zip(_progress(records, progress, f"{name} scoring"), refs)]
    method.reset()
    check_unchanged(backbone, before, name)
    return summarize(rows, seconds)


PROTOCOLS = {"single": run_single, "sequential": run_sequential}
METHODS = {"base": None, "ft": "FineTune", "grace": "Grace", "balancedit": "BalancEditor"}  # -> balancedit.py


def make_method(name: str, backbone, cfg):
    """A fresh editor of the named kind (classes in balancedit.py); ``base`` has none."""
    import balancedit

    return getattr(balancedit, METHODS[name])(backbone, cfg)


def evaluate(name: str, backbone, records, cfg, protocol: str, refs: list[Observation],
             progress: bool = True) -> dict:
    """One method's averaged result under a protocol, against precomputed pre-edit references."""
    if name == "base":
        return run_base(backbone, records, progress, refs)
    return PROTOCOLS[protocol](make_method(name, backbone, cfg), backbone, records, progress, refs)


# ----------------------------------------------------------------------------
# Reporting


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict[str, dict], first: str = "Method") -> str:
    """Markdown table: one row per result, Acc/T-Gen/I-Gen/Loc/HM and seconds per edit."""
    lines = [f"| {first} | " + " | ".join(HEADERS) + " | s/edit |",
             "|" + "---|" * (len(HEADERS) + 2)]
    for name, r in results.items():
        cells = [_fmt(r[k]) for k in COLUMNS] + [_fmt(r["seconds_per_edit"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    print(f"wrote {path}")


def plot_sweep(results: dict[str, dict], parameter: str, path: Path) -> None:
    """Paper Fig. 5: each metric against the swept parameter (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(v) for v in results]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in zip(COLUMNS, HEADERS):
        ax.plot(xs, [results[v][key] if results[v][key] is not None else math.nan for v in results],
                marker="o", label=label)
    ax.set_xlabel(parameter)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"BalancEdit against {parameter} (paper Fig. 5)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """Bad command-line input found after parsing (reported as one line, exit code 2)."""


def load_backbone(args):
    """The backbone named by --backbone, from --model (or its default), on --device."""
    import models

    if args.backbone == "tiny":
        return models.TinyVLM.from_pretrained(args.model or models.TINY_DIR, device=args.device or "cpu")
    return models.Blip2OPT.from_pretrained(args.model or models.BLIP2_OPT, device=args.device)


def load_records(args) -> tuple[list[data.EditRecord], str]:
    """Records from --data (an OKEDIT folder or an MMEdit E-VQA json + --image-root), or the sample."""
    if args.data is None:
        return data.load_sample(limit=args.limit), f"sample ({data.SAMPLE_DIR.name})"
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if path.is_dir():
        records = data.load_okedit(path, image_root=args.image_root, limit=args.limit)
    elif args.image_root is None:
        raise UsageError(f"--data {path} is an MMEdit json file: it needs --image-root DIR")
    else:
        if not Path(args.image_root).is_dir():
            raise FileNotFoundError(f"--image-root {args.image_root}: no such directory")
        records = data.load_mmedit(path, args.image_root, limit=args.limit)
    return records, str(path)


CONFIG_OPTIONS = ("alpha", "distance", "negative", "steps", "lr", "value", "rank", "grace_eps0", "seed")  # -> config


def make_config(args, **overrides):
    """BalancEditConfig from its defaults, the options given (not None) and ``overrides``."""
    import balancedit

    given = {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None}
    return balancedit.BalancEditConfig(**{**given, **overrides})


@dataclass
class Setup:
    backbone: object
    records: list
    data_name: str
    cfg: object
    backbone_name: str = ""  # bench: which TinyVLM (trained checkpoint or random weights)


def setup(args) -> Setup:
    """Everything that can fail on bad input, cheapest first (config, data, then the model)."""
    cfg = make_config(args)
    records, data_name = load_records(args)
    if not records:
        raise UsageError(f"no records in {data_name}")
    backbone = load_backbone(args)
    import torch

    torch.manual_seed(cfg.seed)
    return Setup(backbone, records, data_name, cfg)


def header(args, s: Setup, cfg) -> dict:
    return {"backbone": args.backbone, "model": str(args.model) if args.model else None, "data": s.data_name,
            "protocol": args.protocol, "config": dataclasses.asdict(cfg)}


def cmd_run(args, s: Setup) -> dict:
    """The main job: each method of --methods under --protocol."""
    refs = references(s.backbone, s.records, args.progress)
    results = {}
    for name in args.methods:
        results[name] = evaluate(name, s.backbone, s.records, s.cfg, args.protocol, refs, args.progress)
    print(table(results))
    return {**header(args, s, s.cfg), "methods": results}


def ablate(args, s: Setup, parameter: str, values: Sequence) -> tuple[dict, dict]:
    """BalancEdit under --protocol once per value of one config field (the ablations)."""
    refs = references(s.backbone, s.records, args.progress)
    results = {}
    for v in values:
        cfg = make_config(args, **{parameter: v})
        results[str(v)] = evaluate("balancedit", s.backbone, s.records, cfg, args.protocol, refs, args.progress)
    print(table(results, first=parameter))
    return results, {**header(args, s, s.cfg), "parameter": parameter, "settings": results}


def cmd_sweep_alpha(args, s: Setup) -> dict:
    """Paper Fig. 5: the radius interpolation alpha from the negative (0) to the positive (1)."""
    results, out = ablate(args, s, "alpha", args.alphas)
    plot_sweep(results, "alpha", Path(args.out or default_out(args.command)).with_suffix(".png"))
    return out


def cmd_ablate_distance(args, s: Setup) -> dict:
    """Paper Table 6: cosine vs Euclidean distance."""
    return ablate(args, s, "distance", ["cos", "euc"])[1]


def cmd_ablate_negative(args, s: Setup) -> dict:
    """Paper Table 7: black, white or uniform-noise negative anchor image."""
    return ablate(args, s, "negative", list(data.ANCHOR_KINDS))[1]


# ----------------------------------------------------------------------------
# Benchmarks (`python evaluate.py bench`): speed and memory of the method, each figure
# measured side by side in one run. Timings: time.perf_counter, warm-up turns, medians;
# the variants being compared are timed in turns in the same loop, so machine noise hits all.

BENCH_TARGETS = {  # json key -> (comparison, bound): printed as PASS/MISS, never asserted
    "edit_speedup_blip2_depth": (">=", 10.0),   # cached Eq. 2 training >= 10x the naive loop
    "edit_weights_max_rel_diff": ("<", 1e-5),   # ... and it trains the same value
    "hook_overhead_1000": ("<=", 1.10),         # routing hook, 1,000 entries, all rows out of scope
    "lora8_bytes_ratio": ("<=", 1 / 50),        # a rank-8 LoRA entry vs a full-copy entry
    "lora8_hm_delta": ("<=", 2.0),              # HM(full) - HM(rank 8), points
    "seq_last_first_ratio": ("<=", 1.5),        # s/edit, last window vs first window of sequential edits
}
OPT_2_7B_FC2 = (10240, 2560)  # BLIP-2 OPT-2.7B's target layer fc2: in_features, out_features
BLIP2_DEPTH = dict(layers=32, hidden=64, ffn=256)  # OPT-2.7B's 32 decoder layers, at a small width
HOOK_SIZES = (1, 100, 1_000, 10_000)


def verdict(key: str, x: Optional[float]) -> str:
    """``PASS``/``MISS`` against BENCH_TARGETS[key], with the bound (``-`` if not measured)."""
    op, bound = BENCH_TARGETS[key]
    if x is None or math.isnan(x):
        return f"- (target {op} {bound:.3g})"
    ok = {">=": x >= bound, "<=": x <= bound, "<": x < bound}[op]
    return f"{'PASS' if ok else 'MISS'} (target {op} {bound:.3g})"


def alternate(fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each variant. Each ``fn()`` runs one measurement and returns the seconds
    it timed (``time.perf_counter`` around the work only). The variants take turns in one loop,
    in alternating order (A B, B A, ...); the first ``warmup`` turns are not counted."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for turn in range(warmup + repeats):
        for name in (names if turn % 2 == 0 else names[::-1]):
            seconds = fns[name]()
            if turn >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def value_bytes(value) -> int:
    """Bytes of what a value stores: its state dict (LoRA: A and B only; the base layer is shared)."""
    return sum(t.numel() * t.element_size() for t in value.state_dict().values())


def entry_bytes(value, key_dim: int) -> int:
    """Bytes of one codebook entry: the value, the key (D float32) and the radius (one float32)."""
    return value_bytes(value) + key_dim * 4 + 4


def bytes_per_entry(in_features: int = OPT_2_7B_FC2[0], out_features: int = OPT_2_7B_FC2[1],
                    ranks: Sequence[int] = (4, 8, 16), dtype=None) -> dict[str, dict]:
    """Value and entry bytes of a full value (weight + bias) and LoRA values of each rank, for an
    ``nn.Linear(in_features, out_features)`` built on the meta device (nothing is allocated).
    Default: OPT-2.7B's fc2 in fp16."""
    import torch

    import balancedit

    layer = torch.nn.Linear(in_features, out_features, device="meta", dtype=dtype or torch.float16)
    values = {"full": balancedit.full_value(layer)}
    values.update({f"lora{r}": balancedit.LoRAValue(layer, rank=r) for r in ranks})
    full = entry_bytes(values["full"], in_features)
    return {name: {"value_bytes": value_bytes(v), "entry_bytes": entry_bytes(v, in_features),
                   "ratio_to_full": entry_bytes(v, in_features) / full} for name, v in values.items()}


def bench_edit_speed(backbone, record: data.EditRecord, cfg, repeats: int, warmup: int = 1) -> dict:
    """Seconds of one BalancEdit edit (a fresh editor each time) with Eq. 2 trained by the naive
    loop (``cache=False``: the whole model at every step) and on cached activations
    (``cache=True``: the layers after l only), same steps/lr/seed; and the largest difference
    between the two trained values, ``max|a - b| / max|b|`` over all value parameters.

    The cache records h^{l-1} in grad mode, as the naive loop's forwards run, so the two
    see the same kernels and the difference is 0 (models.opt_tail).
    """
    import balancedit

    trained = {}

    def one_edit(cache: bool) -> Callable[[], float]:
        def run() -> float:
            editor = balancedit.BalancEditor(backbone, dataclasses.replace(cfg, cache=cache))
            start = time.perf_counter()
            editor.edit(record)
            seconds = time.perf_counter() - start
            trained[cache] = [p.detach().clone() for p in editor.codebook.values[0].parameters()]
            return seconds
        return run

    s = alternate({"naive": one_edit(False), "cached": one_edit(True)}, repeats, warmup)
    diff = max(float((a - b).abs().max()) for a, b in zip(trained[True], trained[False]))
    scale = max(float(b.abs().max()) for b in trained[False])
    return {"naive_s": s["naive"], "cached_s": s["cached"], "speedup": s["naive"] / s["cached"],
            "weights_max_rel_diff": diff / scale, "steps": cfg.steps}


def far_keys(queries, n: int, seed: int = 0):
    """``n`` keys far from every query: negated, shuffled, rescaled copies of the real queries
    (B, D), plus a little positive noise -> (n, D) float32. The fc2 input of OPT is a ReLU output
    (>= 0), so these keys are at cosine distance >= 1 from every real query."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q = queries.detach().float().cpu()                                   # (B, D)
    pick = torch.randint(0, q.shape[0], (n,), generator=g)               # (n,)
    scale = 0.5 + torch.rand(n, 1, generator=g)                          # (n, 1)
    noise = 0.1 * q.abs().mean() * torch.rand(n, q.shape[1], generator=g)  # (n, D)
    return -(q[pick] * scale + noise)                                    # (n, D)


def bench_hook_overhead(backbone, records: Sequence[data.EditRecord], cfg, sizes: Sequence[int] = HOOK_SIZES,
                        repeats: int = 21, warmup: int = 1, batch_size: int = 32,
                        progress: bool = True) -> dict[int, dict]:
    """Forward time of ``backbone`` on a batch of ``batch_size`` sample inputs with the routing hook
    attached (codebook of N entries whose keys are far from every input, radius 0) against no
    hook. Checks at every turn that every row misses and the logits are ``torch.equal``.
    All entries share one LoRA value (rank 1): missing rows never call a value, and 10,000
    entries fit in memory. Returns {N: {plain_s, hooked_s, ratio, build_s}}."""
    import torch

    import balancedit

    chunk = [records[i % len(records)] for i in range(batch_size)]
    images, questions = [r.image for r in chunk], [r.question for r in chunk]
    batch = backbone.to_device(backbone.encode(images, questions, [r.target for r in chunk]))
    layer_path = backbone.target_layer
    real = balancedit.BalancEditor(backbone, cfg).keys(images, questions)   # (B, D) the real queries
    keys = far_keys(real, max(sizes), seed=cfg.seed)                         # (N_max, D)
    value = balancedit.LoRAValue(backbone.get_submodule(layer_path), rank=1)
    codebook = balancedit.Codebook(cfg.distance)
    with torch.no_grad():
        plain_logits = backbone(**batch).logits
    out = {}
    for n in _progress(sorted(sizes), progress, "hook overhead"):
        start = time.perf_counter()
        for key in keys[len(codebook):n]:  # grow the same codebook to n entries
            codebook.add(key, value, 0.0, "far")
        build = time.perf_counter() - start

        def plain() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                backbone(**batch)
                return time.perf_counter() - start

        def hooked() -> float:
            with torch.no_grad(), balancedit.attach(backbone, layer_path, codebook) as handle:
                start = time.perf_counter()
                logits = backbone(**batch).logits
                seconds = time.perf_counter() - start
            if not bool((handle.last_index == -1).all()):
                raise AssertionError(f"hook overhead: a row hit one of the {n} far keys")
            if not torch.equal(logits, plain_logits):
                raise AssertionError(f"hook overhead: out-of-scope logits changed with {n} entries")
            return seconds

        s = alternate({"plain": plain, "hooked": hooked}, repeats, warmup)
        out[n] = {"plain_s": s["plain"], "hooked_s": s["hooked"], "ratio": s["hooked"] / s["plain"],
                  "build_s": build}
    return out


def bench_sequential(backbone, records: Sequence[data.EditRecord], cfg, window: int,
                     progress: bool = True) -> dict:
    """BalancEdit edits ``records`` in order on one codebook; seconds per edit (mean) over the
    first and the last ``window`` edits, and their ratio."""
    import balancedit

    editor = balancedit.BalancEditor(backbone, cfg)
    seconds, actions = [], {}
    for r in _progress(records, progress, "sequential edits"):
        start = time.perf_counter()
        report = editor.edit(r)
        seconds.append(time.perf_counter() - start)
        actions[report.action] = actions.get(report.action, 0) + 1
    first, last = statistics.mean(seconds[:window]), statistics.mean(seconds[-window:])
    return {"n_edits": len(records), "window": window, "steps": cfg.steps, "first_s": first, "last_s": last,
            "ratio": last / first, "entries_at_end": len(editor), "actions": actions}


def bench_setup(args) -> Setup:
    """bench: TinyVLM (--model, else assets/tinyvlm if trained, else a random TinyVLM) and the
    whole shipped sample; the random BLIP-2 is built by the benchmark itself."""
    import torch

    import models

    for option in ("data", "image_root"):
        if getattr(args, option) is not None:
            raise UsageError(f"bench runs on the shipped sample; --{option.replace('_', '-')} is not used")
    if args.backbone != "tiny":
        raise UsageError("bench measures TinyVLM and a random BLIP-2 built in memory; --backbone is not used")
    cfg = make_config(args)
    records = data.load_sample()
    path = Path(args.model) if args.model else models.TINY_DIR
    torch.manual_seed(cfg.seed)
    if args.model or (path / "model.safetensors").is_file():
        backbone, name = models.TinyVLM.from_pretrained(path, device=args.device or "cpu"), f"TinyVLM ({path})"
    else:
        backbone, name = models.TinyVLM().to(args.device or "cpu").eval(), \
            f"TinyVLM (random weights: no checkpoint in {path})"
    return Setup(backbone, records, f"sample ({data.SAMPLE_DIR.name})", cfg, backbone_name=name)


def cmd_bench(args, s: Setup) -> dict:
    """Issue 6: edit speed (naive vs cached Eq. 2), the routing hook's overhead, bytes per entry
    (full vs LoRA, and HM), and time per edit over 1,000 sequential edits. Targets: BENCH_TARGETS."""
    import torch

    import models

    quick = args.quick
    edit_reps, hook_reps = (3, 7) if quick else (5, 21)
    n_seq, window = (200, 20) if quick else (1000, 100)
    hm_records = s.records[:args.limit or (4 if quick else len(s.records))]
    fig: dict[str, Optional[float]] = {}
    details: dict = {"tinyvlm": s.backbone_name, "quick": quick, "threads": torch.get_num_threads(),
                     "config": dataclasses.asdict(s.cfg)}
    print(f"# bench{' --quick' if quick else ''}: {s.backbone_name}; "
          f"{torch.get_num_threads()} threads; {s.cfg.steps} steps/edit, lr {s.cfg.lr}\n")

    # 1. Edit seconds, naive vs cached.
    blip2_name = "random BLIP-2 OPT, {layers} decoder layers (hidden {hidden}, ffn {ffn})".format(**BLIP2_DEPTH)
    rows = {s.backbone_name: bench_edit_speed(s.backbone, s.records[0], s.cfg, edit_reps),
            blip2_name: bench_edit_speed(models.random_blip2(**BLIP2_DEPTH, seed=s.cfg.seed), s.records[0],
                                         s.cfg, edit_reps)}
    fig["edit_speedup_blip2_depth"] = rows[blip2_name]["speedup"]
    fig["edit_weights_max_rel_diff"] = max(r["weights_max_rel_diff"] for r in rows.values())
    print(f"## Edit seconds, naive vs cached (1 record, {s.cfg.steps} steps, median of {edit_reps})\n")
    print("| backbone | naive s/edit | cached s/edit | speedup | max rel. weight diff |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['naive_s']:.3f} | {r['cached_s']:.3f} | {r['speedup']:.1f}x | "
              f"{r['weights_max_rel_diff']:.2e} |")
    print(f"\nspeedup at BLIP-2 depth {fig['edit_speedup_blip2_depth']:.1f}x: "
          f"{verdict('edit_speedup_blip2_depth', fig['edit_speedup_blip2_depth'])}; weights "
          f"{fig['edit_weights_max_rel_diff']:.2e}: {verdict('edit_weights_max_rel_diff', fig['edit_weights_max_rel_diff'])}\n")
    details["edit_speed"] = rows

    # 2. Hook overhead.
    hook = bench_hook_overhead(s.backbone, s.records, s.cfg, HOOK_SIZES, hook_reps, progress=args.progress)
    fig["hook_overhead_1000"] = hook[1000]["ratio"]
    print(f"## Hook overhead: TinyVLM forward, batch of 32, every row out of scope (median of {hook_reps})\n")
    print("| entries | no hook ms | hooked ms | ratio | codebook build s |")
    print("|---|---|---|---|---|")
    for n, r in hook.items():
        print(f"| {n:,} | {1e3 * r['plain_s']:.2f} | {1e3 * r['hooked_s']:.2f} | {r['ratio']:.3f} | {r['build_s']:.2f} |")
    print(f"\nratio at 1,000 entries {fig['hook_overhead_1000']:.3f}: {verdict('hook_overhead_1000', fig['hook_overhead_1000'])}\n")
    details["hook_overhead"] = {str(n): r for n, r in hook.items()}

    # 3. Bytes per entry, and HM of full vs rank-8 values.
    sizes = bytes_per_entry()
    fig["lora8_bytes_ratio"] = sizes["lora8"]["ratio_to_full"]
    print("## Bytes per entry: nn.Linear(10240, 2560) fp16 (OPT-2.7B fc2); values train and are kept "
          "in float32 (balancedit.Float32); each entry also stores its key (10240 float32) and radius\n")
    print("| value | value bytes | entry bytes | ratio to full |")
    print("|---|---|---|---|")
    for name, r in sizes.items():
        label = "full (weight + bias)" if name == "full" else f"LoRA rank {name[4:]} (A + B)"
        print(f"| {label} | {r['value_bytes']:,} | {r['entry_bytes']:,} | 1/{1 / r['ratio_to_full']:.0f} |")
    refs = references(s.backbone, hm_records, args.progress)
    hm_results = {"full": evaluate("balancedit", s.backbone, hm_records, dataclasses.replace(s.cfg, value="full"),
                                    args.protocol, refs, args.progress),
                  "lora rank 8": evaluate("balancedit", s.backbone, hm_records,
                                          dataclasses.replace(s.cfg, value="lora", rank=8),
                                          args.protocol, refs, args.progress)}
    fig["lora8_hm_delta"] = hm_results["full"]["hm"] - hm_results["lora rank 8"]["hm"]
    print(f"\nrank-8 entry / full entry = 1/{1 / fig['lora8_bytes_ratio']:.0f}: "
          f"{verdict('lora8_bytes_ratio', fig['lora8_bytes_ratio'])}\n")
    print(f"BalancEdit, {args.protocol} protocol, {len(hm_records)} records of the sample:\n")
    print(table(hm_results, first="value"))
    print(f"\nHM(full) - HM(rank 8) = {fig['lora8_hm_delta']:.2f} points: "
          f"{verdict('lora8_hm_delta', fig['lora8_hm_delta'])}\n")
    details["bytes_per_entry"], details["hm_full_vs_lora8"] = sizes, hm_results

    # 4. Sequential edits.
    seq_cfg = dataclasses.replace(s.cfg, steps=args.seq_steps or s.cfg.steps)
    seq = bench_sequential(s.backbone, data.make_records(s.cfg.seed, n_seq), seq_cfg, window, args.progress)
    fig["seq_last_first_ratio"] = seq["ratio"]
    print(f"## {n_seq:,} sequential edits on TinyVLM ({seq_cfg.steps} steps/edit; "
          f"{seq['entries_at_end']} entries at the end; actions {seq['actions']})\n")
    print("| edits | s/edit |")
    print("|---|---|")
    print(f"| first {window} | {seq['first_s']:.4f} |")
    print(f"| last {window} | {seq['last_s']:.4f} |")
    print(f"\nlast / first = {seq['ratio']:.2f}: {verdict('seq_last_first_ratio', seq['ratio'])}\n")
    details["sequential"] = seq

    return {**fig, "details": details}


COMMANDS: dict[str, tuple[Callable, str]] = {
    "run": (cmd_run, "evaluate methods (the default command)"),
    "sweep-alpha": (cmd_sweep_alpha, "BalancEdit for each alpha: table + PNG plot (paper Fig. 5)"),
    "ablate-distance": (cmd_ablate_distance, "BalancEdit with cos vs euc distance (paper Table 6)"),
    "ablate-negative": (cmd_ablate_negative, "BalancEdit with black/white/noise negatives (paper Table 7)"),
    "bench": (cmd_bench, "speed and memory: naive vs cached edits, hook overhead, bytes per entry, "
                         "1,000 sequential edits (issue 6)"),
}


def default_out(command: str) -> str:
    return "results/main.json" if command == "run" else f"results/{command.replace('-', '_')}.json"


def _csv(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; allowed: {','.join(choices)}")
        return items
    return parse


def _unit(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{x} is not in [0, 1]")
    return x


def _units(text: str) -> list[float]:
    return [_unit(t) for t in text.split(",") if t.strip()] or [_unit("")]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump): ``prog: error: message``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)  # the options every command shares
    g = common.add_argument_group("backbone and data")
    g.add_argument("--backbone", choices=("tiny", "blip2"), default="tiny", help="default: tiny (TinyVLM)")
    g.add_argument("--model", help="tiny: checkpoint dir (default assets/tinyvlm); "
                   "blip2: hub id or local dir (default Salesforce/blip2-opt-2.7b)")
    g.add_argument("--data", help="OKEDIT-layout folder, or MMEdit E-VQA .json with --image-root "
                   "(default: the shipped sample)")
    g.add_argument("--image-root", help="image folder of an MMEdit json (or OKEDIT's val2014 parent)")
    g.add_argument("--limit", type=_positive_int, help="first N records only")
    g.add_argument("--device", help="torch device (default: cpu for tiny, cuda if available for blip2)")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="single", help="default: single")
    g.add_argument("--out", help="JSON output path (default: results/<command>.json)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    c = common.add_argument_group("BalancEditConfig (default: the config's own defaults)")
    c.add_argument("--alpha", type=_unit, help="Eq. 3 radius interpolation in [0, 1]")
    c.add_argument("--distance", choices=("cos", "euc"), help="key distance (paper Table 6)")
    c.add_argument("--negative", choices=data.ANCHOR_KINDS, help="negative anchor image (paper Table 7)")
    c.add_argument("--steps", type=int, help="optimizer steps per edit (Eq. 2)")
    c.add_argument("--lr", type=float, help="learning rate per edit (Eq. 2)")
    c.add_argument("--value", choices=("full", "lora"), help="value v_k: full copy of the layer or low-rank")
    c.add_argument("--rank", type=int, help="rank of a lora value")
    c.add_argument("--grace-eps0", type=float, help="GRACE baseline's fixed initial radius (Euclidean)")
    c.add_argument("--seed", type=int, help="seed")

    parser = _Parser(
        prog="evaluate.py", description="Score model editors (paper Appendix C). With no command: "
        "`run` (TinyVLM on the shipped sample, methods base,ft,grace,balancedit, single edits).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs = {name: sub.add_parser(name, parents=[common], help=text, description=text)
            for name, (_, text) in COMMANDS.items()}
    subs["run"].add_argument("--methods", type=_csv(tuple(METHODS)), default=list(METHODS),
                             help=f"comma list of {','.join(METHODS)} (default: all)")
    for name, parameter in (("sweep-alpha", "alpha"), ("ablate-distance", "distance"),
                            ("ablate-negative", "negative")):
        subs[name].set_defaults(ablated=parameter)  # main() refuses --{parameter} for these
    subs["sweep-alpha"].add_argument("--alphas", type=_units, default=[i / 10 for i in range(11)],
                                     help="comma list of alphas in [0, 1] (default 0,0.1,...,1)")
    b = subs["bench"]
    b.set_defaults(setup=bench_setup)
    b.add_argument("--json", dest="out", metavar="PATH", help="write the figures here (same as --out; "
                   "default results/bench.json)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions, 4 records for the HM "
                   "comparison, 200 sequential edits (windows of 20)")
    b.add_argument("--seq-steps", type=_positive_int, help="steps per edit in the sequential part "
                   "(default: the config's steps)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; with no command, the main job (``run``)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv  # the main job is the default command
    return build_parser().parse_args(argv)  # bad options: one error line, exit 2


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ablated = getattr(args, "ablated", None)
    try:
        if ablated is not None and getattr(args, ablated) is not None:
            raise UsageError(f"{args.command} sets --{ablated} itself; do not pass it")
        s = getattr(args, "setup", setup)(args)
    except (UsageError, data.DataError, OSError, ValueError) as e:
        parser.exit(2, f"evaluate.py {args.command}: error: {e}\n")
    result = COMMANDS[args.command][0](args, s)
    write_json(result, Path(args.out or default_out(args.command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
