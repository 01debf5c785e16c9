"""The world: a tiny, fully known visual domain, behind TinyVLM's training stream and the
shipped tiny OKEDIT sample (`python world.py make-sample --seed 0 --out assets/okedit_tiny`).

One object per 64x64 image: a shape in a colour (a "kind", e.g. a red circle), with nuisance
variation (size, position, background tint, pixel noise). Three question families with ten
paraphrases each: shape, colour and name, where every kind has a made-up name (the analogue of
OKEDIT's "What brand is this computer?"). The knowledge is fixed; a seed only picks renderings
and records, so one trained TinyVLM knows every seed's world.

Edits change an answer at two scopes, like the paper's Fig. 1:

    scope "kind":  the name of one kind       ("what is this called?" on red circles)
    scope "shape": the shape word of a shape  ("what shape is this?" on all circles)

Training and evaluation renderings never coincide: the object's centre (cx, cy) has cx + cy even
in training renderings and odd in evaluation ones.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from data import EditRecord, Sample, anchor_image
from ike import Facts
from writers import write_okedit

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {  # base RGB; each rendering jitters it by up to +-14 per channel
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (230, 205, 35),
    "purple": (135, 45, 170),
    "orange": (240, 130, 25),
}
KINDS = [(s, c) for s in SHAPES for c in COLOURS]  # 36 kinds


def _made_up_words(n: int, seed: int, avoid: set[str] = frozenset()) -> list[str]:
    """n distinct pronounceable non-words, fixed by `seed` (not the world's seed)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < n:
        syllables = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
        w = syllables + rng.choice("knrsx")
        if w not in words and w not in avoid:
            words.append(w)
    return words


KIND_NAMES = dict(zip(KINDS, _made_up_words(len(KINDS), seed=1)))  # what each kind is called
# The edit targets y^n: never any image's answer in training (only read in context, facts()).
NEW_WORDS = _made_up_words(64, seed=2, avoid=set(KIND_NAMES.values()))

QUESTIONS = {  # family -> ten paraphrases
    "shape": [
        "what shape is this?",
        "what shape is the object?",
        "which shape is shown?",
        "what is the shape of the object?",
        "what shape do you see?",
        "what shape is in the picture?",
        "which shape is in the image?",
        "tell me the shape of this thing.",
        "what geometric shape is this?",
        "what is the form of this object?",
    ],
    "colour": [
        "what colour is this?",
        "what colour is the object?",
        "which colour is shown?",
        "what is the colour of the object?",
        "what colour do you see?",
        "what colour is in the picture?",
        "which colour does the object have?",
        "tell me the colour of this thing.",
        "what hue is this object?",
        "what is the colour of this thing?",
    ],
    "name": [
        "what is this called?",
        "what is the name of this thing?",
        "what do people call this?",
        "how is this object named?",
        "what is this object called?",
        "what name does this have?",
        "tell me the name of this object.",
        "what is the name of the object in the picture?",
        "what do we call this thing?",
        "which name does this object have?",
    ],
}
FAMILY_OF = {q: f for f, qs in QUESTIONS.items() for q in qs}
ANCHOR_ANSWERS = {  # defined answers for the plain anchor images
    "black": {"shape": "nothing", "colour": "black", "name": "nothing"},
    "white": {"shape": "nothing", "colour": "white", "name": "nothing"},
}
SIZE = 64
JITTER = 5  # the object's centre lies within +-JITTER pixels of the image centre


def answer_of(kind: tuple[str, str], family: str) -> str:
    """The world's true answer for a kind (shape, colour) and a question family."""
    shape, colour = kind
    return {"shape": shape, "colour": colour, "name": KIND_NAMES[kind]}[family]


def rephrasings(question: str) -> list[str]:
    """The other paraphrases of `question` in its family (what TinyVLM 'knows' as rephrasings)."""
    if question not in FAMILY_OF:
        raise ValueError(f"not a question of the world: {question!r}")
    return [q for q in QUESTIONS[FAMILY_OF[question]] if q != question]


def facts() -> Facts:
    """What TinyVLM's in-context training draws facts from (ike.context_stream): the world's
    questions, and every word it answers or edits to. An edit target is read and copied
    there, never any image's answer."""
    answers = {a for kind in KINDS for a in (*kind, KIND_NAMES[kind])} | set(NEW_WORDS)
    answers |= {a for answers in ANCHOR_ANSWERS.values() for a in answers.values()}
    words = sorted(answers)  # any family's fact may say any of them: the world's targets do
    return Facts(QUESTIONS, FAMILY_OF.__getitem__, {family: words for family in QUESTIONS})


def vocabulary() -> list[str]:
    """Every word the world can ask or answer, plus the edit targets (sorted, for the tokenizer)."""
    words = set(KIND_NAMES.values()) | set(NEW_WORDS) | set(SHAPES) | set(COLOURS)
    words |= {a for answers in ANCHOR_ANSWERS.values() for a in answers.values()}
    for q in FAMILY_OF:
        words |= set(re.findall(r"\w+|[^\w\s]", q))
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        return [
            (
                cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
    raise ValueError(shape)


def centre(rng: random.Random, r: int, split: str) -> tuple[int, int]:
    """The object's centre: cx + cy is even in "train" renderings and odd in "eval" ones."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    lo = SIZE // 2 - JITTER
    hi = SIZE // 2 + JITTER
    cx = rng.randint(lo, hi)
    cy = rng.randint(lo, hi)
    if (cx + cy) % 2 != (0 if split == "train" else 1):  # the train/eval partition
        cy += 1 if cy < hi else -1
    return cx, cy


def render(kind: tuple[str, str], rng: random.Random, split: str) -> Image.Image:
    """One 64x64 rendering of `kind`; split "train" puts the centre on cx+cy even, "eval" on odd."""
    shape, colour = kind
    r = rng.randint(14, 21)  # object half-size
    cx, cy = centre(rng, r, split)
    grey = rng.randint(190, 235)  # light backgrounds: every colour is darker than its background
    background = tuple(min(255, grey + rng.randint(-12, 12)) for _ in range(3))
    fill = tuple(min(255, max(0, v + rng.randint(-14, 14))) for v in COLOURS[colour])
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = round(r * 0.85)
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "cross":
        w = max(3, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-5, 6, (SIZE, SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def training_stream(seed: int) -> Iterator[Sample]:
    """Endless training samples for TinyVLM: every kind x family x paraphrase, plus anchors.

    Only "train" renderings (cx + cy even), so no evaluation rendering is ever produced.
    """
    rng = random.Random(seed)
    while True:
        family = rng.choice(sorted(QUESTIONS))
        question = rng.choice(QUESTIONS[family])
        if rng.random() < 0.06:
            anchor = rng.choice(sorted(ANCHOR_ANSWERS))
            yield Sample(anchor_image(anchor, SIZE), question, ANCHOR_ANSWERS[anchor][family])
        else:
            kind = rng.choice(KINDS)
            yield Sample(render(kind, rng, "train"), question, answer_of(kind, family))


def _near_misses(kind: tuple[str, str]) -> list[tuple[str, str]]:
    """Kinds that differ from `kind` in exactly one attribute (shape or colour)."""
    return [k for k in KINDS if (k[0] == kind[0]) != (k[1] == kind[1])]


def _edited_kinds(rng: random.Random, n_locality: int, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` kinds to edit, each keeping at least `n_locality` near misses unedited."""
    chosen: list[tuple[str, str]] = []
    for kind in rng.sample(KINDS, len(KINDS)):
        trial = chosen + [kind]
        if len(chosen) < limit and all(
            len(set(_near_misses(k)) - set(trial)) >= n_locality for k in trial
        ):
            chosen = trial
    return chosen


class _Edits(NamedTuple):
    """What one seed's records edit, consistent with each other: an edited shape or kind always
    gets the same target."""

    shapes: list[str]  # scope "shape": half of the shapes
    kinds: list[tuple[str, str]]  # scope "kind"
    target_of: dict  # an edited shape or kind -> its target

    def unedited(self, family: str, k: tuple[str, str]) -> bool:
        """No edit changes the answer of this question family on kind k."""
        if family == "name":
            return k not in self.kinds
        if family == "shape":
            return k[0] not in self.shapes
        return True  # no edit changes a colour


def _plan_edits(rng: random.Random, n_locality: int, n: int) -> _Edits:
    """Half of the shapes and up to n / 2 kinds to edit, each with a target of its own."""
    words = rng.sample(NEW_WORDS, len(NEW_WORDS))  # a seeded order of the new words
    shapes = rng.sample(SHAPES, len(SHAPES) // 2)  # shape scope: half of the shapes
    kinds = _edited_kinds(rng, n_locality, n // 2)  # kind scope
    return _Edits(shapes, kinds, dict(zip([*shapes, *kinds], words)))  # one target per shape / kind


class _Edit(NamedTuple):
    """One record's edit: the kind its image shows, the family it asks, its target, the kinds in
    its scope, and the near misses out of every record's scope (its Loc kinds)."""

    kind: tuple[str, str]
    family: str
    target: str
    scope: list[tuple[str, str]]
    near: list[tuple[str, str]]


def _edit_of(i: int, rng: random.Random, edits: _Edits) -> _Edit:
    """Record i's edit: of scope "kind" for even i, of scope "shape" for odd i."""
    if i % 2 == 0:  # scope "kind": the name of one kind
        kind = edits.kinds[(i // 2) % len(edits.kinds)]
        near = [k for k in _near_misses(kind) if k not in edits.kinds]
        return _Edit(kind, "name", edits.target_of[kind], [kind], near)
    shape = rng.choice(edits.shapes)  # scope "shape": the shape word of every colour of a shape
    kind = (shape, rng.choice(sorted(COLOURS)))
    scope = [k for k in KINDS if k[0] == shape]
    near = [k for k in KINDS if k[1] == kind[1] and k[0] not in edits.shapes]
    return _Edit(kind, "shape", edits.target_of[shape], scope, near)


def _shown(
    rng: random.Random, edit: _Edit, n_images: int
) -> list[tuple[tuple[str, str], Image.Image]]:
    """The edit image, then n_images other renderings of its scope (I-Gen), each with its kind,
    in the order the stream draws them."""
    shown = [(edit.kind, render(edit.kind, rng, "eval"))]
    for _ in range(n_images):
        k = rng.choice(edit.scope)
        shown.append((k, render(k, rng, "eval")))
    return shown


def _unrelated(rng: random.Random, kinds: list[tuple[str, str]]) -> list[Sample]:
    """m_loc: a rendering of each kind asked its colour, which no edit changes."""
    samples = []
    for k in kinds:
        image = render(k, rng, "eval")  # drawn before its question, as always
        samples.append(Sample(image, rng.choice(QUESTIONS["colour"]), answer_of(k, "colour")))
    return samples


def _q_locality(rng: random.Random, edits: _Edits, edit: _Edit, shown: list) -> list[Sample]:
    """q_loc: each of the edit's images asked another family, one that no edit changes on the
    image's kind (alternating among those), so that no edit, alone or with the others, should
    change the answer."""
    others = [f for f in QUESTIONS if f != edit.family]
    samples = []
    for j, (k, image) in enumerate(shown):
        safe = [f for f in others if edits.unedited(f, k)]
        f = safe[j % len(safe)]
        samples.append(Sample(image, rng.choice(QUESTIONS[f]), answer_of(k, f)))
    return samples


def make_records(
    seed: int,
    n: int = 40,
    n_rephrases: int = 5,
    n_train_rephrases: int = 2,
    n_images: int = 5,
    n_locality: int = 3,
    n_unrelated: int = 2,
) -> list[EditRecord]:
    """`n` edit records, alternately of scope "kind" (a kind's name) and "shape" (a shape's word).

    Every rendering is from the "eval" split. The records are consistent with each other, so
    that all of them can be applied at once (the sequential protocol): one kind or one shape
    always gets the same target, shape-scope edits touch half of the shapes, and no record's
    locality sample lies in any record's edit scope (edited kinds keep unedited near misses).
    Unrelated samples ask the colour, which no edit changes. Beyond what the world can hold
    (about 40 records) kinds repeat; targets stay consistent.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be an even number >= 2, got {n}")
    if n_locality > len(SHAPES) // 2:
        raise ValueError(f"n_locality must be at most {len(SHAPES) // 2}, got {n_locality}")
    rng = random.Random(seed)
    edits = _plan_edits(rng, n_locality, n)
    records = []
    for i in range(n):
        edit = _edit_of(i, rng, edits)
        questions = rng.sample(QUESTIONS[edit.family], 1 + n_rephrases + n_train_rephrases)
        unrelated = [rng.choice(KINDS) for _ in range(n_unrelated)]
        shown = _shown(rng, edit, n_images)
        locality = []
        for k in rng.sample(edit.near, n_locality):
            locality.append(Sample(render(k, rng, "eval"), questions[0], answer_of(k, edit.family)))
        m_locality = _unrelated(rng, unrelated)
        # q_loc draws from a stream of its own, so that every rendering above stays what it was
        q_rng = random.Random(f"q_locality {seed} {i}")
        records.append(
            EditRecord(
                id=str(i + 1),
                image=shown[0][1],
                question=questions[0],
                answer=answer_of(edit.kind, edit.family),
                target=edit.target,
                rephrases=questions[1 : 1 + n_rephrases],
                train_rephrases=questions[1 + n_rephrases :],
                rephrase_images=[im for _, im in shown[1:]],
                q_locality=_q_locality(q_rng, edits, edit, shown),
                locality=locality,
                m_locality=m_locality,
                category="kind" if i % 2 == 0 else "shape",
            )
        )
    return records


# ---------------------------------------------------------------------------
# The tiny OKEDIT sample (assets/okedit_tiny, read by data.load_sample), written by
# `python world.py make-sample`

SAMPLE_SEED = 0  # the seed the committed sample was made with


def make_sample(seed: int, out_dir: Union[str, os.PathLike], n: int = 40) -> list[Path]:
    """Write `make_records(seed, n)` in the OKEDIT layout (byte-identical for the same seed);
    returns the paths written."""
    return write_okedit(make_records(seed, n), out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The world of BalancEdit's TinyVLM: make-sample writes the world's "
        "edit records in the OKEDIT layout (the shipped sample is "
        f"`make-sample --seed {SAMPLE_SEED} --out assets/okedit_tiny`)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-sample", help="write a tiny OKEDIT-layout sample from the world")
    m.add_argument(
        "--seed", type=int, default=SAMPLE_SEED, help=f"world seed (default {SAMPLE_SEED})"
    )
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("-n", type=int, default=40, help="number of edit records, even (default 40)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from cli import OutputError, claim_output  # the command line's, only when run as one

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cleanup = claim_output(args.out, folder=True)  # by trying, before any work
    except OutputError as e:
        parser.exit(2, f"world.py make-sample: error: {e}\n")
    try:
        written = make_sample(args.seed, args.out, args.n)
    except (ValueError, OSError) as e:
        cleanup()
        parser.exit(2, f"world.py make-sample: error: {e}\n")
    mine = set(written)
    others = [p for p in Path(args.out).rglob("*") if p.is_file() and p not in mine]
    size = sum(p.stat().st_size for p in written)
    message = f"wrote {args.n} records, {len(written)} files, {size} bytes to {args.out}"
    if others:
        message += f" ({len(others)} other files already there were left as they were)"
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
