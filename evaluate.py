"""Score model editors: the paper's metrics (Appendix C), protocols, baselines and ablations.

For an edit (i, t, y^o -> y^n) of an ``EditRecord`` (data.py), on the edited model f_e, in percent:
Acc (Eq. 4) f_e(i, t) = y^n; T-Gen (Eq. 5) the same on rephrased questions; I-Gen (Eq. 6) on other
images of the same scope; Loc (Eq. 7) f_e = f on similar out-of-scope samples, f the unedited
model (q_loc: the edit's images asked other questions; m_loc: unrelated samples); HM of T-Gen, I-Gen, Loc.
"= y^n" is teacher-forced token accuracy, as in the authors' and EasyEdit's code (EOS not counted);
Loc compares post- with pre-edit argmax tokens. ``gen_*``: exact match of greedy generations.

Protocols: single (each edit alone: edit, score, remove; Table 3) and sequential (all edits, then
every record; Table 4); both check at the end that the backbone is bit-identical to before.
Baselines: FT (fine-tune layer l) and GRACE (a codebook with a fixed radius).

    python evaluate.py [--protocol sequential]   # TinyVLM on the shipped sample: base, ft, grace, balancedit
    python evaluate.py sweep-alpha | ablate-distance | ablate-negative   # Fig. 5, Tables 6 and 7
    python evaluate.py show-edit | show-codebook                         # pictures of Eq. 3 and Fig. 7
    python evaluate.py study | ablate-key    # many worlds, knobs tuned on dev worlds (study.py)
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

import data
import pictures
from balancedit import (
    BalancEditConfig,
    BalancEditor,
    Codebook,
    EditReport,
    Router,
    distance,
    new_value,
    override,
    train_value,
)

# ---------------- Metrics on predictions (pure Python: testable on hand-made token lists)
PARTS = ("acc", "t_gen", "i_gen", "loc", "q_loc", "m_loc")  # what a record is probed on
TARGET_PARTS = ("acc", "t_gen", "i_gen")  # scored against the target y^n
LOCALITY_PARTS = ("loc", "q_loc", "m_loc")  # scored against the pre-edit model
GEN_PARTS = ("acc", "t_gen", "i_gen", "loc", "q_loc")  # also scored by generation (gen_*)
COLUMNS = (
    "acc",
    "t_gen",
    "i_gen",
    "loc",
    "q_loc",
    "hm",
    "gen_acc",
    "gen_t_gen",
    "gen_i_gen",
    "gen_loc",
    "gen_q_loc",
)
HEADERS = (
    "Acc",
    "T-Gen",
    "I-Gen",
    "Loc",
    "q_loc",
    "HM",
    "gen Acc",
    "gen T-Gen",
    "gen I-Gen",
    "gen Loc",
    "gen q_loc",
)


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
    assert len(predicted) == len(reference) and all(
        len(p) == len(r) > 0 for p, r in zip(predicted, reference)
    )
    per_sample = [sum(a == b for a, b in zip(p, r)) / len(r) for p, r in zip(predicted, reference)]
    return 100.0 * sum(per_sample) / len(per_sample) if per_sample else None


def exact_match(generated: Sequence[str], reference: Sequence[str]) -> Optional[float]:
    """Percent of samples whose generated string equals the reference; None for no samples."""
    assert len(generated) == len(reference)
    return (
        100.0 * sum(g.strip() == r.strip() for g, r in zip(generated, reference)) / len(generated)
        if generated
        else None
    )


def mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Observation:
    """One model on one record's probes: per sample, (argmax, answer) tokens without EOS; generations."""

    tokens: dict[str, list[tuple[list[int], list[int]]]]
    texts: dict[str, list[str]]


def score(post: Observation, pre: Observation, target: str) -> dict[str, Optional[float]]:
    """One record's metrics: the edited model's observation ``post`` against the target y^n
    (Eqs. 4-6) and against the unedited model's observation ``pre`` (Eq. 7)."""
    m: dict[str, Optional[float]] = {}
    for part in TARGET_PARTS:  # Eqs. 4-6: f_e(.) = y^n
        m[part] = token_accuracy(
            [p for p, _ in post.tokens[part]], [y for _, y in post.tokens[part]]
        )
    for part in LOCALITY_PARTS:  # Eq. 7: f_e(i_l, t_l) = f(i_l, t_l)
        m[part] = token_accuracy(
            [p for p, _ in post.tokens[part]], [p for p, _ in pre.tokens[part]]
        )
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


# ---------------- Observing a backbone (batched forward passes and generations)


def probes(record: data.EditRecord) -> dict[str, list[data.Sample]]:
    """The (image, question, answer) samples each metric is measured on."""
    y = record.target
    return {
        "acc": [data.Sample(record.image, record.question, y)],  # Eq. 4
        "t_gen": [data.Sample(record.image, q, y) for q in record.rephrases],  # Eq. 5
        "i_gen": [data.Sample(im, record.question, y) for im in record.rephrase_images],  # Eq. 6
        "loc": list(record.locality),
        "q_loc": list(record.q_locality),
        "m_loc": list(record.m_locality),
    }  # Eq. 7


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
        batch = backbone.to_device(
            backbone.encode(
                [s.image for s in chunk], [s.question for s in chunk], [s.answer for s in chunk]
            )
        )
        with torch.no_grad():
            logits = backbone(**batch).logits  # (B, T, V)
        pred = logits[:, :-1].argmax(-1).cpu()  # (B, T-1): predicts token t+1
        gold = batch["labels"][:, 1:].cpu()  # (B, T-1)
        scored = (gold != -100) & (gold != backbone.eos_token_id)  # (B, T-1): answer tokens, no EOS
        for b, i in enumerate(idx):
            out[i] = (pred[b][scored[b]].tolist(), gold[b][scored[b]].tolist())
    return out


def generations(backbone, samples: Sequence[data.Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers, one per sample (the question alone is the prompt)."""
    out: list = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        for i, a in zip(
            idx,
            backbone.generate([samples[i].image for i in idx], [samples[i].question for i in idx]),
        ):
            out[i] = a
    return out


def observe(backbone, record: data.EditRecord, batch_size: int = 32) -> Observation:
    """Run the backbone (as it is now: attached or not) on all of a record's probes, batched
    across parts: one teacher-forced pass and one generation per batch."""
    parts = probes(record)

    def per_part(run, names):  # run on every sample of the named parts at once, split back per part
        flat, k, out = run(backbone, [s for p in names for s in parts[p]], batch_size), 0, {}
        for p in names:
            out[p], k = flat[k : k + len(parts[p])], k + len(parts[p])
        return out

    return Observation(per_part(token_predictions, PARTS), per_part(generations, GEN_PARTS))


def references(
    backbone, records: Sequence[data.EditRecord], progress: bool = True
) -> list[Observation]:
    """Pre-edit observations, on the unedited model (call before any edit)."""
    return [observe(backbone, r) for r in progress_bar(records, progress, "pre-edit")]


def progress_bar(items, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=not enabled)


# ---------------- The model-unchanged check and the protocols


class ModelChanged(RuntimeError):
    """A method left the backbone different from before its edits."""


@torch.no_grad()
def _edit_logits(backbone, record: data.EditRecord) -> torch.Tensor:
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    return backbone(**batch).logits.cpu()  # (1, T, V)


def _state(backbone) -> dict:
    return {
        **{f"param {n}": p for n, p in backbone.named_parameters()},
        **{f"buffer {n}": b for n, b in backbone.named_buffers()},
    }


# A copy of every parameter and buffer (by name), a record, the plain model's logits on its edit input.
Snapshot = NamedTuple(
    "Snapshot", [("state", dict), ("record", data.EditRecord), ("logits", torch.Tensor)]
)


def snapshot(backbone, record: data.EditRecord) -> Snapshot:
    """Copy every parameter and buffer, and the outputs on one record, to check against later."""
    return Snapshot(
        {k: v.detach().clone() for k, v in _state(backbone).items()},
        record,
        _edit_logits(backbone, record),
    )


def check_unchanged(backbone, before: Snapshot, method_name: str = "method") -> None:
    """Raise ModelChanged unless every parameter and buffer is ``torch.equal`` to the snapshot
    and the outputs on the snapshot's record (no attachment) are bit-identical."""
    now = _state(backbone)
    changed = sorted(now.keys() ^ before.state.keys()) or [
        k for k, v in now.items() if not torch.equal(v, before.state[k])
    ]
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
    refs = refs if refs is not None else references(backbone, records, progress)
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
    refs = refs if refs is not None else references(backbone, records, progress)
    rows, seconds = [], []
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
    refs = refs if refs is not None else references(backbone, records, progress)
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


# ---------------- Baselines, with BalancEdit's interface: edit(record) -> report, attached(), remove(i), len()


class FineTune:
    """FT: fine-tune (a float32 copy of) layer l with Eq. 2's loss, steps and lr. No routing, so
    every input sees the edit; removing any edit undoes them all."""

    def __init__(self, backbone, config: BalancEditConfig):
        self.backbone, self.config, self.tuned, self.n_edits = backbone, config, None, 0
        self.layer_path = config.layer or backbone.target_layer

    def __len__(self) -> int:
        return self.n_edits

    def edit(self, record) -> EditReport:
        start, cfg = time.perf_counter(), self.config
        if self.tuned is None:
            self.tuned = new_value(self.backbone.get_submodule(self.layer_path))
        batch = self.backbone.to_device(
            self.backbone.encode([record.image], [record.question], [record.target])
        )
        losses = train_value(
            self.backbone, self.layer_path, self.tuned, batch, cfg.steps, cfg.lr, cfg.cache
        )
        self.n_edits += 1
        return EditReport(
            self.n_edits - 1,
            "tune",
            [],
            math.nan,
            math.nan,
            math.nan,
            losses,
            time.perf_counter() - start,
        )

    def attached(self):
        return (
            contextlib.nullcontext()
            if self.tuned is None
            else override(self.backbone, self.layer_path, self.tuned)
        )

    def remove(self, i: int) -> None:
        self.tuned, self.n_edits = None, 0


class GraceRouter(Router):
    """GRACE's hook: the query is the layer input at the last prompt position, and a hit replaces the
    layer output at that position only (in GRACE each later token is its own query, far from the key,
    so the answer's later tokens keep the layer). Decoding steps have no prompt position: no edit."""

    def route(self, layer, args, out):
        prompt = self.mask.bool()  # (B, T)
        B, T = prompt.shape
        last = torch.where(prompt, torch.arange(T, device=prompt.device), -1).amax(dim=1)  # (B,)
        q = args[0].reshape(B, T, -1)[torch.arange(B), last.clamp(min=0)]  # (B, D)
        j, _, hit = self.codebook.lookup(q)
        self.last_index = index = torch.where(hit & (last >= 0), j, -1)  # (B,)
        if (index < 0).all():
            return None
        new = out.clone(memory_format=torch.contiguous_format).view(B, T, -1)  # (B, T, D_out)
        for b in (index >= 0).nonzero()[:, 0].tolist():
            new[b, last[b]] = self.codebook.values[int(index[b])].v.to(out.dtype)
        return new.view(out.shape)


class Vector(nn.Module):
    """GRACE's value: a learned vector v (D_out,), the layer's output at the key position. Called
    in training (f_new): v at the ``write`` positions (B, T), layer l's own output elsewhere."""

    def __init__(self, layer: nn.Module, init: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: not trained, not stored
        self.v, self.write = nn.Parameter(init.detach().float().clone()), None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) float32, flattened as l sees it
        y = self.layer(h.to(self.layer.weight.dtype)).float()
        return torch.where(self.write.reshape(*h.shape[:-1], 1), self.v, y)


class Grace:
    """GRACE (Hartvigsen et al. 2023) at the same layer: a Euclidean codebook of vectors with a FIXED
    initial radius eps0. No key within eps0 + eps_j: a new entry; the same target: that ball grows to
    cover the key; another target: a new entry, and both radii become half the distance.
    eps0 = 1 and lr = 1 are GRACE's defaults."""

    def __init__(self, backbone, config: BalancEditConfig, eps0: float = 1.0, lr: float = 1.0):
        self.backbone, self.config, self.eps0, self.lr = backbone, config, eps0, lr
        self.layer_path = config.layer or backbone.target_layer
        self.layer = backbone.get_submodule(self.layer_path)
        self.codebook = Codebook("euc").to(self.layer.weight.device)

    def __len__(self) -> int:
        return len(self.codebook)

    @torch.no_grad()
    def at_key(self, images, questions, answers=None):
        """Layer l's input and output at the last prompt position of a one-row batch, the batch, the position."""
        batch, seen = self.backbone.to_device(self.backbone.encode(images, questions, answers)), []
        with self.layer.register_forward_hook(lambda layer, args, out: seen.append((args[0], out))):
            self.backbone(**batch)
        write = torch.zeros_like(batch["prompt_mask"], dtype=torch.bool)  # (1, T)
        write[0, batch["prompt_mask"][0].nonzero().max()] = True
        h, y = (x.reshape(write.numel(), -1)[write[0]][0].float() for x in seen[0])
        return h, y, batch, write

    def edit(self, record) -> EditReport:
        start, cb, eps0, eps = time.perf_counter(), self.codebook, self.eps0, self.eps0
        k = self.at_key([record.image], [record.question])[0]  # (D,) the key, as the hook sees it
        _, y, batch, write = self.at_key([record.image], [record.question], [record.target])
        action, j = "new", -1
        if len(cb):
            d = distance(k[None], cb.keys, "euc")[0]  # (N,)
            j = int(d.argmin())
            if d[j] <= eps0 + cb.radii[j]:
                action = "expand" if cb.targets[j] == record.target else "split"
                eps = (
                    max(float(cb.radii[j]), float(d[j])) if action == "expand" else float(d[j]) / 2
                )
                cb.radii[j] = eps
        vector = (
            cb.values[j] if action == "expand" else Vector(self.layer, y)
        )  # a new one starts as l's output
        vector.write = write
        losses = train_value(
            self.backbone,
            self.layer_path,
            vector,
            batch,
            self.config.steps,
            self.lr,
            self.config.cache,
        )
        index = j if action == "expand" else cb.add(k, vector, eps, record.target)
        return EditReport(
            index, action, [], math.nan, math.nan, eps, losses, time.perf_counter() - start
        )

    def attached(self) -> GraceRouter:
        return GraceRouter(self.backbone, self.layer_path, self.codebook)

    def remove(self, i: int) -> None:
        self.codebook.remove(i)


METHODS = ("base", "ft", "grace", "balancedit")


def evaluate(
    name: str,
    backbone,
    records,
    cfg,
    protocol: str,
    refs: list[Observation],
    progress: bool = True,
    grace_eps0: float = 1.0,
) -> dict:
    """One method's averaged result under a protocol, against precomputed pre-edit references."""
    if name == "base":
        return run_base(backbone, records, progress, refs)
    method = {"ft": FineTune, "balancedit": BalancEditor}.get(name) or (
        lambda b, c: Grace(b, c, eps0=grace_eps0)
    )
    return PROTOCOLS[protocol](method(backbone, cfg), backbone, records, progress, refs)


# ---------------- Reporting


def table(results: dict[str, dict], first: str = "Method") -> str:
    """Markdown table: one row per result, the teacher-forced scores, HM, the generated ones, s/edit."""
    lines = [
        f"| {first} | " + " | ".join(HEADERS) + " | s/edit |",
        "|" + "---|" * (len(HEADERS) + 2),
    ]
    for name, r in results.items():
        cells = ["-" if r[k] is None else f"{r[k]:.2f}" for k in (*COLUMNS, "seconds_per_edit")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------- Command line


class UsageError(Exception):
    """Bad command-line input found after parsing: one line, exit status 2."""


def load_backbone(args):
    """The backbone named by --backbone, from local files, on --device."""
    import models

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
    """Records from --data (an OKEDIT folder or an MMEdit E-VQA json + --image-root), or the sample."""
    if args.data is None:
        return data.load_sample(limit=args.limit), f"sample ({data.SAMPLE_DIR.name})"
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if path.is_dir():
        return data.load_okedit(path, image_root=args.image_root, limit=args.limit), str(path)
    if args.image_root is None or not Path(args.image_root).is_dir():
        raise UsageError(
            f"--data {path} is an MMEdit json file: it needs --image-root DIR, an existing folder"
        )
    return data.load_mmedit(path, args.image_root, limit=args.limit), str(path)


def make_config(args, **overrides) -> BalancEditConfig:
    """BalancEditConfig from its defaults, the options given (not None) and ``overrides``."""
    given = {k: getattr(args, k, None) for k in CONFIG_HELP if getattr(args, k, None) is not None}
    return BalancEditConfig(**{**given, **overrides})


def check_writable(path: Path, flag: str = "--out", suffix: str = ".json") -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if path.suffix != suffix:
        raise UsageError(f"{flag} {path}: give a path ending in {suffix}")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if (
        not parent.is_dir()
        or not os.access(parent, os.W_OK)
        or (path.exists() and not os.access(path, os.W_OK))
    ):
        raise UsageError(
            f"{flag} {path}: cannot write there ({parent} is not a writable directory)"
        )


@dataclass
class Setup:
    backbone: object
    records: list
    data_name: str
    cfg: BalancEditConfig
    out: Path


def check_environment(args) -> None:
    """Refuse at once a device this machine lacks, and model files that are not on the disk (nothing downloads)."""
    device = torch.device(args.device or "cpu")  # a name torch does not know raises here
    if device.type != "cpu" and (
        device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"--device {args.device}: not on this machine ({torch.cuda.device_count()} CUDA GPUs)"
        )
    needs = {"blip2": ("model",), "minigpt4": ("model", "blip2", "projection")}.get(
        args.backbone, ()
    )
    for name in needs:  # local copies only, made as the README's replication sections say
        if not (getattr(args, name) and Path(getattr(args, name)).expanduser().exists()):
            raise UsageError(
                f"--backbone {args.backbone} needs --{name}, a local copy (see the README: nothing downloads)"
            )


def setup(args) -> Setup:
    """Everything that can fail on bad input, cheapest first (options, output, data, the model)."""
    cfg = make_config(args)
    out = Path(args.out or default_out(args.command, args.protocol))
    check_writable(out, suffix=".png" if args.command.startswith("show") and args.out else ".json")
    out = out.with_suffix(".json")  # a picture's numbers go beside it
    check_environment(args)
    records, data_name = load_records(args)
    if not records or not 0 <= getattr(args, "record", 0) < len(records):
        raise UsageError(f"{len(records)} records in {data_name}; --record must be one of them")
    backbone = load_backbone(args)
    backbone.check(records)  # targets it cannot spell, questions too long for it
    torch.manual_seed(cfg.seed)
    return Setup(backbone, records, data_name, cfg, out)


def header(args, s: Setup) -> dict:
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
    results = {
        name: evaluate(
            name, s.backbone, s.records, s.cfg, args.protocol, refs, args.progress, args.grace_eps0
        )
        for name in args.methods
    }
    print(table(results))
    return {**header(args, s), "grace_eps0": args.grace_eps0, "methods": results}


def ablate(parameter: str, values: Sequence = ()) -> Callable:
    """The command for an ablation: BalancEdit under --protocol once per value of one config field
    (``values``, else --alphas); sweep-alpha also draws paper Fig. 5."""

    def command(args, s: Setup) -> dict:
        refs = references(s.backbone, s.records, args.progress)
        results = {
            str(v): evaluate(
                "balancedit",
                s.backbone,
                s.records,
                make_config(args, **{parameter: v}),
                args.protocol,
                refs,
                args.progress,
            )
            for v in values or args.alphas
        }
        print(table(results, first=parameter))
        if parameter == "alpha":
            pictures.plot_sweep(results, "alpha", s.out.with_suffix(".png"))
        return {**header(args, s), "parameter": parameter, "settings": results}

    return command


def show_edit(args, s: Setup) -> dict:
    """One edit's probes against its radius: why each was, or was not, edited (Eq. 3)."""
    record = s.records[args.record]
    report, probes = pictures.edit_probes(BalancEditor(s.backbone, s.cfg), record)
    pictures.show_edit(
        report,
        probes,
        s.out.with_suffix(".png"),
        f"record {record.id}: {record.question!r} -> "
        f"{record.target!r}\nfilled: the answer changed; green: as it should",
    )
    return {**header(args, s), "record": record.id, **report, "probes": probes}


def show_codebook(args, s: Setup) -> dict:
    """The codebook after editing every record in order, its keys and balls in 2-D (paper Fig. 7)."""
    editor = BalancEditor(s.backbone, s.cfg)
    for record in progress_bar(s.records, args.progress, "edits"):
        editor.edit(record)
    return {
        **header(args, s),
        **pictures.show_codebook(editor, s.records, s.out.with_suffix(".png")),
    }


COMMANDS: dict[
    str, tuple[Callable, str, str | None]
] = {  # name -> (function, help, the option it sets)
    "run": (cmd_run, "evaluate methods (the default command)", None),
    "sweep-alpha": (
        ablate("alpha"),
        "BalancEdit for each alpha: table + PNG plot (paper Fig. 5)",
        "alpha",
    ),
    "ablate-distance": (
        ablate("distance", ["cos", "euc"]),
        "BalancEdit with cos vs euc distance (paper Table 6)",
        "distance",
    ),
    "ablate-negative": (
        ablate("negative", data.ANCHORS),
        "BalancEdit with black/white/noise negatives (paper Table 7)",
        "negative",
    ),
    "show-edit": (
        show_edit,
        "a picture of one edit's probes against its radius (--out FILE.png)",
        None,
    ),
    "show-codebook": (
        show_codebook,
        "a picture of the codebook after sequential edits (--out FILE.png)",
        None,
    ),
}
STUDIES = (
    "study",
    "ablate-key",
)  # TinyVLM on fresh worlds, knobs tuned on dev worlds: study.py parses their options


def default_out(command: str, protocol: str = "single") -> str:
    name = "main" if command == "run" else command.replace("-", "_")
    return f"results/{name}{'' if protocol == 'single' else '_' + protocol}.json"


def _number(cast: type, ok: Callable, want: str):
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


_unit = _number(float, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]")


def _csv(item: Callable):
    return lambda text: [item(t.strip()) for t in text.split(",")]


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump): ``prog: error: message``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


POSITIVE_INT = _number(int, lambda n: n > 0, "a positive integer")
POSITIVE = _number(float, lambda x: 0 < x < math.inf, "a positive number")
CONFIG_HELP = {  # the BalancEditConfig options: argparse keywords
    "alpha": dict(type=_unit, help="Eq. 3 radius interpolation in [0, 1]"),
    "distance": dict(choices=("cos", "euc"), help="key distance (paper Table 6)"),
    "pool": dict(
        choices=("mean", "last"),
        help="the key: the mean over the prompt (the paper's) or its last position",
    ),
    "negative": dict(choices=data.ANCHORS, help="negative anchor image (paper Table 7)"),
    "steps": dict(type=POSITIVE_INT, help="optimizer steps per edit (Eq. 2)"),
    "lr": dict(type=POSITIVE, help="learning rate per edit (Eq. 2)"),
    "value_form": dict(choices=("full", "lora"), help="value v_k: full copy of the layer or low-rank"),
    "rank": dict(type=POSITIVE_INT, help="rank of a lora value"),
    "seed": dict(type=int, help="seed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evaluate.py",
        allow_abbrev=False,
        description="Score model editors (paper "
        "Appendix C). With no command: run (TinyVLM, the shipped sample, every method, single edits).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, text, ablated) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        g = p.add_argument_group("backbone and data")
        g.add_argument(
            "--backbone",
            choices=("tiny", "blip2", "minigpt4"),
            default="tiny",
            help="default: tiny",
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
            "--projection",
            help="minigpt4: MiniGPT-4's released checkpoint (.pth, read weights-only)",
        )
        g.add_argument(
            "--data",
            help="OKEDIT-layout folder, or MMEdit E-VQA .json with --image-root "
            "(default: the shipped sample)",
        )
        g.add_argument(
            "--image-root", help="image folder of an MMEdit json (or OKEDIT's val2014 parent)"
        )
        g.add_argument("--limit", type=POSITIVE_INT, help="first N records only")
        g.add_argument(
            "--device", help="torch device (default: cpu for tiny, cuda if available for blip2)"
        )
        g.add_argument(
            "--protocol", choices=tuple(PROTOCOLS), default="single", help="default: single"
        )
        g.add_argument(
            "--out",
            help=f"JSON output path (default: {default_out(name)}, "
            f"{default_out(name, 'sequential')} with --protocol sequential)",
        )
        g.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bars"
        )
        c = p.add_argument_group("BalancEditConfig (default: the config's own defaults)")
        for option, kwargs in CONFIG_HELP.items():
            if option != ablated:  # an ablation sets its own
                c.add_argument(f"--{option}", **kwargs)
    for name in STUDIES:
        sub.add_parser(name, help=__import__("study").HELP[name], add_help=False)
    run = sub.choices["run"]
    run.add_argument(
        "--methods",
        type=_csv(_number(str, METHODS.__contains__, f"one of {','.join(METHODS)}")),
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
        "--record", type=int, default=0, help="which record (default 0)"
    )
    sub.choices["sweep-alpha"].add_argument(
        "--alphas",
        type=_csv(_unit),
        default=[i / 10 for i in range(11)],
        help="comma list of alphas in [0, 1] (default 0,0.1,...,1)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; with no command, ``run``."""
    argv = list(argv)
    if argv and argv[0] in STUDIES:  # their own options
        return __import__("study").parse_args(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv  # run is the default command
    return build_parser().parse_args(argv)  # bad options: one error line, exit 2


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in STUDIES:
        return __import__("study").main(args)
    try:
        s = setup(args)
    except (UsageError, data.DataError, OSError, ValueError, RuntimeError) as e:
        build_parser().exit(2, f"evaluate.py {args.command}: error: {e}\n")
    result = COMMANDS[args.command][0](args, s)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
