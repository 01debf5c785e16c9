"""Score model editors: the paper's metrics (Appendix C) and protocols.

For an edit (i, t, y^o -> y^n) of an ``EditRecord`` (data.py), on the edited model f_e, in
percent: Acc (Eq. 4) f_e(i, t) = y^n; T-Gen (Eq. 5) the same on rephrased questions; I-Gen
(Eq. 6) on other images of the same scope; Loc (Eq. 7) f_e = f on similar out-of-scope samples,
f the unedited model (q_loc: the edit's images asked other questions; m_loc: unrelated samples);
HM of T-Gen, I-Gen and Loc. "= y^n" is teacher-forced token accuracy, as in the authors' and
EasyEdit's code (EOS not counted); Loc compares post- with pre-edit argmax tokens. ``gen_*``:
exact match of greedy generations.

Protocols: single (each edit alone: edit, score, remove; Table 3) and sequential (all edits,
then every record; Table 4); both check at the end that the backbone is bit-identical to before.
The methods: the unedited model, the baselines (FT, GRACE of baselines.py; MEND, IKE) and
BalancEdit. The
command line lives in cli.py, which imports this module; this file is its entry point:

    python evaluate.py [--protocol sequential]   # TinyVLM, the shipped sample, every method
    python evaluate.py sweep-alpha | ablate-distance | ablate-negative   # Fig. 5, Tables 6, 7
    python evaluate.py show-edit | show-codebook   # pictures of Eq. 3 and of Fig. 7
"""

import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch

import data
import ike
import journal
import mend
from balancedit import BalancEditConfig, BalancEditor
from baselines import FineTune, FTConfig, Grace, GraceConfig
from editor import Editor

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


def observe(
    backbone, record: data.EditRecord, batch_size: int = 32, prefix: str = ""
) -> Observation:
    """Run the backbone (as it is now: attached or not) on all of a record's probes, batched
    across parts: one teacher-forced pass and one generation per batch. ``prefix``: text
    before every probe's question (IKE's edit)."""
    parts = {
        p: [data.Sample(s.image, prefix + s.question, s.answer) for s in samples]
        for p, samples in probes(record).items()
    }
    tokens = _per_part(token_predictions, backbone, parts, PARTS, batch_size)
    texts = _per_part(generations, backbone, parts, GEN_PARTS, batch_size)
    return Observation(tokens, texts)


def references(backbone, records: Sequence[data.EditRecord], progress: bool = True) -> dict:
    """Pre-edit observations by record id, on the unedited model (call before any edit)."""
    return {r.id: observe(backbone, r) for r in progress_bar(records, progress, "pre-edit")}


def reference(backbone, record: data.EditRecord, refs: dict) -> Observation:
    """The record's pre-edit observation from ``refs`` (by record id), made there on first use:
    call it on the unedited model (not attached)."""
    if record.id not in refs:
        refs[record.id] = observe(backbone, record)
    return refs[record.id]


def progress_bar(items, enabled: bool, desc: str, resumed: int = 0):
    """``items`` with a tqdm bar on stderr (or none): done, out of all, and an ETA; ``resumed``
    items read back from a journal count as done from the start, not in the ETA."""
    from tqdm import tqdm

    more = {}
    if resumed:
        more = dict(total=len(items) + resumed, initial=resumed, postfix=f"{resumed} resumed")
    return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=not enabled, **more)


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
    refs: Optional[dict] = None,
    log: Optional[journal.Part] = None,
) -> dict:
    """The unedited model scored against the targets (no edit; Loc is 100 by definition).
    ``refs``: pre-edit observations by record id (``reference``); ``log``: the journal's part
    that holds each scored record, and knows those scored already (default: one in memory)."""
    log = journal.Journal().part("base") if log is None else log
    refs = {} if refs is None else refs
    for record in progress_bar(log.todo(records), progress, "base", log.resumed(records)):
        ref = reference(backbone, record, refs)
        log.add(record.id, score(ref, ref, record.target), None)
    return summarize(*log.collect(records))


def run_single(
    method,
    backbone,
    records: Sequence[data.EditRecord],
    progress: bool = True,
    refs: Optional[dict] = None,
    log: Optional[journal.Part] = None,
) -> dict:
    """Single-edit protocol (paper Table 3): for each record, edit, score the edited model,
    remove the edit. Raises ModelChanged if the backbone is not as before at the end. The
    records are independent: those the journal holds are not scored again, and each process of
    several scores its share."""
    log = journal.Journal().part("") if log is None else log
    refs = {} if refs is None else refs
    name = type(method).__name__
    before = snapshot(backbone, records[0])
    for record in progress_bar(log.todo(records), progress, name, log.resumed(records)):
        ref = reference(backbone, record, refs)
        report = method.edit(record)
        with method.attached():
            row = score(observe(backbone, record, prefix=method.prefix(record)), ref, record.target)
        method.remove(report.index)
        log.add(record.id, row, report.seconds)
    check_unchanged(backbone, before, name)
    return summarize(*log.collect(records))


def run_sequential(
    method,
    backbone,
    records: Sequence[data.EditRecord],
    progress: bool = True,
    refs: Optional[dict] = None,
    log: Optional[journal.Part] = None,
) -> dict:
    """Sequential protocol (paper Table 4): all edits in order, then every record scored on the
    model holding all of them; then every edit is removed and the unchanged check runs. A
    resumed run edits from the journal's last checkpoint on (``edit_all``) and scores the
    records the journal does not hold."""
    log = journal.Journal().part("") if log is None else log
    refs = {} if refs is None else refs
    name = type(method).__name__
    before = snapshot(backbone, records[0])
    todo = log.todo(records)
    if todo:
        for record in todo:
            reference(backbone, record, refs)  # before any edit
        method, seconds = edit_all(method, backbone, records, log, progress)
        edit_seconds = dict(zip([r.id for r in records], seconds))  # by record id
        with method.attached():
            for r in progress_bar(todo, progress, f"{name} scoring", log.resumed(records)):
                row = score(observe(backbone, r, prefix=method.prefix(r)), refs[r.id], r.target)
                log.add(r.id, row, edit_seconds[r.id])
        while len(method):
            method.remove(len(method) - 1)
    check_unchanged(backbone, before, name)
    return summarize(*log.collect(records))


SAVED = (BalancEditor, FineTune, Grace)  # editors whose save(folder) and load hold their edits


def edit_all(method, backbone, records, log: journal.Part, progress: bool):
    """Every record's edit, in order, from the log's last checkpoint on. An editor of SAVED is
    saved every ``log.every`` edits and after the last; another (MEND's edits are one gradient
    each) redoes its edits when its run resumes. Returns the editor holding every edit, and each
    edit's seconds."""
    saves = log.every > 0 and isinstance(method, SAVED)
    latest = log.latest() if saves else None
    seconds = []
    if latest is not None:
        folder, seconds = latest
        method = type(method).load(folder, backbone)
    name = type(method).__name__
    for record in progress_bar(records[len(seconds) :], progress, f"{name} edits", len(seconds)):
        seconds.append(method.edit(record).seconds)
        if saves and (len(seconds) % log.every == 0 or len(seconds) == len(records)):
            log.save(method.save, seconds)
    return method, seconds


PROTOCOLS = {"single": run_single, "sequential": run_sequential}
METHODS = ("base", "ft", "grace", "balancedit", "mend", "ike")
IKE_SEED = 2001  # the training world whose edits are IKE's demonstrations (MEND's first)


def make_editor(
    name: str, backbone, cfg: BalancEditConfig, grace_eps0: float = 1.0, retriever=None
) -> Editor:
    """The editor ``name`` of METHODS (not "base"). They share ``cfg``'s layer, steps and
    cache; FT also its lr, while GRACE keeps its own lr and takes ``grace_eps0``; MEND brings
    its own layers and trained network; IKE the demonstrations of its world's training edits,
    retrieved by ``retriever`` (default: ike.WordCounts)."""
    shared = dict(layer=cfg.layer, steps=cfg.steps, cache=cfg.cache)
    if name == "ft":
        return FineTune(backbone, FTConfig(lr=cfg.lr, **shared))
    if name == "grace":
        return Grace(backbone, GraceConfig(eps0=grace_eps0, **shared))
    if name == "mend":
        return mend.shipped(backbone)  # its trained editor network, for this model
    if name == "ike":
        store = ike.demonstrations(mend.world_of(backbone).examples(IKE_SEED))
        return ike.IKE(backbone, store, retriever)
    return BalancEditor(backbone, cfg)


def run_method(
    name: str,
    backbone,
    records,
    cfg,
    protocol: str,
    refs: Optional[dict] = None,
    progress: bool = True,
    log: Optional[journal.Part] = None,
    grace_eps0: float = 1.0,
    retriever=None,
) -> dict:
    """One method of METHODS, its averaged result under a protocol; ``refs`` (pre-edit
    observations by record id) and ``log`` (a journal's part) as the protocols take them."""
    if name == "base":
        return run_base(backbone, records, progress, refs, log)
    method = make_editor(name, backbone, cfg, grace_eps0, retriever)
    return PROTOCOLS[protocol](method, backbone, records, progress, refs, log)


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


if __name__ == "__main__":  # cli imports this module, so it is imported here, not at the top
    import cli

    sys.exit(cli.main())
