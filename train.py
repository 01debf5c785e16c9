"""TinyVLM's training on the generated world, and the check of a trained checkpoint.

``python train.py --out DIR`` trains a TinyVLM in two seeded stages: the world's questions
(3000 steps, 64 positions), then, grown to 192 positions, reading a fact in its prompt (IKE's
format, ike.py): 800 steps of facts that answer the question, then 2500 of the world's samples,
half of them after demonstrations and a fact that answers the question or another one (half
each). The shipped ``assets/tinyvlm`` is the defaults; its second stage ran ``--from`` the first
stage's checkpoint.
``python train.py check`` measures what a checkpoint knows: exact match of its answers on the
shipped sample, and how it reads a fact (ike.reading). ``train_tiny`` and ``warmup_cosine`` are
also easy-VQA's trainer (easyvqa.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

import cli
import data
import ike
import world
from models import TINY_DIR, Backbone, TinyConfig, TinyVLM, build_tokenizer

COPY_STEPS = 800  # the second stage's start: every sample after a fact that answers it
COPY_LR = 1e-3
CONTEXT_STEPS = 2500  # then the world's samples, CONTEXT_SHARE of them after in-context facts
CONTEXT_SHARE = 0.5
CONTEXT_RELEVANT = 0.5  # of those facts, the share that answers the question
CONTEXT_BATCH = 32
CONTEXT_LR = 1e-3
POSITIONS = 192  # the world's longest probe after IKE's four demonstrations needs 163


def warmup_cosine(opt: torch.optim.Optimizer, steps: int):
    """The lr schedule of a training run: linear warm-up over 5% of ``steps``, cosine decay."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )


def train_tiny(
    out_dir: str | os.PathLike,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    config: TinyConfig = TinyConfig(),
    progress: bool = True,
    device: str = "cpu",
    stream: Optional[Iterator[data.Sample]] = None,
    words: Optional[Sequence[str]] = None,
    model: Optional[TinyVLM] = None,
) -> list[float]:
    """Train TinyVLM on ``stream`` (default: the world's endless training stream, seeded) with a
    tokenizer over ``words`` (default: the world's vocabulary); returns the loss per step.
    ``model``: go on from this one instead of a fresh one (``config`` and ``words`` unused)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    if model is None:
        model = TinyVLM(config, build_tokenizer(words or world.vocabulary()))
    model = model.to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    if stream is None:
        stream = world.training_stream(seed)
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for _ in bar:
        samples = [next(stream) for _ in range(batch_size)]
        batch = model.to_device(
            model.encode(
                [s.image for s in samples],
                [s.question for s in samples],
                [s.answer for s in samples],
            )
        )
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval().cpu()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return losses


def teach_context(
    model: TinyVLM,
    out_dir: Optional[str | os.PathLike],
    stream: Iterator[data.Sample],
    facts: ike.Facts,
    steps: int,
    positions: int,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
    vision: bool = True,
    copy_steps: int = COPY_STEPS,
    share: float = CONTEXT_SHARE,
    relevant: float = CONTEXT_RELEVANT,
    lr: float = CONTEXT_LR,
) -> list[float]:
    """The second stage: ``model`` grown to ``positions`` (TinyVLM.grown) learns to read a fact
    in its prompt; its ViT too if ``vision``. First ``copy_steps`` of facts that answer the
    question, alone (without them first, the image's answer wins and copying never starts);
    then ``steps`` at ``lr`` of the world's samples, ``share`` of them after demonstrations and a
    fact that answers the question (``relevant`` of them) or another one (ike.context_stream).
    The loss per step."""
    torch.manual_seed(seed)  # the new rows' initial values
    grown = model.grown(positions, ike.FORMAT_WORDS)
    grown.vision.requires_grad_(vision)  # the trainer's AdamW skips parameters without gradients
    answerable = (s for s in stream if facts.family_of(s.question) in facts.questions)
    copy = ike.context_stream(answerable, facts, 1.0, seed, relevant=1.0, max_demonstrations=0)
    batch = dict(progress=progress, device=device, model=grown)
    train_tiny(None, copy_steps, CONTEXT_BATCH, COPY_LR, seed, stream=copy, **batch)
    mixed = ike.context_stream(stream, facts, share, seed, relevant)
    return train_tiny(out_dir, steps, CONTEXT_BATCH, lr, seed, stream=mixed, **batch)


def knowledge(
    backbone: Backbone, records: Sequence[data.EditRecord], batch_size: int = 64
) -> dict[str, float]:
    """What the unedited model knows: exact match (%) of generated answers against the true
    (old) answers, on every part of the records, and on the black / white anchor questions."""
    parts = {
        "edit": [(r.image, r.question, r.answer) for r in records],
        "rephrases": [(r.image, q, r.answer) for r in records for q in r.rephrases],
        "rephrase_images": [
            (im, r.question, r.answer) for r in records for im in r.rephrase_images
        ],
        "locality": [(s.image, s.question, s.answer) for r in records for s in r.locality],
        "unrelated": [(s.image, s.question, s.answer) for r in records for s in r.m_locality],
        "black_white": [
            (data.anchor_image(a, world.SIZE), q, answers[world.FAMILY_OF[q]])
            for a, answers in world.ANCHOR_ANSWERS.items()
            for q in world.FAMILY_OF
        ],
    }
    result = {}
    for name, triples in parts.items():
        right = 0
        for i in range(0, len(triples), batch_size):
            chunk = triples[i : i + batch_size]
            answers = backbone.generate([t[0] for t in chunk], [t[1] for t in chunk])
            right += sum(a == t[2] for a, t in zip(answers, chunk))
        result[name] = 100.0 * right / len(triples)
    return result


class Parser(argparse.ArgumentParser):
    """Training needs ``--out`` (a bare run must not overwrite the shipped checkpoint);
    ``check`` does not."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.command is None and parsed.out is None:
            self.error("the following arguments are required: --out")
        return parsed


def build_parser() -> Parser:
    parser = Parser(
        prog="train.py",
        description="Train TinyVLM on the generated world and save a checkpoint (seeded; "
        "minutes on a 2-core CPU), or `check` one.",
    )
    parser.add_argument(
        "--out", help="checkpoint directory, required to train (assets/tinyvlm is the shipped one)"
    )
    parser.add_argument(
        "--steps", type=int, default=3000, help="first stage: optimizer steps (default 3000)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument(
        "--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights and the training stream"
    )
    parser.add_argument(
        "--context-steps",
        type=int,
        default=CONTEXT_STEPS,
        help=f"second stage, grown to {POSITIONS} positions: {COPY_STEPS} copy steps, then "
        f"these steps with in-context facts (default {CONTEXT_STEPS}; 0: no second stage)",
    )
    parser.add_argument(
        "--from",
        dest="start",
        metavar="DIR",
        help="skip the first stage: go on from this checkpoint of it (64 positions)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: idle cores)"
    )
    sub = parser.add_subparsers(dest="command")
    k = sub.add_parser("check", help="exact match of a TinyVLM checkpoint on the shipped sample")
    k.add_argument(
        "--model", default=str(TINY_DIR), help="checkpoint directory (default: assets/tinyvlm)"
    )
    return parser


def check(parser: Parser, model_dir: str) -> int:
    """Print what the checkpoint in ``model_dir`` knows of the shipped sample (``knowledge``)."""
    try:
        model = TinyVLM.from_pretrained(model_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"train.py check: error: {e}\n")
    records = data.load_sample()
    result = knowledge(model, records) | ike.reading(model, records)
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(parser, args.model)
    if min(args.steps, args.batch_size, args.threads) < 1 or not args.lr > 0:
        parser.error("--steps, --batch-size and --threads must be >= 1 and --lr > 0")
    if args.context_steps < 0:
        parser.error("--context-steps must be >= 0")
    if args.start is not None and not os.path.isfile(os.path.join(args.start, "model.safetensors")):
        parser.error(f"--from {args.start}: no TinyVLM checkpoint there")
    torch.set_num_threads(args.threads)
    try:  # by trying, before any work: the folder is made (and removed if training fails)
        cleanup = cli.claim_output(args.out, "--out", folder=True)
    except cli.OutputError as e:
        parser.exit(2, f"train.py: error: {e}\n")
    start = time.time()
    try:
        if args.start is None:
            losses = train_tiny(
                args.out, args.steps, args.batch_size, args.lr, args.seed, device=args.device
            )
            print(f"first stage: {len(losses)} steps, final loss {np.mean(losses[-50:]):.4f}")
        if args.context_steps:
            model = TinyVLM.from_pretrained(args.start or args.out)
            stream = world.training_stream(args.seed)
            losses = teach_context(
                model,
                args.out,
                stream,
                world.facts(),
                args.context_steps,
                POSITIONS,
                args.seed,
                device=args.device,
            )
            print(f"second stage: {len(losses)} steps, final loss {np.mean(losses[-50:]):.4f}")
    except BaseException:
        cleanup()
        raise
    print(f"trained in {time.time() - start:.0f} s; saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
