"""easy-VQA, a world somebody else designed: TinyVLM trained on its train split, edited on its test
images, with the project's own trainer, editor and protocols.

easy-VQA (Victor Zhou; the PyPI package ``easy-vqa``, MIT) holds 4,000 train and 1,000 test
64x64 images, each of one shape (circle, rectangle, triangle) in one of 8 colours, drawn by its
own renderer and asked its own question templates: 4 about the shape, 4 about the colour and
16 yes/no. TinyVLM (models.py) is trained on the train split by the project's trainer, over
easy-VQA's vocabulary, once its ViT has learnt the train images' shapes and colours; then
train.teach_context teaches it to read a fact in its prompt, for IKE. Edit records come from
the test images only, at two scopes like the paper's Fig. 1, each edit's target another of
easy-VQA's own answers:

    shape    "what shape is in the image?" on every image of one shape -> another shape
    colour   "what color is the <shape>?" on one (shape, colour) kind  -> another colour

The test images are split in two halves by image id: "dev" (odd ids, for tuning) and "test"
(even ids), so that dev and test records never share an image.

    python easyvqa.py train            # the shipped checkpoint, assets/tinyvlm_easyvqa
    python easyvqa.py check            # its exact match on the test questions, by family
    python easyvqa.py make-records --seed 0 --out DIR   # edit records in the OKEDIT layout

The package brings its images; nothing downloads. Without it, these commands say so.
"""

import argparse
import functools
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from PIL import Image

import cli
import data
import evaluate as ev
import ike
import models
import writers
from train import teach_context, train_tiny, warmup_cosine

MODEL_DIR = models.ASSETS / "tinyvlm_easyvqa"
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
KINDS = [(s, c) for s in SHAPES for c in COLOURS]  # 24 kinds
WHAT = {  # easy-VQA's open questions, by the family of their answer
    "shape": (
        "what shape is in the image?",
        "what shape does the image contain?",
        "what shape is present?",
        "what is the {colour} shape?",
    ),
    "colour": (
        "what color is the {shape}?",
        "what color is the shape?",
        "what is the color of the shape?",
        "what is the color of the {shape}?",
    ),
}
YES_NO = (  # (template, negated): {x} is "<colour> shape" or "<shape>"; 16 templates in all
    ("does the image contain a {x}?", False),
    ("does the image not contain a {x}?", True),
    ("is a {x} present?", False),
    ("is no {x} present?", True),
    ("is there a {x} in the image?", False),
    ("is there not a {x} in the image?", True),
    ("is there a {x}?", False),
    ("is there not a {x}?", True),
)
FAMILIES = ("shape", "colour", "yes/no")
PARTS = {"dev": 1, "test": 0}  # a half of the test images: image id % 2
EDITED_COLOURS = 4  # colour scope: colours edited per shape (the other 4 stay for Loc)
# Its shapes span 8-33 pixels anywhere in the image (the world's: 28-42, centred), too small for
# 16-pixel patches: 8-pixel ones, 64 image tokens, and room for them in the decoder.
CONFIG = models.TinyConfig(patch_size=8, max_positions=96)
# The second stage, gentler than the project world's (nine tries: docs/easyvqa.md)
CONTEXT_STEPS = 1500
COPY_STEPS = 300  # copying forms in 150 steps here
CONTEXT_SHARE = 0.7
CONTEXT_RELEVANT = 0.7
CONTEXT_LR = 3e-4
CONTEXT_POSITIONS = 256  # the study worlds' longest probe after four demonstrations needs 184


class Parsed(NamedTuple):
    """What a question asks: its family, the shape or colour it names (or None), negation."""

    family: str
    shape: Optional[str]
    colour: Optional[str]
    negated: bool


def _parse_table() -> dict[str, Parsed]:
    """Every question easy-VQA's templates can ask, filled in, -> what it asks."""
    table = {}
    for family, templates in WHAT.items():
        for t in templates:
            for s, c in KINDS:
                shape = s if "{shape}" in t else None
                colour = c if "{colour}" in t else None
                table[t.format(shape=s, colour=c)] = Parsed(family, shape, colour, False)
    for t, negated in YES_NO:
        for s, c in KINDS:
            table[t.format(x=f"{c} shape")] = Parsed("yes/no", None, c, negated)
            table[t.format(x=s)] = Parsed("yes/no", s, None, negated)
    return table


QUESTIONS = _parse_table()


def parse(question: str) -> Parsed:
    """What an easy-VQA question asks; ValueError for any other question."""
    if question not in QUESTIONS:
        raise ValueError(f"not an easy-VQA question: {question!r}")
    return QUESTIONS[question]


def answer(question: str, kind: tuple[str, str]) -> Optional[str]:
    """The true answer about an image of ``kind`` (shape, colour); None where the question has
    none, because it names a shape or colour the image lacks ("what is the red shape?")."""
    p = parse(question)
    shape, colour = kind
    if p.family == "yes/no":
        if p.shape is not None:
            present = p.shape == shape
        else:
            present = p.colour == colour
        return "yes" if present != p.negated else "no"
    if p.shape not in (None, shape) or p.colour not in (None, colour):
        return None
    return shape if p.family == "shape" else colour


def facts() -> ike.Facts:
    """What TinyVLM's in-context training draws facts from (ike.context_stream): the open
    questions by family, and their answers. A yes/no question is only ever a probe."""
    questions = defaultdict(list)
    for q, parsed in QUESTIONS.items():
        if parsed.family != "yes/no":
            questions[parsed.family].append(q)
    answers = {"shape": list(SHAPES), "colour": list(COLOURS), "yes/no": [*SHAPES, *COLOURS]}
    return ike.Facts(dict(questions), lambda q: parse(q).family, answers)


def vocabulary() -> list[str]:
    """Every word easy-VQA asks or answers (sorted, for the tokenizer); the edit targets are
    among its answers."""
    words = set(SHAPES) | set(COLOURS) | {"yes", "no"}
    for q in QUESTIONS:
        words |= set(re.findall(r"\w+|[^\w\s]", q))
    return sorted(words)


# ---------------- The installed package's data
class NotInstalled(RuntimeError):
    """The easy-vqa package is missing."""


def package():
    """The installed ``easy_vqa`` module, or NotInstalled with how to install it."""
    try:
        import easy_vqa
    except ImportError:
        raise NotInstalled("easy-VQA is not installed: pip install easy-vqa") from None
    return easy_vqa


@functools.cache
def questions(split: str) -> list[tuple[str, str, int]]:
    """easy-VQA's "train" or "test" questions as its package lists them: (question, answer,
    image id)."""
    pkg = package()
    getters = {"train": pkg.get_train_questions, "test": pkg.get_test_questions}
    if split not in getters:
        raise ValueError(f"easy-VQA has splits train and test, not {split!r}")
    return list(zip(*getters[split]()))  # its three lists: questions, answers, image ids


@functools.cache
def images(split: str) -> dict[int, Image.Image]:
    """Each image id of a split -> its image, decoded RGB (once per process)."""
    pkg = package()
    getters = {"train": pkg.get_train_image_paths, "test": pkg.get_test_image_paths}
    out = {}
    for i, path in sorted(getters[split]().items()):
        with Image.open(path) as im:
            out[i] = im.convert("RGB")
    return out


@functools.cache
def asked(split: str) -> dict[int, list[tuple[str, str]]]:
    """Each image id of a split -> its (question, answer) pairs."""
    out = defaultdict(list)
    for q, a, i in questions(split):
        out[i].append((q, a))
    return dict(out)


@functools.cache
def kinds(split: str) -> dict[int, tuple[str, str]]:
    """Each image id -> its (shape, colour), for the images whose own questions fit one kind
    only (888 of the 1,000 test images; the others' questions fit several)."""
    out = {}
    for i, pairs in asked(split).items():
        fits = [k for k in KINDS if all(answer(q, k) == a for q, a in pairs)]
        if len(fits) == 1:
            out[i] = fits[0]
    return out


def pool(part: str) -> dict[tuple[str, str], list[int]]:
    """Each kind -> the ids of its test images in ``part`` ("dev" or "test")."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    out = {k: [] for k in KINDS}
    for i, kind in sorted(kinds("test").items()):
        if i % 2 == PARTS[part]:
            out[kind].append(i)
    return out


# ---------------- TinyVLM on easy-VQA
def training_stream(seed: int) -> Iterator[data.Sample]:
    """easy-VQA's train questions, in a fresh seeded order every epoch, endlessly."""
    train = questions("train")
    image_of = images("train")
    rng = random.Random(seed)
    while True:
        for q, a, i in rng.sample(train, len(train)):
            yield data.Sample(image_of[i], q, a)


def pretrain_vision(
    model: models.TinyVLM, steps: int, batch_size: int, lr: float, seed: int, progress: bool
) -> list[float]:
    """Teach TinyVLM's ViT the train images' shape and colour, as BLIP-2's ViT comes pretrained:
    a linear read of the mean patch token, cross-entropy, AdamW. The loss per step.

    Trained through the language model alone, the ViT learns colours but barely shapes."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    ids = sorted(kinds("train"))
    x = model.pixel_values([images("train")[i] for i in ids])  # (N, 3, H, W)
    shape = torch.tensor([SHAPES.index(kinds("train")[i][0]) for i in ids])  # (N,)
    colour = torch.tensor([COLOURS.index(kinds("train")[i][1]) for i in ids])  # (N,)
    W = model.config.vision_width
    heads = torch.nn.Linear(W, len(SHAPES) + len(COLOURS))
    params = [*model.vision.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    losses = []
    for _ in tqdm(range(steps), desc="pretrain ViT", disable=not progress):
        pick = torch.randint(0, len(ids), (batch_size,))
        _, patches = model.vision(x[pick])  # (B, P, W)
        logits = heads(patches.mean(dim=1))  # (B, 3 + 8)
        loss = torch.nn.functional.cross_entropy(logits[:, : len(SHAPES)], shape[pick])
        loss = loss + torch.nn.functional.cross_entropy(logits[:, len(SHAPES) :], colour[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def train(
    out_dir,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    config: models.TinyConfig = CONFIG,
    progress: bool = True,
    vision_steps: int = 600,
    context_steps: int = CONTEXT_STEPS,
    start: Optional[str] = None,
) -> list[float]:
    """BLIP-2's recipe in small: the ViT pretrained on the train images (``vision_steps``) and
    frozen, then train.train_tiny on easy-VQA's train questions over its vocabulary. Returns
    the language model's loss per step. Then the second stage (``context_steps``; the ViT stays
    frozen): train.teach_context, at CONTEXT_POSITIONS. ``start``: skip the first stage, going
    on from this checkpoint of it."""
    losses = []
    if start is None:
        torch.manual_seed(seed)
        model = models.TinyVLM(config, models.build_tokenizer(vocabulary()))
        pretrain_vision(model, vision_steps, 64, lr, seed, progress)
        model.vision.requires_grad_(False)  # AdamW skips parameters without gradients
        stream = training_stream(seed)
        losses = train_tiny(
            out_dir, steps, batch_size, lr, seed, config, progress, stream=stream, model=model
        )
    if context_steps:
        model = models.TinyVLM.from_pretrained(start or out_dir)
        stream = training_stream(seed)
        losses = teach_context(
            model,
            out_dir,
            stream,
            facts(),
            context_steps,
            CONTEXT_POSITIONS,
            seed,
            progress,
            vision=False,
            copy_steps=COPY_STEPS,
            share=CONTEXT_SHARE,
            relevant=CONTEXT_RELEVANT,
            lr=CONTEXT_LR,
        )
    return losses


def accuracy(
    backbone, limit: Optional[int] = None, batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """Exact match (%) of greedy answers on easy-VQA's test questions, by family and in all;
    ``limit``: the first ``limit`` questions only."""
    asks = questions("test")[:limit]
    image_of = images("test")
    right = defaultdict(int)
    total = defaultdict(int)
    starts = range(0, len(asks), batch_size)
    for k in ev.progress_bar(starts, progress, "test questions"):
        chunk = asks[k : k + batch_size]
        answers = backbone.generate([image_of[i] for _, _, i in chunk], [q for q, _, _ in chunk])
        for (q, a, _), got in zip(chunk, answers):
            for family in (parse(q).family, "all"):
                total[family] += 1
                right[family] += got == a
    return {f: 100.0 * right[f] / total[f] for f in (*FAMILIES, "all") if total[f]}


# ---------------- Edit records
class _Edits(NamedTuple):
    """One seed's edits, consistent with each other: ``shape`` always becomes ``shape_target``,
    and each kind of ``new_colour`` always its colour."""

    shape: str
    shape_target: str
    new_colour: dict[tuple[str, str], str]  # colour scope: kind -> its target colour
    colour_kinds: list[tuple[str, str]]  # new_colour's kinds, in a seeded order

    def edited(self, kind: tuple[str, str]) -> tuple[str, str]:
        """The kind as the edits make it."""
        if kind[0] == self.shape:
            return (self.shape_target, kind[1])
        return (kind[0], self.new_colour.get(kind, kind[1]))


def _plan_edits(rng: random.Random) -> _Edits:
    """One shape to another shape; EDITED_COLOURS colours of each other shape to other colours."""
    shape = rng.choice(SHAPES)  # shape scope: this shape -> shape_target
    shape_target = rng.choice([s for s in SHAPES if s != shape])
    new_colour = {}
    for s in SHAPES:
        if s != shape:
            for c in rng.sample(COLOURS, EDITED_COLOURS):
                new_colour[(s, c)] = rng.choice([x for x in COLOURS if x != c])
    colour_kinds = rng.sample(sorted(new_colour), len(new_colour))
    return _Edits(shape, shape_target, new_colour, colour_kinds)


class _Edit(NamedTuple):
    """One record's edit: its family, its image and that image's kind, the target, the question
    and the family's other templates (T-Gen), the kinds in scope (I-Gen) and near it (Loc)."""

    family: str
    image_id: int
    kind: tuple[str, str]
    target: str
    question: str
    asks: list[str]
    scope: list[tuple[str, str]]
    near: list[tuple[str, str]]


class _RecordDraws:
    """The draws of one seed's records from the ``part`` half of the test images: one seeded
    stream, drawn in a fixed order, so that a seed always gives the same records."""

    def __init__(self, seed: int, part: str):
        self.part = part
        self.by_kind = pool(part)
        self.image_of = images("test")
        self.rng = random.Random(seed)
        self.edits = _plan_edits(self.rng)
        edited = self.edits.edited
        self.untouched = [i for k in KINDS if edited(k) == k for i in self.by_kind[k]]
        self.used = set()  # each record its own edit image

    def pick(self, ids: list, k: int, why: str) -> list:
        """k distinct ids, or one line saying what ran out."""
        if len(ids) < k:
            raise ValueError(f"easy-VQA {self.part} images: {why}: {len(ids)} left, {k} needed")
        return self.rng.sample(ids, k)

    def edit(self, r: int) -> _Edit:
        """Record r's edit: of scope "shape" for even r, of scope "colour" for odd r."""
        e = self.edits
        if r % 2 == 0:
            scope = [k for k in KINDS if k[0] == e.shape]
            near = [k for k in KINDS if k[0] not in (e.shape, e.shape_target)]
            ids = [i for k in scope for i in self.by_kind[k] if i not in self.used]
            image_id = self.pick(ids, 1, f"edit images of {e.shape}s")[0]
            kind = kinds("test")[image_id]
            question = WHAT["shape"][0]
            asks = [t.format(colour=kind[1]) for t in WHAT["shape"][1:]]
            return _Edit("shape", image_id, kind, e.shape_target, question, asks, scope, near)
        kind = e.colour_kinds[(r // 2) % len(e.colour_kinds)]
        target = e.new_colour[kind]
        near = [(kind[0], c) for c in COLOURS if e.edited((kind[0], c)) == (kind[0], c)]
        near = [k for k in near if k[1] != target]
        ids = [i for i in self.by_kind[kind] if i not in self.used]
        image_id = self.pick(ids, 1, f"edit images of {kind[1]} {kind[0]}s")[0]
        question = WHAT["colour"][0].format(shape=kind[0])
        asks = [t.format(shape=kind[0]) for t in WHAT["colour"][1:]]
        return _Edit("colour", image_id, kind, target, question, asks, [kind], near)

    def locality(self, edit: _Edit, n: int) -> list[data.Sample]:
        """Loc: the edit's question on an image of each of n kinds near the scope."""
        samples = []
        for k in self.pick([k for k in edit.near if self.by_kind[k]], n, "Loc kinds"):
            i = self.rng.choice(self.by_kind[k])
            samples.append(data.Sample(self.image_of[i], edit.question, answer(edit.question, k)))
        return samples

    def q_locality(self, edit: _Edit, shown: list[int]) -> list[data.Sample]:
        """q_loc: each shown image asked the other open family (even places) or a yes/no
        question (odd places) whose answer the edits leave as it is, yes and no alike."""
        other = "colour" if edit.family == "shape" else "shape"
        samples = []
        for j, i in enumerate(shown):
            k = kinds("test")[i]
            ask = other if j % 2 == 0 else "yes/no"
            safe = [q for q, p in QUESTIONS.items() if p.family == ask]
            safe = [q for q in safe if answer(q, k) is not None]
            safe = [q for q in safe if answer(q, k) == answer(q, self.edits.edited(k))]
            reply = self.rng.choice(sorted({answer(q, k) for q in safe}))  # yes and no alike
            q = self.rng.choice([q for q in safe if answer(q, k) == reply])
            samples.append(data.Sample(self.image_of[i], q, reply))
        return samples

    def m_locality(self, target: str, n: int) -> list[data.Sample]:
        """m_loc: n images of kinds no edit touches, each asked one of its own questions."""
        samples = []
        for i in self.pick(self.untouched, n, "m_loc images"):
            q, a = self.rng.choice([(q, a) for q, a in asked("test")[i] if a != target])
            samples.append(data.Sample(self.image_of[i], q, a))
        return samples

    def record(self, r: int, n_images: int, n_locality: int, n_unrelated: int) -> data.EditRecord:
        """Record r (its id is r + 1)."""
        edit = self.edit(r)
        self.used.add(edit.image_id)
        asks = self.rng.sample(edit.asks, len(edit.asks))  # the last one is the positive
        others = [i for k in edit.scope for i in self.by_kind[k] if i != edit.image_id]
        shown = [edit.image_id, *self.pick(others, n_images, "I-Gen images")]
        locality = self.locality(edit, n_locality)
        q_locality = self.q_locality(edit, shown)
        m_locality = self.m_locality(edit.target, n_unrelated)
        return data.EditRecord(
            id=str(r + 1),
            image=self.image_of[edit.image_id],
            question=edit.question,
            answer=answer(edit.question, edit.kind),
            target=edit.target,
            rephrases=asks[:-1],
            train_rephrases=asks[-1:],
            rephrase_images=[self.image_of[i] for i in shown[1:]],
            locality=locality,
            m_locality=m_locality,
            category=edit.family,
            q_locality=q_locality,
        )


def make_records(
    seed: int,
    n: int = 40,
    part: str = "test",
    n_images: int = 5,
    n_locality: int = 3,
    n_unrelated: int = 2,
) -> list[data.EditRecord]:
    """``n`` edit records from the ``part`` half of the test images, alternately of scope
    "shape" and "colour", consistent with each other so that all of them can be applied at
    once (the sequential protocol):

    - one shape, in every colour, always gets the same other shape; the colour edits change
      EDITED_COLOURS colours of each other shape, a kind always to the same colour;
    - T-Gen: the family's other templates, one of them kept back as the positive;
    - I-Gen: other images of the scope; Loc: the edit's question on kinds no edit changes,
      never of the target's kind (a leak there could not be seen): the shape neither edited
      nor the target; the same shape in an unedited colour;
    - q_loc: each of the edit's images asked the other open family (even places) or a yes/no
      question (odd places), only questions whose answer stays the same once the image's
      kind is changed as the edits change it: "what color is the shape?" on an edited circle,
      not "what color is the circle?", "is there a red shape?", not "is there a circle?";
    - m_loc: images of kinds no edit touches, asked one of their own easy-VQA questions.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be an even number >= 2, got {n}")
    if n_locality > len(COLOURS) - EDITED_COLOURS - 1:
        raise ValueError(f"n_locality must be at most {len(COLOURS) - EDITED_COLOURS - 1}")
    draws = _RecordDraws(seed, part)
    return [draws.record(r, n_images, n_locality, n_unrelated) for r in range(n)]


# ---------------- Command line
def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="easyvqa.py",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    positive = cli.POSITIVE_INT
    t = sub.add_parser("train", help="train TinyVLM on the train split (seeded)")
    t.add_argument("--out", default=str(MODEL_DIR), help=f"checkpoint dir (default {MODEL_DIR})")
    t.add_argument("--steps", type=positive, default=2000, help="language-model steps (2000)")
    t.add_argument("--batch-size", type=positive, default=32, help="per step (default 32)")
    t.add_argument("--lr", type=cli.POSITIVE, default=5e-4, help="peak lr (default 5e-4)")
    t.add_argument("--seed", type=int, default=0, help="weights and data order (default 0)")
    context = "second stage (train.teach_context): steps with in-context facts, after its copy "
    context += f"steps (default {CONTEXT_STEPS}; 0: none)"
    steps = cli.number(int, lambda n: n >= 0, "an integer >= 0")
    t.add_argument("--context-steps", type=steps, default=CONTEXT_STEPS, help=context)
    skip = "skip the first stage: go on from this checkpoint of it (96 positions)"
    t.add_argument("--from", dest="start", metavar="DIR", help=skip)
    c = sub.add_parser("check", help="exact match on the test questions, by family")
    c.add_argument("--model", default=str(MODEL_DIR), help=f"checkpoint dir (default {MODEL_DIR})")
    c.add_argument("--limit", type=positive, help="the first N test questions only")
    m = sub.add_parser("make-records", help="edit records from the test images, OKEDIT layout")
    m.add_argument("--out", required=True, help="a new or empty folder")
    m.add_argument("--seed", type=int, default=0, help="which records (default 0)")
    m.add_argument("--part", choices=tuple(PARTS), default="test", help="image half (test)")
    even = cli.number(int, lambda n: n >= 2 and n % 2 == 0, "an even number >= 2")
    m.add_argument("-n", type=even, default=40, help="records, even (default 40)")
    for p in (t, c, m):
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no bars")
    for p in (t, c):
        cli.add_threads(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check the options, the package and the paths before any work, then run the command."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        package()
        if args.command == "check":
            if not (Path(args.model) / "model.safetensors").is_file():
                raise cli.UsageError(
                    f"--model {args.model}: no TinyVLM checkpoint there "
                    f"(python easyvqa.py train --out {args.model} makes one)"
                )
            model = models.TinyVLM.from_pretrained(args.model)
        else:
            out = Path(args.out)
            start = getattr(args, "start", None)
            if start is not None and not (Path(start) / "model.safetensors").is_file():
                raise cli.UsageError(f"--from {start}: no TinyVLM checkpoint there")
            if start is not None and not args.context_steps:
                raise cli.UsageError("--from skips the first stage: give --context-steps N")
            if args.command == "make-records" and out.is_dir() and any(out.iterdir()):
                raise cli.UsageError(f"--out {out}: not empty; give a new or empty folder")
            cli.claim_output(out, folder=True)
    except (cli.UsageError, NotInstalled, OSError, ValueError) as e:
        parser.exit(2, f"easyvqa.py {args.command}: error: {e}\n")
    if args.command != "make-records":
        torch.set_num_threads(args.threads)
    start = time.time()
    if args.command == "train":
        losses = train(
            out,
            args.steps,
            args.batch_size,
            args.lr,
            args.seed,
            progress=args.progress,
            context_steps=args.context_steps,
            start=args.start,
        )
        loss = sum(losses[-50:]) / len(losses[-50:])
        print(f"trained in {time.time() - start:.0f} s; final loss {loss:.4f}; saved to {out}")
    elif args.command == "check":
        result = accuracy(model, args.limit, progress=args.progress)
        result |= ike.reading(model, make_records(0))  # held-out test images
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))
    else:
        written = writers.write_okedit(make_records(args.seed, args.n, args.part), out)
        print(f"wrote {args.n} records, {len(written)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
