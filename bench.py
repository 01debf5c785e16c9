"""Speed and memory of BalancEdit, each figure measured side by side in one run.

    python bench.py [--json PATH] [--quick]
    python bench.py --real-size [--device cuda]   # a random BLIP-2 OPT-2.7B at its true size

1. One edit (Eq. 2) by the plain loop vs on cached activations, on TinyVLM, on a random BLIP-2 OPT
   with OPT-2.7B's 32 decoder layers and on a random MiniGPT-4 with Vicuna-7B's 32 LLaMA layers,
   and the largest difference of the trained weights.
2. One edit's cost in forward passes (its wall time over one plain forward of the edit's batch),
   at OPT-125m's text shape with the authors' 50 steps: a random BLIP-2 (fc2) and a random
   MiniGPT-4 (up_proj, LLaMA-7B's vocabulary), by the plain loop, by the previous cached path
   (``previous_edit``) and by the editor.
3. Seconds per edit of each editor (FT, GRACE, BalancEdit, MEND) on TinyVLM, and MEND's training.
4. The routing hook's overhead: a forward with and without the hook, every sample out of scope,
   for 1 to 10,000 codebook entries.
5. Bytes per entry on OPT-2.7B's fc2, a full value vs low-rank ones, and HM of full vs rank-8
   values.
6. Seconds per edit over 1,000 sequential edits, the last 100 against the first 100.

``--real-size`` measures only one edit of a random BLIP-2 OPT-2.7B at its true size (realsize.py).

Timings use time.perf_counter with warm-up turns and medians; the variants compared take turns
in one loop, so noise on a shared machine hits them alike. The figures go to stdout and JSON.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import balancedit
import cli
import data
import evaluate
import mend
import models
import realsize
import world
from blip2 import Blip2OPT, random_blip2
from minigpt4 import MiniGPT4, random_minigpt4

TINYVLM = "TinyVLM (assets/tinyvlm)"
# OPT-2.7B's and Vicuna-7B's 32 decoder layers, at a small width
BLIP2_DEPTH = dict(layers=32, hidden=64, ffn=256)
# OPT-125m's text shape (12 layers, width 768, FFN 3,072) with BLIP-2's 32 query tokens
OPT_125M = dict(layers=12, hidden=768, ffn=3072, n_query=32)
HOOK_SIZES = (1, 100, 1_000, 10_000)
# repeats of each figure, sequential edits and their window, records for the HM comparison
FULL = dict(edit=5, cost=2, hook=21, n_edits=1000, window=100, hm_records=None)
QUICK = dict(edit=3, cost=1, hook=7, n_edits=200, window=20, hm_records=4)

SPREADS: dict[str, float] = {}  # each timed variant's (max - min) / median over its repeats
BUSY_SPREAD = 0.25  # a wider spread: other work shared the cores, and the ratios are rough


def alternate(
    fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each variant; each ``fn()`` times one run of its work and returns the
    seconds. The variants take turns (A B, B A, ...); the first ``warmup`` turns do not count."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for turn in range(warmup + repeats):
        for name in names if turn % 2 == 0 else names[::-1]:
            seconds = fns[name]()
            if turn >= warmup:
                times[name].append(seconds)
    for name, ts in times.items():
        spread = (max(ts) - min(ts)) / statistics.median(ts)  # 0 on an idle machine
        SPREADS[name] = spread
        if spread > BUSY_SPREAD:
            print(
                f"note: {name}'s repeats spread {spread:.0%}: the machine was busy", file=sys.stderr
            )
    return {name: statistics.median(ts) for name, ts in times.items()}


def entry_bytes(value: torch.nn.Module, key_dim: int) -> int:
    """Bytes one codebook entry really holds: the value's parameters, any gradients left on
    them, its saved buffers, its key and radius. A LoRA value's base layer is shared with the
    model, not held: its buffers are not saved (not in the state dict), and not counted."""
    saved = value.state_dict()
    tensors = [
        *value.parameters(),
        *(p.grad for p in value.parameters() if p.grad is not None),
        *(b for name, b in value.named_buffers() if name in saved),
    ]
    return sum(t.numel() * t.element_size() for t in tensors) + key_dim * 4 + 4


def bytes_per_entry() -> dict[str, dict]:
    """Value and entry bytes of a full value and of LoRA values of rank 4, 8 and 16 on OPT-2.7B's
    fc2, an fp16 ``nn.Linear(10240, 2560)`` on the meta device (nothing is allocated)."""
    fc2 = torch.nn.Linear(10240, 2560, device="meta", dtype=torch.float16)
    values = {"full": balancedit.new_value(fc2, "full")}
    values.update({f"lora{r}": balancedit.new_value(fc2, "lora", r) for r in (4, 8, 16)})
    entry = {name: entry_bytes(value, 10240) for name, value in values.items()}
    key = 10240 * 4 + 4  # the key and the radius, float32
    return {
        name: {"value_bytes": n - key, "entry_bytes": n, "ratio_to_full": n / entry["full"]}
        for name, n in entry.items()
    }


def editor_edit(backbone, record: data.EditRecord, cfg, cache: bool) -> Callable:
    """One edit of ``record`` by a fresh editor, on cached activations or not; returns the
    trained value."""

    def edit() -> torch.nn.Module:
        editor = balancedit.BalancEditor(backbone, dataclasses.replace(cfg, cache=cache))
        editor.edit(record)
        return editor.codebook.values[0]

    return edit


def timed_edit(name: str, edit: Callable[[], torch.nn.Module], trained: dict) -> float:
    """The seconds ``edit()`` takes; a copy of the value it trained goes to ``trained[name]``."""
    seconds, value = realsize.timed(edit)
    trained[name] = [p.detach().clone() for p in value.parameters()]
    return seconds


def edit_turns(edits: dict[str, Callable], trained: dict) -> dict[str, Callable[[], float]]:
    """For ``alternate``: each edit's ``timed_edit``."""
    return {
        name: functools.partial(timed_edit, name, edit, trained) for name, edit in edits.items()
    }


def rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``max|a - b| / max|b|`` over two trained values' parameters."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return diff / max(float(y.abs().max()) for y in b)


def bench_edit_speed(backbone, record: data.EditRecord, cfg, repeats: int) -> dict:
    """Seconds of one edit with Eq. 2 by the plain loop (``cache=False``) and on cached activations,
    same steps, lr and seed; and the trained values' ``rel_diff``."""
    trained = {}
    edits = {
        "naive": editor_edit(backbone, record, cfg, cache=False),
        "cached": editor_edit(backbone, record, cfg, cache=True),
    }
    s = alternate(edit_turns(edits, trained), repeats)
    return {
        "naive_s": s["naive"],
        "cached_s": s["cached"],
        "speedup": s["naive"] / s["cached"],
        "weights_max_rel_diff": rel_diff(trained["cached"], trained["naive"]),
        "steps": cfg.steps,
    }


def opt125m_blip2(seed: int = 0) -> Blip2OPT:
    """A random BLIP-2 whose OPT has OPT-125m's shape and vocabulary (the world's words keep
    their ids; the other 50,000-odd rows are random)."""
    backbone = random_blip2(**OPT_125M, seed=seed)
    backbone.model.language_model.resize_token_embeddings(realsize.OPT_VOCAB, mean_resizing=False)
    return backbone


def opt125m_minigpt4(seed: int = 0) -> MiniGPT4:
    """A random MiniGPT-4 whose LLaMA has OPT-125m's depth and widths and LLaMA-7B's vocabulary."""
    backbone = random_minigpt4(**OPT_125M, seed=seed)
    backbone.llama_model.resize_token_embeddings(32000, mean_resizing=False)
    return backbone


def previous_edit(backbone, record: data.EditRecord, cfg) -> torch.nn.Module:
    """The cached path before one forward prepared an edit, for the comparison: the keys of the
    edit, Pos and Neg from their own forward, then a second forward records the edit's own batch
    and each of Eq. 2's steps runs the value and the network after l at every position (the
    tail of ``per_position=False``). Returns the trained value (the radius is not computed)."""
    editor = balancedit.BalancEditor(backbone, cfg)
    black = data.anchor_image(cfg.negative, record.image.size, seed=cfg.seed)
    questions = [record.question, editor.positive_question(record), record.question]
    editor.keys_of([record.image, record.image, black], questions)  # (3, D)
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    torch.manual_seed(cfg.seed)  # as the editor does, for LoRA's A
    value = balancedit.new_value(editor.layer, cfg.value_form, cfg.rank)
    path = editor.layer_path
    tail = backbone.tail(batch, path)  # every position of the row
    balancedit.train_value(backbone, path, value, batch, cfg.steps, cfg.lr, tail)
    return value


def bench_edit_cost(
    backbone, record: data.EditRecord, cfg, repeats: int, forwards: int = 5
) -> dict:
    """One edit's wall time over one plain forward (no_grad) of the edit's batch, for the plain
    loop (``cache=False``), the previous cached path (``previous_edit``) and the editor; each
    turn times ``forwards`` forwards and keeps their median. After one untimed forward and edit,
    the four take turns ``repeats`` times. Also the ``rel_diff`` of each trained value against
    the plain loop's."""
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    head = max(backbone.parameters(), key=torch.Tensor.numel)  # the LM head (V, D): the largest

    def forward() -> float:
        with torch.no_grad():
            seconds = [realsize.timed(lambda: backbone(**batch))[0] for _ in range(forwards)]
        return statistics.median(seconds)

    def read() -> float:  # one pass over the LM head's weight, the least a step reads twice
        return realsize.timed(lambda: float(head.detach().sum()))[0]

    trained = {}
    edits = {
        "plain": editor_edit(backbone, record, cfg, cache=False),
        "previous": lambda: previous_edit(backbone, record, cfg),
        "new": editor_edit(backbone, record, cfg, cache=True),
    }
    forward()  # warm-up: the first calls allocate and pick kernels
    edits["new"]()
    s = alternate({"forward": forward, "read": read, **edit_turns(edits, trained)}, repeats, 0)
    out = {"positions": batch["input_ids"].shape[1], "steps": cfg.steps, "forward_s": s["forward"]}
    # Each step reads the head twice (the logits, then their gradient): the steps' floor.
    out["head_read_s"] = s["read"]
    out["steps_floor_forwards"] = 2 * cfg.steps * s["read"] / s["forward"]
    for name in edits:
        out[f"{name}_s"] = s[name]
        out[f"{name}_forwards"] = s[name] / s["forward"]
        out[f"{name}_weights_max_rel_diff"] = rel_diff(trained[name], trained["plain"])
    out["new_vs_plain"] = s["plain"] / s["new"]
    out["new_vs_previous"] = s["previous"] / s["new"]
    return out


def far_keys(queries: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` keys far from every query (B, D): negated, rescaled copies of the queries plus a little
    positive noise -> (n, D). OPT's fc2 input is a ReLU output (>= 0), so every query is at cosine
    distance >= 1 from these keys."""
    g = torch.Generator().manual_seed(seed)
    q = queries.detach().float().cpu()  # (B, D)
    pick = torch.randint(0, q.shape[0], (n,), generator=g)  # (n,)
    scale = 0.5 + torch.rand(n, 1, generator=g)  # (n, 1)
    noise = 0.1 * q.abs().mean() * torch.rand(n, q.shape[1], generator=g)  # (n, D)
    return -(q[pick] * scale + noise)  # (n, D)


def bench_hook_overhead(
    backbone,
    records: Sequence[data.EditRecord],
    cfg,
    sizes: Sequence[int] = HOOK_SIZES,
    repeats: int = 21,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[int, dict]:
    """A forward of ``batch_size`` samples with the routing hook (N entries whose keys are far from
    every sample, radius 0) against no hook; every turn checks that all rows miss and the logits
    are bit-identical. The entries share one rank-1 value, so 10,000 of them fit in memory."""
    chunk = [records[i % len(records)] for i in range(batch_size)]
    images = [r.image for r in chunk]
    questions = [r.question for r in chunk]
    batch = backbone.to_device(backbone.encode(images, questions, [r.target for r in chunk]))
    layer_path = backbone.target_layer
    keys = far_keys(
        balancedit.BalancEditor(backbone, cfg).keys_of(images, questions), max(sizes), seed=cfg.seed
    )
    value = balancedit.new_value(backbone.get_submodule(layer_path), "lora", 1)
    codebook = balancedit.Codebook(cfg.distance)
    with torch.no_grad():
        plain_logits = backbone(**batch).logits
    out = {}
    for n in evaluate.progress_bar(sorted(sizes), progress, "hook overhead"):
        start = time.perf_counter()
        for key in keys[len(codebook) : n]:  # grow the same codebook to n entries
            codebook.add(key, value, 0.0, "far")
        build = time.perf_counter() - start

        def plain() -> float:
            return realsize.timed(lambda: backbone(**batch))[0]

        def hooked() -> float:
            with balancedit.Router(backbone, layer_path, codebook) as router:
                seconds, logits = realsize.timed(lambda: backbone(**batch).logits)
            if not bool((router.last_index == -1).all()) or not torch.equal(logits, plain_logits):
                raise AssertionError(
                    f"hook overhead: a row was routed, or out-of-scope logits changed ({n} entries)"
                )
            return seconds

        with torch.no_grad():
            s = alternate({"plain": plain, "hooked": hooked}, repeats)
        out[n] = {
            "plain_s": s["plain"],
            "hooked_s": s["hooked"],
            "ratio": s["hooked"] / s["plain"],
            "build_s": build,
        }
    return out


def bench_sequential(
    backbone, records: Sequence[data.EditRecord], cfg, window: int, progress: bool = True
) -> dict:
    """Edits ``records`` in order on one codebook: mean seconds per edit over the first and the
    last ``window`` edits, and their ratio."""
    editor = balancedit.BalancEditor(backbone, cfg)
    seconds = []
    actions = {}  # how many edits took each action
    for r in evaluate.progress_bar(records, progress, "sequential edits"):
        took, report = realsize.timed(lambda: editor.edit(r))
        seconds.append(took)
        actions[report.action] = actions.get(report.action, 0) + 1
    first = statistics.mean(seconds[:window])
    last = statistics.mean(seconds[-window:])
    return {
        "n_edits": len(records),
        "window": window,
        "steps": cfg.steps,
        "first_s": first,
        "last_s": last,
        "ratio": last / first,
        "entries_at_end": len(editor),
        "actions": actions,
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A section of the report: its title and a markdown table."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def section_edit_speed(tiny, record, cfg, repeats: int) -> tuple[dict, dict]:
    """Figure 1: the plain loop vs cached activations on three backbones."""
    depth = "{layers} {kind} layers (hidden {hidden}, ffn {ffn})"
    blip2_name = "random BLIP-2 OPT, " + depth.format(kind="decoder", **BLIP2_DEPTH)
    llama_name = "random MiniGPT-4, " + depth.format(kind="LLaMA", **BLIP2_DEPTH)
    blip2 = random_blip2(**BLIP2_DEPTH, seed=cfg.seed)
    llama = random_minigpt4(**BLIP2_DEPTH, seed=cfg.seed)
    rows = {
        TINYVLM: bench_edit_speed(tiny, record, cfg, repeats),
        blip2_name: bench_edit_speed(blip2, record, cfg, repeats),
        llama_name: bench_edit_speed(llama, record, cfg, repeats),
    }
    cells = [
        (
            name,
            f"{r['naive_s']:.3f}",
            f"{r['cached_s']:.3f}",
            f"{r['speedup']:.1f}x",
            f"{r['weights_max_rel_diff']:.2e}",
        )
        for name, r in rows.items()
    ]
    print_table(
        f"One edit: the plain loop vs cached activations ({cfg.steps} steps, median of {repeats})",
        ("backbone", "plain loop s/edit", "cached s/edit", "speedup", "max rel. weight diff"),
        cells,
    )
    figures = {
        "edit_speedup_blip2_depth": rows[blip2_name]["speedup"],
        "edit_speedup_llama_depth": rows[llama_name]["speedup"],
        "edit_weights_max_rel_diff": max(r["weights_max_rel_diff"] for r in rows.values()),
    }
    return figures, {"edit_speed": rows}


def section_editors(tiny, record, cfg, repeats: int) -> tuple[dict, dict]:
    """Seconds per edit of every editor of the comparison on TinyVLM, taking turns, and MEND's
    pre-training time (the paper's Table 5: an edit's cost, and what it needs first); then
    the seconds per scored probe on each edited model (IKE's edit makes every prompt longer)."""
    names = [m for m in evaluate.METHODS if m != "base"]
    editors = {name: evaluate.make_editor(name, tiny, cfg) for name in names}  # made once

    def one_edit(name: str) -> float:
        seconds, report = realsize.timed(lambda: editors[name].edit(record))
        editors[name].remove(report.index)  # the next turn edits the plain model again
        return seconds

    s = alternate({name: functools.partial(one_edit, name) for name in names}, repeats)
    trained = json.loads((mend.WORLDS["tiny"].editor / "mend.json").read_text())["training"]
    cells = [(name, f"{s[name]:.3f}", f"{s[name] / s['balancedit']:.2f}x") for name in names]
    print_table(
        f"One edit by each editor on TinyVLM (median of {repeats}); MEND first trained "
        f"{trained['seconds']} s on {trained['examples']} edits",
        ("editor", "s/edit", "vs BalancEdit"),
        cells,
    )
    n_probes = sum(len(samples) for samples in evaluate.probes(record).values())

    def one_scoring(name: str) -> float:
        editor = editors[name]
        report = editor.edit(record)
        prefix = editor.prefix(record)
        with editor.attached():
            seconds, _ = realsize.timed(lambda: evaluate.observe(tiny, record, prefix=prefix))
        editor.remove(report.index)
        return seconds / n_probes

    p = alternate({name: functools.partial(one_scoring, name) for name in names}, repeats)
    cells = [(name, f"{1000 * p[name]:.1f}", f"{p[name] / p['balancedit']:.2f}x") for name in names]
    print_table(
        f"One scored probe on the edited TinyVLM (a record's {n_probes}, median of {repeats})",
        ("editor", "ms/probe", "vs BalancEdit"),
        cells,
    )
    figures = {
        "mend_edit_vs_balancedit": s["mend"] / s["balancedit"],
        "ike_edit_vs_balancedit": s["ike"] / s["balancedit"],
        "ike_probe_vs_balancedit": p["ike"] / p["balancedit"],
    }
    return figures, {"editors_s_per_edit": s, "editors_s_per_probe": p, "mend_training": trained}


def section_edit_cost(cfg, repeats: int) -> tuple[dict, dict]:
    """Figure 2: one edit in forward passes at OPT-125m's shape, 50 steps, three ways."""
    cfg = dataclasses.replace(cfg, **cli.AUTHORS_TRAINING)
    record = data.load_sample(limit=1)[0]
    rows = {
        "random BLIP-2, OPT-125m's shape (fc2, vocabulary 50,272)": bench_edit_cost(
            opt125m_blip2(cfg.seed), record, cfg, repeats
        ),
        "random MiniGPT-4, a LLaMA of that shape (up_proj, vocabulary 32,000)": bench_edit_cost(
            opt125m_minigpt4(cfg.seed), record, cfg, repeats
        ),
    }
    header = ("backbone", "positions", "forward ms", "plain loop", "previous cached", "editor")
    header += ("editor vs plain", "editor vs previous", "max rel. weight diff", "steps' floor")
    cells = []
    for name, r in rows.items():
        ways = [f"{r[f'{way}_forwards']:.1f}" for way in ("plain", "previous", "new")]
        diff = max(r["previous_weights_max_rel_diff"], r["new_weights_max_rel_diff"])
        speedups = (f"{r['new_vs_plain']:.1f}x", f"{r['new_vs_previous']:.1f}x", f"{diff:.2e}")
        floor = f"{r['steps_floor_forwards']:.1f}"
        cells.append(
            (name, str(r["positions"]), f"{1e3 * r['forward_s']:.0f}", *ways, *speedups, floor)
        )
    print_table(
        f"One edit in forward passes ({cfg.steps} steps, lr {cfg.lr}; 12 layers, width 768, "
        f"FFN 3,072, 32 query tokens; median of {repeats})",
        header,
        cells,
    )
    print(
        "\n(forwards per edit: the edit's wall time over one plain forward of its batch; the "
        "steps' floor: two passes over the LM head's weight per step, in forwards)"
    )
    blip2, llama = rows.values()
    figures = {
        "edit_forwards_opt125m": blip2["new_forwards"],
        "edit_forwards_opt125m_previous": blip2["previous_forwards"],
        "edit_forwards_opt125m_plain": blip2["plain_forwards"],
        "edit_vs_plain_opt125m": blip2["new_vs_plain"],
        "edit_forwards_llama": llama["new_forwards"],
        "edit_vs_plain_llama": llama["new_vs_plain"],
    }
    return figures, {"edit_cost": rows}


def section_hook(tiny, records, cfg, repeats: int, progress: bool) -> tuple[dict, dict]:
    """Figure 3: the routing hook's overhead for each of HOOK_SIZES entries."""
    hook = bench_hook_overhead(tiny, records, cfg, repeats=repeats, progress=progress)
    cells = [
        (
            f"{n:,}",
            f"{1e3 * r['plain_s']:.2f}",
            f"{1e3 * r['hooked_s']:.2f}",
            f"{r['ratio']:.3f}",
            f"{r['build_s']:.2f}",
        )
        for n, r in hook.items()
    ]
    print_table(
        "Hook overhead: TinyVLM forward, batch of 32, every row out of scope "
        f"(median of {repeats})",
        ("entries", "no hook ms", "hooked ms", "ratio", "codebook build s"),
        cells,
    )
    figures = {"hook_overhead_1000": hook[1000]["ratio"]}
    return figures, {"hook_overhead": {str(n): r for n, r in hook.items()}}


def section_bytes(tiny, records, cfg, progress: bool) -> tuple[dict, dict]:
    """Figure 4: bytes per entry, full vs LoRA values, and HM of full vs rank-8 values."""
    sizes = bytes_per_entry()
    cells = []
    for name, r in sizes.items():
        label = "full (weight + bias)" if name == "full" else f"LoRA rank {name[4:]} (A + B)"
        ratio = f"1/{1 / r['ratio_to_full']:.0f}"
        cells.append((label, f"{r['value_bytes']:,}", f"{r['entry_bytes']:,}", ratio))
    print_table(
        "Bytes per entry: OPT-2.7B's fc2, nn.Linear(10240, 2560) in fp16; values are "
        "float32, and each entry also holds its key (10240 float32) and radius",
        ("value", "value bytes", "entry bytes", "ratio to full"),
        cells,
    )
    refs = evaluate.references(tiny, records, progress)
    hm_results = {}
    for name, value_form in (("full", "full"), ("lora rank 8", "lora")):
        config = dataclasses.replace(cfg, value_form=value_form)
        hm_results[name] = evaluate.run_method(
            "balancedit", tiny, records, config, "single", refs, progress
        )
    print(f"\nBalancEdit, single edits, {len(records)} records of the sample:\n")
    print(evaluate.table(hm_results, first="value"))
    figures = {
        "lora8_bytes_ratio": sizes["lora8"]["ratio_to_full"],
        "lora8_hm_delta": hm_results["full"]["hm"] - hm_results["lora rank 8"]["hm"],
    }
    return figures, {"bytes_per_entry": sizes, "hm_full_vs_lora8": hm_results}


def section_sequential(tiny, cfg, n_edits: int, window: int, progress: bool) -> tuple[dict, dict]:
    """Figure 5: seconds per edit, the last ``window`` edits against the first."""
    seq = bench_sequential(tiny, world.make_records(cfg.seed, n_edits), cfg, window, progress)
    print_table(
        f"{n_edits:,} sequential edits on TinyVLM ({seq['entries_at_end']} entries at the "
        f"end; actions {seq['actions']})",
        ("edits", "s/edit"),
        [(f"first {window}", f"{seq['first_s']:.4f}"), (f"last {window}", f"{seq['last_s']:.4f}")],
    )
    print(f"\nlast / first = {seq['ratio']:.2f}")
    return {"seq_last_first_ratio": seq["ratio"]}, {"sequential": seq}


def run(quick: bool = False, progress: bool = True) -> dict:
    """Every figure, printed as markdown tables; returns them (top-level keys) and the details."""
    cfg = balancedit.BalancEditConfig()
    records = data.load_sample()
    tiny = models.TinyVLM.from_pretrained()
    n = QUICK if quick else FULL
    threads = torch.get_num_threads()
    details = {
        "tinyvlm": TINYVLM,
        "quick": quick,
        "threads": threads,
        "config": dataclasses.asdict(cfg),
    }
    print(
        f"# bench{' --quick' if quick else ''}: {threads} threads; "
        f"{cfg.steps} steps/edit, lr {cfg.lr}"
    )
    figures = {}
    # the sections run in this order, each printing its table, before the loop merges them
    for section_figures, section_details in (
        section_edit_speed(tiny, records[0], cfg, n["edit"]),
        section_editors(tiny, records[0], cfg, n["edit"]),
        section_edit_cost(cfg, n["cost"]),
        section_hook(tiny, records, cfg, n["hook"], progress),
        section_bytes(tiny, records[: n["hm_records"]], cfg, progress),
        section_sequential(tiny, cfg, n["n_edits"], n["window"], progress),
    ):
        figures.update(section_figures)
        details.update(section_details)
    details["repeat_spreads"] = dict(SPREADS)  # above BUSY_SPREAD: measured under contention
    return {**figures, "details": details}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the figures (default results/bench.json, or "
        "results/bench_real_size.json with --real-size)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 4 records for the HM comparison, 200 sequential edits (windows "
        "of 20): about six minutes on one core",
    )
    which.add_argument(
        "--real-size",
        action="store_true",
        help="only one edit of a random BLIP-2 OPT-2.7B at its true size (3.74 B parameters): "
        "~19 GB of memory and about five minutes on one CPU core in float32",
    )
    parser.add_argument(
        "--device",
        help="with --real-size: cpu (default) or cuda[:N], when this machine has that GPU",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(realsize.DTYPES),
        help="with --real-size: the weights' type (default float32 on a CPU, whose bfloat16 "
        "matrix products are slow without AVX-512 BF16; float16 on a GPU)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    cli.add_threads(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.real_size and (args.device or args.dtype):
        parser.error("--device and --dtype go with --real-size")
    default = "results/bench_real_size.json" if args.real_size else "results/bench.json"
    out = Path(args.json or default)
    try:
        device = realsize.check_device(args.device or "cpu")
        # by trying, before any work: the folder is made, and removed if the run fails
        cleanup = cli.check_writable(out, "--json")
    except (cli.UsageError, ValueError, OSError) as e:
        parser.exit(2, f"bench.py: error: {e}\n")
    try:
        if args.real_size:
            result = realsize.run(device, args.dtype)
        else:
            result = run(args.quick, args.progress)
        out.write_text(json.dumps(result, indent=1) + "\n")
    except BaseException:
        cleanup()
        raise
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
