"""One edit of a random BLIP-2 OPT-2.7B at its true size, timed on a CPU or a GPU.

`python bench.py --real-size [--device cuda]` runs it. The 3.74 B parameters are built in memory
(nothing downloads); in float32 on a CPU that takes ~19 GB of memory and about five minutes on
one core. Measured: seconds per edit and per step, forwards per edit, peak memory.
"""

import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

import balancedit
import cli
import data
from blip2 import Blip2OPT, offline_blip2_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPT_VOCAB = 50272  # OPT's vocabulary


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """The seconds ``fn()`` takes and its result; on a GPU ``device``, after its queued work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


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


def real_size_blip2(dtype: torch.dtype, device: str, seed: int = 0) -> Blip2OPT:
    """A random BLIP-2 OPT-2.7B at its true size, built in memory (nothing downloads): BLIP-2's
    ViT-g/14 at 224 pixels and Q-Former (``Blip2Config``'s defaults), 32 query tokens, and
    OPT-2.7B (32 layers, width 2,560, FFN 10,240, 32 heads, vocabulary 50,272). The weights are
    made in ``dtype`` (no float32 copy of 3.74 B numbers), with the word-level tokenizer of
    ``blip2.offline_blip2_processor``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    processor = offline_blip2_processor(n_query=32, image_size=224)
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
    return Blip2OPT(model, processor).to(device).eval()


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


def measure(device: str, dtype: torch.dtype, cfg, record: data.EditRecord) -> dict:
    """One edit of a random BLIP-2 OPT-2.7B (``real_size_blip2``): a plain forward of the edit's
    batch (the unit), then the edit's two parts, ``probe`` (one forward of the edit, Pos and
    Neg) and Eq. 2's steps (``train``), each timed once."""
    where = torch.device(device)
    build, backbone = timed(lambda: real_size_blip2(dtype, device, cfg.seed), where)
    n_params = sum(p.numel() for p in backbone.parameters())
    batch = backbone.to_device(backbone.encode([record.image], [record.question], [record.target]))
    with torch.no_grad():
        forward, _ = timed(lambda: backbone(**batch), where)
    editor = balancedit.BalancEditor(backbone, cfg)
    probe, found = timed(lambda: editor.probe(record, record.image), where)
    train, (_, losses) = timed(lambda: editor.train(found.batch, found.tail, None), where)
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


def run(device: str, dtype: str | None = None) -> dict:
    """One edit with the authors' 50 steps, the weights in ``dtype`` (default float16 on a GPU,
    float32 on a CPU, whose bfloat16 products are slow without AVX-512 BF16); prints a table."""
    on_gpu = torch.device(device).type == "cuda"
    cfg = balancedit.BalancEditConfig(**cli.AUTHORS_TRAINING)
    weights = DTYPES[dtype or ("float16" if on_gpu else "float32")]
    r = measure(device, weights, cfg, data.load_sample(limit=1)[0])
    print(
        f"# bench --real-size: a random BLIP-2 OPT-2.7B ({r['parameters'] / 1e9:.2f} B "
        f"parameters) in {r['dtype']} on {r['device']} ({r['machine']}; torch threads: "
        f"{r['threads']}); {r['steps']} steps, lr {cfg.lr}\n"
    )
    rows = [
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
    print("|  | measured |")
    print("|---|---|")
    for what, measured in rows:
        print(f"| {what} | {measured} |")
    print("\nThe paper reports 8.04 s per BalancEdit edit on a GPU (Table 5).")
    return r
