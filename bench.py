"""Speed and memory of BalancEdit, each figure measured side by side in one run.

    python bench.py [--json PATH] [--quick]

1. One edit (Eq. 2) by the plain loop vs on cached activations, on TinyVLM, on a random BLIP-2 OPT
   with OPT-2.7B's 32 decoder layers and on a random MiniGPT-4 with Vicuna-7B's 32 LLaMA layers,
   and the largest difference of the trained weights.
2. The routing hook's overhead: a forward with and without the hook, every sample out of scope,
   for 1 to 10,000 codebook entries.
3. Bytes per entry on OPT-2.7B's fc2, a full value vs low-rank ones, and HM of full vs rank-8
   values.
4. Seconds per edit over 1,000 sequential edits, the last 100 against the first 100.

Timings use time.perf_counter with warm-up turns and medians; the variants compared take turns
in one loop, so noise on a shared machine hits them alike. The figures go to stdout and JSON.
"""

import argparse
import dataclasses
import json
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
HOOK_SIZES = (1, 100, 1_000, 10_000)


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


def section_hook(tiny, records, cfg, repeats: int, progress: bool) -> tuple[dict, dict]:
    """Figure 2: the routing hook's overhead for each of HOOK_SIZES entries."""
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
    """Figure 3: bytes per entry, full vs LoRA values, and HM of full vs rank-8 values."""
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
    """Figure 4: seconds per edit, the last ``window`` edits against the first."""
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
        hook_repeats = 7
        n_edits = 200
        window = 20
        hm_records = records[:4]
    else:
        edit_repeats = 5
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
    hook_figures, details["hook_overhead"] = section_hook(
        tiny, records, cfg, hook_repeats, progress
    )
    bytes_figures, bytes_details = section_bytes(tiny, hm_records, cfg, progress)
    details.update(bytes_details)
    seq_figures, details["sequential"] = section_sequential(tiny, cfg, n_edits, window, progress)
    return {**figures, **hook_figures, **bytes_figures, **seq_figures, "details": details}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default="results/bench.json",
        help="where to write the figures (default results/bench.json)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 4 records for the HM "
        "comparison, 200 sequential edits (windows of 20): about a minute",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.json)
    try:
        evaluate.check_writable(out, "--json")
    except evaluate.UsageError as e:
        parser.exit(2, f"bench.py: error: {e}\n")
    result = run(args.quick, args.progress)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
