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
3. The routing hook's overhead: a forward with and without the hook, every sample out of scope,
   for 1 to 10,000 codebook entries.
4. Bytes per entry on OPT-2.7B's fc2, a full value vs low-rank ones, and HM of full vs rank-8
   values.
5. Seconds per edit over 1,000 sequential edits, the last 100 against the first 100.

``--real-size`` measures only one edit of a random BLIP-2 OPT-2.7B (3.74 B parameters; float32
on a CPU, ~19 GB of memory, about five minutes on one core): seconds per edit and per step,
forwards per edit, peak memory.

Timings use time.perf_counter with warm-up turns and medians; the variants compared take turns
in one loop, so noise on a shared machine hits them alike. The figures go to stdout and JSON.
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import balancedit
import data
import evaluate
import models

OPT_2_7B_FC2 = (10240, 2560)  # BLIP-2 OPT-2.7B's target layer fc2: in_features, out_features
# OPT-2.7B's and Vicuna-7B's 32 decoder layers, at a small width
BLIP2_DEPTH = dict(layers=32, hidden=64, ffn=256)
# OPT-125m's text shape (12 layers, width 768, FFN 3,072) with BLIP-2's 32 query tokens
OPT_125M = dict(layers=12, hidden=768, ffn=3072, n_query=32)
OPT_VOCAB = 50272  # OPT's vocabulary
LLAMA_VOCAB = 32000  # LLaMA-7B's (Vicuna-7B's)
AUTHORS_STEPS = 50  # the authors' Eq. 2 on BLIP-2 OPT: 50 steps at lr 1e-4
AUTHORS_LR = 1e-4
PAPER_GPU_S = 8.04  # the paper's seconds per BalancEdit edit on a GPU (Table 5)
HOOK_SIZES = (1, 100, 1_000, 10_000)


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


def bytes_per_entry(
    in_features: int = OPT_2_7B_FC2[0],
    out_features: int = OPT_2_7B_FC2[1],
    ranks: Sequence[int] = (4, 8, 16),
) -> dict[str, dict]:
    """Value and entry bytes of a full value and of LoRA values of each rank, for an fp16
    ``nn.Linear(in_features, out_features)`` on the meta device (nothing is allocated)."""
    layer = torch.nn.Linear(in_features, out_features, device="meta", dtype=torch.float16)
    values = {"full": balancedit.new_value(layer, "full")}
    values.update({f"lora{r}": balancedit.new_value(layer, "lora", r) for r in ranks})
    full = entry_bytes(values["full"], in_features)
    key = in_features * 4 + 4
    return {
        name: {
            "value_bytes": entry_bytes(v, in_features) - key,
            "entry_bytes": entry_bytes(v, in_features),
            "ratio_to_full": entry_bytes(v, in_features) / full,
        }
        for name, v in values.items()
    }


def bench_edit_speed(backbone, record: data.EditRecord, cfg, repeats: int, warmup: int = 1) -> dict:
    """Seconds of one edit with Eq. 2 by the plain loop (``cache=False``) and on cached activations,
    same steps, lr and seed; and ``max|a - b| / max|b|`` over the two trained values' parameters."""
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
    return {
        "naive_s": s["naive"],
        "cached_s": s["cached"],
        "speedup": s["naive"] / s["cached"],
        "weights_max_rel_diff": diff / scale,
        "steps": cfg.steps,
    }


def opt125m_blip2(seed: int = 0) -> models.Blip2OPT:
    """A random BLIP-2 whose OPT has OPT-125m's shape and vocabulary (the world's words keep
    their ids; the other 50,000-odd rows are random)."""
    backbone = models.random_blip2(**OPT_125M, seed=seed)
    backbone.model.language_model.resize_token_embeddings(OPT_VOCAB, mean_resizing=False)
    return backbone


def opt125m_minigpt4(seed: int = 0) -> models.MiniGPT4:
    """A random MiniGPT-4 whose LLaMA has OPT-125m's depth and widths and LLaMA-7B's vocabulary."""
    backbone = models.random_minigpt4(**OPT_125M, seed=seed)
    backbone.llama_model.resize_token_embeddings(LLAMA_VOCAB, mean_resizing=False)
    return backbone


def previous_edit(backbone, record: data.EditRecord, cfg) -> torch.nn.Module:
    """The cached path before one forward prepared an edit, for the comparison: the keys of the
    edit, Pos and Neg from their own forward, then a second forward records the edit's own batch
    and each of Eq. 2's steps runs the value and the network after l at every position (the
    tail of ``per_position=False``). Returns the trained value (the radius is not computed)."""
    editor = balancedit.BalancEditor(backbone, cfg)
    black = data.anchor_image(cfg.negative, record.image.size, seed=cfg.seed)
    questions = [record.question, editor.positive(record), record.question]
    editor.keys_of([record.image, record.image, black], questions)  # (3, D)
    batch = backbone.encode([record.image], [record.question], [record.target])
    torch.manual_seed(cfg.seed)  # as the editor does, for LoRA's A
    value = balancedit.new_value(editor.layer, cfg.value_form, cfg.rank)
    path = editor.layer_path
    balancedit.train_value(backbone, path, value, backbone.to_device(batch), cfg.steps, cfg.lr)
    return value


def bench_edit_cost(
    backbone, record: data.EditRecord, cfg, repeats: int, forwards: int = 5
) -> dict:
    """One edit's wall time over one plain forward (no_grad) of the edit's batch, for the plain
    loop (``cache=False``), the previous cached path (``previous_edit``) and the editor; each
    turn times ``forwards`` forwards and keeps their median. After one untimed forward and edit,
    the four take turns ``repeats`` times. Also ``max|a - b| / max|b|`` of each trained value
    against the plain loop's."""
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    trained = {}

    def forward() -> float:
        seconds = []
        with torch.no_grad():
            for _ in range(forwards):
                start = time.perf_counter()
                backbone(**batch)
                seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    def editor_value(cache: bool) -> Callable[[], torch.nn.Module]:
        def edit() -> torch.nn.Module:
            editor = balancedit.BalancEditor(backbone, dataclasses.replace(cfg, cache=cache))
            editor.edit(record)
            return editor.codebook.values[0]

        return edit

    def timed(name: str, edit: Callable[[], torch.nn.Module]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            value = edit()
            seconds = time.perf_counter() - start
            trained[name] = [p.detach().clone() for p in value.parameters()]
            return seconds

        return run

    head = max(backbone.parameters(), key=torch.Tensor.numel)  # the LM head (V, D): the largest

    def read() -> float:  # one pass over the LM head's weight, the least a step reads twice
        start = time.perf_counter()
        float(head.detach().sum())
        return time.perf_counter() - start

    forward()  # warm-up: the first calls allocate and pick kernels
    editor_value(True)()
    edits = {
        "plain": timed("plain", editor_value(False)),
        "previous": timed("previous", lambda: previous_edit(backbone, record, cfg)),
        "new": timed("new", editor_value(True)),
    }
    s = alternate({"forward": forward, "read": read, **edits}, repeats, warmup=0)
    scale = max(float(b.abs().max()) for b in trained["plain"])
    out = {"positions": batch["input_ids"].shape[1], "steps": cfg.steps, "forward_s": s["forward"]}
    # Each step reads the head twice (the logits, then their gradient): the steps' floor.
    out["head_read_s"] = s["read"]
    out["steps_floor_forwards"] = 2 * cfg.steps * s["read"] / s["forward"]
    for name in edits:
        diff = max(float((a - b).abs().max()) for a, b in zip(trained[name], trained["plain"]))
        out[f"{name}_s"] = s[name]
        out[f"{name}_forwards"] = s[name] / s["forward"]
        out[f"{name}_weights_max_rel_diff"] = diff / scale
    out["new_vs_plain"] = s["plain"] / s["new"]
    out["new_vs_previous"] = s["previous"] / s["new"]
    return out


def real_size_blip2(dtype: torch.dtype, device: str, seed: int = 0) -> models.Blip2OPT:
    """A random BLIP-2 OPT-2.7B at its true size, built in memory (nothing downloads): BLIP-2's
    ViT-g/14 at 224 pixels and Q-Former (``Blip2Config``'s defaults), 32 query tokens, and
    OPT-2.7B (32 layers, width 2,560, FFN 10,240, 32 heads, vocabulary 50,272). The weights are
    made in ``dtype`` (no float32 copy of 3.74 B numbers), with the word-level tokenizer of
    ``models.offline_blip2_processor``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    processor = models.offline_blip2_processor(n_query=32, image_size=224)
    tok = processor.tokenizer
    text = dict(model_type="opt", vocab_size=OPT_VOCAB, hidden_size=2560, num_hidden_layers=32)
    text.update(ffn_dim=10240, num_attention_heads=32, word_embed_proj_dim=2560)
    text.update(max_position_embeddings=2048, pad_token_id=tok.pad_token_id)
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = Blip2Config(
        text_config=text,
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the parameters are made in dtype
    try:
        model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return models.Blip2OPT(model, processor).to(device).eval()


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (Linux) and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*: (.*)", cpuinfo.read_text()) if cpuinfo.exists() else []
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def peak_memory_gb(device: torch.device) -> float:
    """The GPU's peak allocated memory, or on a CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only: imported where it is needed

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_real_size(device: str, dtype: torch.dtype, cfg, record: data.EditRecord) -> dict:
    """One edit of a random BLIP-2 OPT-2.7B (``real_size_blip2``): a plain forward of the edit's
    batch (the unit), then the edit's two parts, ``probe`` (one forward of the edit, Pos and
    Neg) and Eq. 2's steps (``train``), each timed once."""
    where = torch.device(device)

    def clock() -> float:  # wall time, after the GPU's queued work
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        return time.perf_counter()

    start = clock()
    backbone = real_size_blip2(dtype, device, cfg.seed)
    build = clock() - start
    n_params = sum(p.numel() for p in backbone.parameters())
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    with torch.no_grad():
        start = clock()
        backbone(**batch)
        forward = clock() - start
    editor = balancedit.BalancEditor(backbone, cfg)
    start = clock()
    found = editor.probe(record)
    probe = clock() - start
    start = clock()
    _, losses = editor.train(found.batch, found.tail, None)
    train = clock() - start
    edit = probe + train
    return {
        "machine": machine(where),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "positions": batch["input_ids"].shape[1],
        "steps": cfg.steps,
        "build_s": build,
        "forward_s": forward,
        "probe_s": probe,
        "train_s": train,
        "step_s": train / cfg.steps,
        "edit_s": edit,
        "forwards_per_edit": edit / forward,
        "step_over_forward": train / cfg.steps / forward,
        "peak_memory_gb": peak_memory_gb(where),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


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
    warmup: int = 1,
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
            with torch.no_grad():
                start = time.perf_counter()
                backbone(**batch)
                return time.perf_counter() - start

        def hooked() -> float:
            with torch.no_grad(), balancedit.attach(backbone, layer_path, codebook) as router:
                start = time.perf_counter()
                logits = backbone(**batch).logits
                seconds = time.perf_counter() - start
            if not bool((router.last_index == -1).all()) or not torch.equal(logits, plain_logits):
                raise AssertionError(
                    f"hook overhead: a row was routed, or out-of-scope logits changed ({n} entries)"
                )
            return seconds

        s = alternate({"plain": plain, "hooked": hooked}, repeats, warmup)
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
        start = time.perf_counter()
        report = editor.edit(r)
        seconds.append(time.perf_counter() - start)
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


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section_edit_speed(tiny, tiny_name: str, record, cfg, repeats: int) -> tuple[dict, dict]:
    """Figure 1: the plain loop vs cached activations on three backbones. Returns the figures
    and the details."""
    depth = "{layers} {kind} layers (hidden {hidden}, ffn {ffn})"
    blip2_name = "random BLIP-2 OPT, " + depth.format(kind="decoder", **BLIP2_DEPTH)
    llama_name = "random MiniGPT-4, " + depth.format(kind="LLaMA", **BLIP2_DEPTH)
    blip2 = models.random_blip2(**BLIP2_DEPTH, seed=cfg.seed)
    llama = models.random_minigpt4(**BLIP2_DEPTH, seed=cfg.seed)
    rows = {
        tiny_name: bench_edit_speed(tiny, record, cfg, repeats),
        blip2_name: bench_edit_speed(blip2, record, cfg, repeats),
        llama_name: bench_edit_speed(llama, record, cfg, repeats),
    }
    print(
        "## One edit: the plain loop vs cached activations "
        f"({cfg.steps} steps, median of {repeats})\n"
    )
    header = ("backbone", "plain loop s/edit", "cached s/edit", "speedup", "max rel. weight diff")
    cells = []
    for name, r in rows.items():
        speedup = f"{r['speedup']:.1f}x"
        diff = f"{r['weights_max_rel_diff']:.2e}"
        cells.append((name, f"{r['naive_s']:.3f}", f"{r['cached_s']:.3f}", speedup, diff))
    print(table_lines(header, cells))
    figures = {
        "edit_speedup_blip2_depth": rows[blip2_name]["speedup"],
        "edit_speedup_llama_depth": rows[llama_name]["speedup"],
        "edit_weights_max_rel_diff": max(r["weights_max_rel_diff"] for r in rows.values()),
    }
    return figures, rows


def section_edit_cost(cfg, repeats: int) -> tuple[dict, dict]:
    """Figure 2: one edit in forward passes at OPT-125m's shape, 50 steps, three ways."""
    cfg = dataclasses.replace(cfg, steps=AUTHORS_STEPS, lr=AUTHORS_LR)
    record = data.load_sample(limit=1)[0]
    rows = {
        "random BLIP-2, OPT-125m's shape (fc2, vocabulary 50,272)": bench_edit_cost(
            opt125m_blip2(cfg.seed), record, cfg, repeats
        ),
        "random MiniGPT-4, a LLaMA of that shape (up_proj, vocabulary 32,000)": bench_edit_cost(
            opt125m_minigpt4(cfg.seed), record, cfg, repeats
        ),
    }
    print(
        f"\n## One edit in forward passes ({cfg.steps} steps, lr {cfg.lr}; 12 layers, width 768, "
        f"FFN 3,072, 32 query tokens; median of {repeats})\n"
    )
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
    print(table_lines(header, cells))
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
    return figures, rows


def section_hook(tiny, records, cfg, repeats: int, progress: bool) -> tuple[dict, dict]:
    """Figure 3: the routing hook's overhead for each of HOOK_SIZES entries."""
    hook = bench_hook_overhead(tiny, records, cfg, HOOK_SIZES, repeats, progress=progress)
    print(
        "\n## Hook overhead: TinyVLM forward, batch of 32, every row out of scope "
        f"(median of {repeats})\n"
    )
    header = ("entries", "no hook ms", "hooked ms", "ratio", "codebook build s")
    cells = []
    for n, r in hook.items():
        plain = f"{1e3 * r['plain_s']:.2f}"
        hooked = f"{1e3 * r['hooked_s']:.2f}"
        cells.append((f"{n:,}", plain, hooked, f"{r['ratio']:.3f}", f"{r['build_s']:.2f}"))
    print(table_lines(header, cells))
    figures = {"hook_overhead_1000": hook[1000]["ratio"]}
    return figures, {str(n): r for n, r in hook.items()}


def section_bytes(tiny, records, cfg, progress: bool) -> tuple[dict, dict]:
    """Figure 4: bytes per entry, full vs LoRA values, and HM of full vs rank-8 values."""
    sizes = bytes_per_entry()
    print(
        "\n## Bytes per entry: OPT-2.7B's fc2, nn.Linear(10240, 2560) in fp16; values are "
        "float32, and each entry also holds its key (10240 float32) and radius\n"
    )
    header = ("value", "value bytes", "entry bytes", "ratio to full")
    cells = []
    for name, r in sizes.items():
        if name == "full":
            label = "full (weight + bias)"
        else:
            label = f"LoRA rank {name[len('lora') :]} (A + B)"
        ratio = f"1/{1 / r['ratio_to_full']:.0f}"
        cells.append((label, f"{r['value_bytes']:,}", f"{r['entry_bytes']:,}", ratio))
    print(table_lines(header, cells))
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
    seq = bench_sequential(tiny, data.make_records(cfg.seed, n_edits), cfg, window, progress)
    print(
        f"\n## {n_edits:,} sequential edits on TinyVLM ({seq['entries_at_end']} entries at the "
        f"end; actions {seq['actions']})\n"
    )
    cells = [
        (f"first {window}", f"{seq['first_s']:.4f}"),
        (f"last {window}", f"{seq['last_s']:.4f}"),
    ]
    print(table_lines(("edits", "s/edit"), cells))
    print(f"\nlast / first = {seq['ratio']:.2f}")
    return {"seq_last_first_ratio": seq["ratio"]}, seq


def run(quick: bool = False, progress: bool = True) -> dict:
    """Every figure, printed as markdown tables; returns them (top-level keys) and the details."""
    cfg = balancedit.BalancEditConfig()
    records = data.load_sample()
    tiny = models.TinyVLM.from_pretrained()
    tiny_name = "TinyVLM (assets/tinyvlm)"
    if quick:
        edit_repeats = 3
        cost_repeats = 1
        hook_repeats = 7
        n_edits = 200
        window = 20
        hm_records = records[:4]
    else:
        edit_repeats = 5
        cost_repeats = 2
        hook_repeats = 21
        n_edits = 1000
        window = 100
        hm_records = records
    details: dict = {
        "tinyvlm": tiny_name,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg),
    }
    print(
        f"# bench{' --quick' if quick else ''}: {torch.get_num_threads()} threads; "
        f"{cfg.steps} steps/edit, lr {cfg.lr}\n"
    )
    figures, details["edit_speed"] = section_edit_speed(
        tiny, tiny_name, records[0], cfg, edit_repeats
    )
    cost_figures, details["edit_cost"] = section_edit_cost(cfg, cost_repeats)
    hook_figures, details["hook_overhead"] = section_hook(
        tiny, records, cfg, hook_repeats, progress
    )
    bytes_figures, bytes_details = section_bytes(tiny, hm_records, cfg, progress)
    details.update(bytes_details)
    seq_figures, details["sequential"] = section_sequential(tiny, cfg, n_edits, window, progress)
    figures.update(cost_figures)
    details["repeat_spreads"] = dict(SPREADS)  # above BUSY_SPREAD: measured under contention
    return {**figures, **hook_figures, **bytes_figures, **seq_figures, "details": details}


def run_real_size(device: str, dtype: torch.dtype) -> dict:
    """``--real-size``: one edit of a random BLIP-2 OPT-2.7B, with the authors' 50 steps."""
    cfg = balancedit.BalancEditConfig(steps=AUTHORS_STEPS, lr=AUTHORS_LR)
    r = bench_real_size(device, dtype, cfg, data.load_sample(limit=1)[0])
    print(
        f"# bench --real-size: a random BLIP-2 OPT-2.7B ({r['parameters'] / 1e9:.2f} B "
        f"parameters) in {r['dtype']} on {r['device']} ({r['machine']}; torch threads: "
        f"{r['threads']}); "
        f"{r['steps']} steps, lr {cfg.lr}\n"
    )
    cells = [
        (
            "one plain forward of the edit's batch",
            f"{r['forward_s']:.1f} s ({r['positions']} positions)",
        ),
        ("the edit's one forward (edit, Pos, Neg)", f"{r['probe_s']:.1f} s"),
        (f"Eq. 2, {r['steps']} steps", f"{r['train_s']:.1f} s ({r['step_s']:.2f} s a step)"),
        ("one edit", f"{r['edit_s']:.1f} s = {r['forwards_per_edit']:.1f} forwards"),
        ("a step / a forward", f"{r['step_over_forward']:.3f}"),
        ("peak memory", f"{r['peak_memory_gb']:.1f} GiB"),
        ("building the random model", f"{r['build_s']:.0f} s"),
    ]
    print(table_lines(("", "measured"), cells))
    print(f"\nThe paper reports {PAPER_GPU_S} s per BalancEdit edit on a GPU (Table 5).")
    return r


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        choices=tuple(DTYPES),
        help="with --real-size: the weights' type (default float32 on a CPU, whose bfloat16 "
        "matrix products are slow without AVX-512 BF16; float16 on a GPU)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    evaluate.add_threads(parser)
    return parser


def check_device(name: str) -> str:
    """The device ``name``, refused in one line if this machine cannot run on it."""
    n_gpus = torch.cuda.device_count()
    try:
        device = torch.device(name)
    except RuntimeError:  # a name torch does not know
        device = None
    gpu_here = device is not None and device.type == "cuda" and (device.index or 0) < n_gpus
    if device is None or (device.type != "cpu" and not gpu_here):
        raise ValueError(f"--device {name}: not a device of this machine ({n_gpus} CUDA GPUs)")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.real_size and (args.device or args.dtype):
        parser.error("--device and --dtype go with --real-size")
    default = "results/bench_real_size.json" if args.real_size else "results/bench.json"
    out = Path(args.json or default)
    try:
        device = check_device(args.device or "cpu")
        # by trying, before any work: the folder is made, and removed if the run fails
        cleanup = evaluate.check_writable(out, "--json")
    except (evaluate.UsageError, ValueError, OSError) as e:
        parser.exit(2, f"bench.py: error: {e}\n")
    on_gpu = torch.device(device).type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if on_gpu else "float32")]
    try:
        if args.real_size:
            result = run_real_size(device, dtype)
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
