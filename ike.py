"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?"), as EasyEdit
adapts it to vision-language models: no weight changes, nothing stored at the layer. An edit
is text: k demonstrations retrieved for the new fact, then the fact, before every probe.

Also the in-context facts TinyVLM is trained on (train.py, easyvqa.py), so that the shipped
miniature can read a fact in its prompt, as BLIP-2 can.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from data import Sample
from editor import Editor, EditReport
from models import PROMPT, TinyVLM

# IKE's in-context text, as EasyEdit writes it; it goes where PROMPT's question goes.
DEMONSTRATION = "New Fact: {q} {a}\nPrompt: {x} {y}\n\n"
NEW_FACT = "New Fact: {q} {a}\nPrompt: {x}"
FORMAT_WORDS = ("New", "Fact", "Prompt")  # the words a TinyVLM must add to read it (grown)

MAX_DEMONSTRATIONS = 4  # what TinyVLM reads: k = 3 retrieved, and the edit's own copy


def demonstration(q: str, a: str, x: str, y: str) -> str:
    """One demonstration: the fact (q, a), then a prompt x answered y."""
    return DEMONSTRATION.format(q=q, a=a, x=x, y=y)


def in_context(demonstrations: Sequence[str], q: str, a: str, x: str) -> str:
    """What goes where the backbone's prompt puts the question: the demonstrations, the new
    fact (q, a), and the probe x."""
    return "".join(demonstrations) + NEW_FACT.format(q=q, a=a, x=x)


# ---------------- teaching TinyVLM to read a fact in its prompt
class Facts(NamedTuple):
    """A world's questions and answers, as in-context training draws them."""

    questions: dict[str, list[str]]  # family -> the questions a fact can ask
    family_of: Callable[[str], str]  # any question of the world -> its family
    answers: dict[str, list[str]]  # family (of any question) -> the words that answer it


def _random_demonstration(rng: random.Random, facts: Facts) -> str:
    """A copy, update or retain demonstration of a random fact."""
    families = sorted(facts.questions)
    family = rng.choice(families)
    q = rng.choice(facts.questions[family])
    a = rng.choice(facts.answers[family])
    kind = rng.choice(("copy", "update", "retain"))
    if kind == "copy":
        return demonstration(q, a, q, a)
    if kind == "update":
        return demonstration(q, a, rng.choice(facts.questions[family]), a)
    other = rng.choice([f for f in families if f != family])
    x = rng.choice(facts.questions[other])
    return demonstration(q, a, x, rng.choice(facts.answers[other]))


def context_stream(
    stream: Iterator[Sample],
    facts: Facts,
    share: float,
    seed: int,
    relevant: float = 0.5,
    max_demonstrations: int = MAX_DEMONSTRATIONS,
) -> Iterator[Sample]:
    """``stream``'s samples, ``share`` of them asked after 0 to ``max_demonstrations``
    demonstrations and a new fact, which says a word that could answer the sample's question
    (so that only the fact's question tells whether it applies). ``relevant`` of those facts
    ask the sample's family: the answer is then the fact's. The others ask another family, and
    the answer stays the image's: a fact about another question is ignored, and so are the
    demonstrations' facts."""
    rng = random.Random(seed)
    families = sorted(facts.questions)
    for s in stream:
        if rng.random() >= share:
            yield s
            continue
        n = rng.randint(0, max_demonstrations)
        demos = [_random_demonstration(rng, facts) for _ in range(n)]
        family = facts.family_of(s.question)
        a = rng.choice(facts.answers[family])  # a word that could answer the question
        if family in facts.questions and rng.random() < relevant:
            q = rng.choice(facts.questions[family])
            yield Sample(s.image, in_context(demos, q, a, s.question), a)
        else:
            other = rng.choice([f for f in families if f != family])
            q = rng.choice(facts.questions[other])
            yield Sample(s.image, in_context(demos, q, a, s.question), s.answer)


def _answers(backbone, images: list, questions: list[str], batch_size: int) -> list[str]:
    """Greedy answers, ``batch_size`` at a time."""
    out = []
    for i in range(0, len(questions), batch_size):
        out += backbone.generate(images[i : i + batch_size], questions[i : i + batch_size])
    return out


def reading(backbone, records: Sequence, batch_size: int = 64) -> dict[str, float]:
    """Whether a backbone reads a fact in its prompt, on the records' (held-out) images, with
    the record's fact (t, y^n) and no demonstration before each probe. "follows": % of its
    rephrasings answered y^n; "ignores": % of its images asked another question (q_loc)
    answered as with no fact."""
    follow = [(r, q) for r in records for q in r.rephrases]
    ignore = [(r, s.question) for r in records for s in r.q_locality]
    images = [s.image for r in records for s in r.q_locality]
    told = [in_context([], r.question, r.target, x) for r, x in follow]
    followed = _answers(backbone, [r.image for r, _ in follow], told, batch_size)
    told = [in_context([], r.question, r.target, x) for r, x in ignore]
    kept = _answers(backbone, images, told, batch_size)
    plain = _answers(backbone, images, [x for _, x in ignore], batch_size)
    follows = sum(a == r.target for a, (r, _) in zip(followed, follow)) / len(follow)
    ignores = sum(a == b for a, b in zip(kept, plain)) / len(ignore)
    return {"follows": 100.0 * follows, "ignores": 100.0 * ignores}


def reads_prompts(backbone) -> bool:
    """False for a TinyVLM never taught IKE's format (TinyVLM.grown adds its words): IKE would
    measure that it cannot read, not IKE. A real backbone reads any text."""
    vocab = backbone.tokenizer.get_vocab()
    return not isinstance(backbone, TinyVLM) or "Fact" in vocab


# ---------------- Retrieval: a sentence embedding of every demonstration
class WordCounts:
    """The retriever that needs no download: a demonstration is the vector of its words'
    counts over the backbone's vocabulary, unit length. Where every question is a template,
    MiniLM's nearest demonstrations are those that share the fact's words, and so are these."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        V = len(self.tokenizer)
        rows = []
        for text in texts:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            rows.append(torch.bincount(ids, minlength=V).float())  # (V,)
        return F.normalize(torch.stack(rows), dim=-1)  # (N, V)


class SentenceEncoder:
    """A sentence-transformers model from a local folder (EasyEdit's is all-MiniLM-L6-v2):
    the mean of its last hidden states over the tokens, unit length, as that library pools
    MiniLM. Nothing downloads: a missing or malformed folder is one ValueError."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoModel, AutoTokenizer

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--retriever {path}: no config.json, not a sentence-transformers model"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as e:
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"--retriever {path}: cannot be read as a sentence encoder ({why})")

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        h = self.model(**batch).last_hidden_state  # (N, T, E)
        mask = batch["attention_mask"][..., None].to(h.dtype)  # (N, T, 1)
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # (N, E)


def nearest(store: torch.Tensor, query: torch.Tensor, k: int) -> list[int]:
    """The k store rows nearest the query (dot product of unit vectors), nearest first; a tie
    goes to the earlier row. store (N, E), query (E,)."""
    scores = (store.double() @ query.double()).round(decimals=9)  # (N,): equal rows tie
    order = torch.sort(-scores, stable=True).indices
    return order[:k].tolist()


# ---------------- The editor
def demonstrations(examples: Sequence) -> list[str]:
    """The store: each training edit's copy, update and retain demonstrations. ``examples``:
    MEND's meta-training Examples (mend.py), edits nobody scores; the update's question is a
    training rephrasing, the retain's an out-of-scope question with its own answer."""
    out = []
    for ex in examples:
        q = ex.edit.question
        a = ex.edit.answer
        out.append(demonstration(q, a, q, a))  # copy
        out.append(demonstration(q, a, ex.rephrase.question, a))  # update
        out.append(demonstration(q, a, ex.locality[0].question, ex.locality[0].answer))  # retain
    return out


class IKE(Editor):
    """IKE's edits of a backbone: no weight changes. An edit retrieves the k demonstrations
    nearest its copy demonstration and puts its own copy last; ``prefix(record)`` is then the
    text before each of the record's probes. Every edited fact joins the store, so that in the
    sequential protocol the store holds the facts edited so far."""

    def __init__(self, backbone, store: Sequence[str], retriever=None, k: int = 3):
        self.backbone = backbone
        self.retriever = retriever or WordCounts(backbone.tokenizer)
        self.k = k
        self.store = list(store)
        self.keys = self.retriever.embed(self.store)  # (N, E)
        self.edits = []  # per edit: (record id, its demonstrations, (q, y^n))

    def __len__(self) -> int:
        return len(self.edits)

    def edit(self, record) -> EditReport:
        """Retrieve the demonstrations for the fact (i, t) -> y^n; refuse it, before it is
        kept, if a probe would not fit in the backbone's positions with them (never cut)."""
        start = time.perf_counter()
        q = record.question
        y = record.target
        own = demonstration(q, y, q, y)  # copy
        query = self.retriever.embed([own])  # (1, E)
        # A training edit may ask a scored probe with the same target: never retrieve it.
        scored = [f": {x} {y}\n" for x in (q, *record.rephrases)]
        allowed = [i for i, d in enumerate(self.store) if not any(p in d for p in scored)]
        retrieved = nearest(self.keys[allowed], query[0], self.k)
        demos = [self.store[allowed[i]] for i in retrieved] + [own]
        self.check(record, in_context(demos, q, y, ""), len(demos))
        self.edits.append((record.id, demos, (q, y)))
        self.store.append(own)
        self.keys = torch.cat([self.keys, query])  # (N + 1, E)
        seconds = time.perf_counter() - start
        return EditReport(len(self) - 1, "prompt", [], math.nan, math.nan, math.nan, [], seconds)

    def prefix(self, record) -> str:
        """The text before each probe of ``record``: its edit's demonstrations and new fact
        (its latest edit); empty for a record not edited."""
        for record_id, demos, (q, y) in reversed(self.edits):
            if record_id == record.id:
                return in_context(demos, q, y, "")
        return ""

    def check(self, record, prefix: str, n_demos: int) -> None:
        """ValueError, naming the record, if a probe of it after ``prefix`` and the longest
        answer the model may generate does not fit in the backbone's positions."""
        b = self.backbone
        probes = [record.question, *record.rephrases]
        probes += [s.question for s in (*record.locality, *record.q_locality, *record.m_locality)]
        for x in probes:
            n = b.n_image_tokens + len(b.prompt_ids(PROMPT.format(prefix + x))) + b.max_new_tokens
            if n > b.max_positions:
                raise ValueError(
                    f"IKE, record {record.id}: the probe {x!r} after {n_demos} demonstrations "
                    f"needs {n} positions; the model has {b.max_positions} (choose a smaller k)"
                )

    def attached(self):
        """The model itself: an IKE edit lives in the prompt (``prefix``), not the weights."""
        return contextlib.nullcontext()

    def remove(self, j: int) -> None:
        """Undo edit j: its fact leaves the prompts and the store."""
        if not 0 <= j < len(self):
            raise IndexError(f"edit {j} out of range for {len(self)} edits")
        own = self.edits.pop(j)[1][-1]
        i = len(self.store) - 1 - self.store[::-1].index(own)  # its latest place in the store
        del self.store[i]
        self.keys = torch.cat([self.keys[:i], self.keys[i + 1 :]])
