"""IKE (ike.py): the in-context text written out by hand, retrieval against a brute-force
reference, the edits' demonstrations and the store in both protocols, no scored probe among the
demonstrations, a context too long refused (never cut), the in-context training stream, the
grown TinyVLM, the sentence encoder from a local folder, and IKE under the protocols."""

import hashlib
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import evaluate
import ike
import mend
import models
import train
import world
from data import Sample

ROOT = Path(__file__).resolve().parent.parent
D = ike.demonstration
SMALL_STORE = [  # demonstrations of other facts, for records[0]: "what do we call this thing?"
    D("what is this called?", "daben", "what is this called?", "daben"),
    D("what shape is this?", "kazok", "what shape is this?", "kazok"),
    D("what do we call this thing?", "nelex", "what do we call this thing?", "nelex"),
    D("what do people call this?", "rerax", "what do we call this thing?", "rerax"),
    D("what do we call this thing?", "nelex", "what colour is this?", "red"),
    D("what do we call this thing?", "nelex", "what do we call this thing?", "nelex"),  # = 2
]


@pytest.fixture(scope="module")
def grown(tiny):
    """The random tiny model with room for k = 3 demonstrations (its 64 positions hold none)."""
    return tiny.grown(192, ike.FORMAT_WORDS).eval()


@pytest.fixture(scope="module")
def world_store():
    """IKE's store as make_editor builds it for the shipped world."""
    return ike.demonstrations(mend.world_examples(evaluate.IKE_SEED))


# ---------------------------------------------------------------- the text
def test_the_in_context_text_golden():
    d = ike.demonstration("what shape is this?", "daben", "which shape is shown?", "daben")
    assert d == "New Fact: what shape is this? daben\nPrompt: which shape is shown? daben\n\n"
    e = ike.demonstration("what is this called?", "rerax", "what colour is this?", "red")
    text = ike.in_context([d, e], "what do we call this thing?", "fesak", "what is this called?")
    assert text == (
        "New Fact: what shape is this? daben\nPrompt: which shape is shown? daben\n\n"
        "New Fact: what is this called? rerax\nPrompt: what colour is this? red\n\n"
        "New Fact: what do we call this thing? fesak\nPrompt: what is this called?"
    )
    assert ike.in_context([], "q?", "a", "") == "New Fact: q? a\nPrompt: "


def test_the_store_is_each_examples_copy_update_and_retain_in_order():
    def example(q, y, rephrase, loc_q, loc_a):
        locality = [Sample(None, loc_q, loc_a), Sample(None, "what hue is this object?", "blue")]
        return mend.Example(
            Sample(None, q, y), Sample(None, rephrase, y), Sample(None, q, y), locality
        )

    examples = [
        example(
            "what shape is this?", "daben", "which shape is shown?", "what colour is this?", "red"
        ),
        example(
            "what is this called?",
            "fesak",
            "what do people call this?",
            "what shape is this?",
            "star",
        ),
    ]
    assert ike.demonstrations(examples) == [
        "New Fact: what shape is this? daben\nPrompt: what shape is this? daben\n\n",
        "New Fact: what shape is this? daben\nPrompt: which shape is shown? daben\n\n",
        "New Fact: what shape is this? daben\nPrompt: what colour is this? red\n\n",
        "New Fact: what is this called? fesak\nPrompt: what is this called? fesak\n\n",
        "New Fact: what is this called? fesak\nPrompt: what do people call this? fesak\n\n",
        "New Fact: what is this called? fesak\nPrompt: what shape is this? star\n\n",
    ]


# ---------------------------------------------------------------- retrieval
small_ints = st.integers(-2, 2)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(small_ints, min_size=3, max_size=3), min_size=1, max_size=9),
    query=st.lists(small_ints, min_size=3, max_size=3),
    k=st.integers(0, 11),
)
def test_nearest_is_the_brute_force_order(rows, query, k):
    """Descending dot product, a tie to the earlier row (small integers: ties are common)."""
    dots = [sum(a * b for a, b in zip(row, query)) for row in rows]
    expected = sorted(range(len(rows)), key=lambda i: (-dots[i], i))[:k]
    got = ike.nearest(torch.tensor(rows, dtype=torch.float), torch.tensor(query).float(), k)
    assert got == expected


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=7, max_size=7), min_size=1, max_size=4),
    copies=st.lists(st.integers(0, 3), min_size=2, max_size=14),
    query=st.lists(st.integers(1, 3), min_size=7, max_size=7),
)
def test_equal_unit_rows_tie_in_row_order(rows, copies, query):
    """Unit vectors, as the retrievers give them: equal rows are a tie wherever they stand in the
    store (a matrix product may round one row of a block differently from the same row in its
    tail)."""
    store = torch.nn.functional.normalize(torch.tensor(rows).float() + 0.1, dim=-1)
    picks = [c % len(rows) for c in copies]
    q = torch.nn.functional.normalize(torch.tensor(query).float(), dim=-1)
    got = ike.nearest(store[picks], q, len(picks))
    for a, b in zip(got, got[1:]):
        if picks[a] == picks[b]:
            assert a < b, (picks, got)


def test_word_counts_and_nearest_golden(tiny):
    counts = ike.WordCounts(tiny.tokenizer)
    v = counts.embed(["red red blue"])  # (1, V)
    red = tiny.token_ids("red")[0]
    blue = tiny.token_ids("blue")[0]
    assert v.shape == (1, len(tiny.tokenizer))
    torch.testing.assert_close(v[0, red], torch.tensor(2 / math.sqrt(5)))
    torch.testing.assert_close(v[0, blue], torch.tensor(1 / math.sqrt(5)))
    assert v[0].count_nonzero() == 2
    # cos with (2, 1)/sqrt 5: "red blue" and "blue red" 3/sqrt 10 (a tie: the earlier first),
    # "red red blue" 1, "green" 0
    store = counts.embed(["red blue", "green", "red red blue", "blue red"])
    assert ike.nearest(store, v[0], 4) == [2, 0, 3, 1]
    assert ike.nearest(store, v[0], 2) == [2, 0]


def cosine_order(backbone, store, text):
    """The store's indices by cosine of word counts with ``text``, in plain Python."""
    seen = Counter(backbone.token_ids(text))

    def cos(other):
        c = Counter(backbone.token_ids(other))
        dot = sum(n * c[w] for w, n in seen.items())
        norms = math.sqrt(sum(n * n for n in seen.values()) * sum(n * n for n in c.values()))
        return round(dot / norms, 9)

    return sorted(range(len(store)), key=lambda i: (-cos(store[i]), i))


def test_an_edit_is_the_k_nearest_then_its_own_copy(grown, records):
    r = records[0]  # what do we call this thing? -> fesak
    editor = ike.IKE(grown, SMALL_STORE, k=3)
    report = editor.edit(r)
    own = D(r.question, r.target, r.question, r.target)
    # the same question 2 (= 5: the earlier first), then the update asking it, then the retain
    assert cosine_order(grown, SMALL_STORE, own)[:3] == [2, 5, 3]
    demos = [SMALL_STORE[2], SMALL_STORE[5], SMALL_STORE[3], own]
    assert (report.index, len(editor)) == (0, 1)
    assert editor.edits[0][1] == demos
    assert editor.prefix(r) == ike.in_context(demos, r.question, r.target, "")
    assert editor.prefix(records[1]) == ""
    assert editor.store == [*SMALL_STORE, own]  # the facts edited so far join the store
    torch.testing.assert_close(editor.keys, editor.retriever.embed(editor.store))
    editor.edit(r)  # again: its first edit's copy, nearest of all, states (t, y^n): passed over
    assert editor.edits[1][1] == demos
    assert editor.store == [*SMALL_STORE, own, own]


def test_the_store_holds_the_facts_edited_so_far_and_remove_takes_them_out(grown, records):
    editor = ike.IKE(grown, SMALL_STORE, k=3)
    keys = editor.keys.clone()
    first = records[1]  # what shape do you see? -> daben
    same = records[3]  # the same fact, on another image
    assert (first.question, first.target) == (same.question, same.target)
    own = D(first.question, first.target, first.question, first.target)
    editor.edit(first)
    editor.edit(same)
    assert own not in editor.edits[1][1][:-1]  # the same fact's copy states its I-Gen probe
    assert editor.store == [*SMALL_STORE, own, own]
    editor.remove(0)
    assert editor.prefix(first) == ""
    assert editor.store == [*SMALL_STORE, own]
    editor.remove(0)
    assert (len(editor), editor.store) == (0, SMALL_STORE)
    assert torch.equal(editor.keys, keys)

    other = records[0]
    editor.edit(other)
    editor.edit(first)
    editor.remove(0)  # the first edit's copy leaves, wherever it stands
    assert editor.prefix(other) == ""
    assert editor.prefix(first).endswith(f"New Fact: {first.question} {first.target}\nPrompt: ")
    assert editor.store == [*SMALL_STORE, own]
    torch.testing.assert_close(editor.keys, editor.retriever.embed(editor.store))
    with pytest.raises(IndexError):
        editor.remove(1)


def scored_lines(record) -> list[str]:
    """The text that would give a T-Gen or I-Gen probe away: the probe answered y^n, or the fact
    told through it."""
    y = record.target
    lines = [f"Prompt: {x} {y}\n" for x in (*record.rephrases, record.question)]
    return lines + [f"New Fact: {x} {y}\n" for x in record.rephrases]


def test_no_scored_probe_is_ever_a_demonstration(grown, records, world_store):
    editor = ike.IKE(grown, world_store)
    for r in records:
        editor.edit(r)
        demos = editor.edits[-1][1]
        assert demos[-1] == D(r.question, r.target, r.question, r.target)
        for line in scored_lines(r):
            assert not any(line in d for d in demos[:-1]), (r.id, line)
            assert line not in editor.prefix(r).rsplit("New Fact: ", 2)[0], (r.id, line)
        editor.remove(0)
    assert editor.store == world_store


def test_a_store_that_holds_a_scored_probe_never_gives_it(grown, records, world_store):
    """The nearest rows of this store are the record's T-Gen probes and its fact asked of
    another image (I-Gen) answered y^n: retrieval passes them over for the others."""
    r = records[0]
    y = r.target
    given_away = [D(x, y, x, y) for x in r.rephrases] + [D(r.question, y, r.question, y)]
    editor = ike.IKE(grown, given_away + world_store)
    editor.edit(r)
    demos = editor.edits[-1][1]
    assert len(demos) == editor.k + 1
    assert not set(demos[:-1]) & set(given_away)
    plain = ike.IKE(grown, world_store)
    plain.edit(r)
    assert demos == plain.edits[-1][1]  # the store without them retrieves the same


def test_a_context_too_long_is_refused_naming_the_record(grown, records, world_store):
    editor = ike.IKE(grown, world_store, k=30)
    keys = editor.keys.clone()
    r = records[2]
    with pytest.raises(ValueError, match=f"IKE, record {r.id}: .* positions") as e:
        editor.edit(r)
    assert "\n" not in str(e.value)
    assert (len(editor), editor.store) == (0, world_store)
    assert torch.equal(editor.keys, keys)
    assert editor.prefix(r) == ""


def test_the_refusal_is_exact(tiny, grown, records, world_store):
    """A model with exactly the positions the longest probe needs, with the prefix and the
    tokens generated after it, scores the edit; one position fewer refuses it."""
    r = records[0]
    editor = ike.IKE(grown, world_store)
    editor.edit(r)
    prefix = editor.prefix(r)
    probes = [r.question, *r.rephrases]
    probes += [s.question for s in (*r.locality, *r.q_locality, *r.m_locality)]
    longest = max(len(grown.prompt_ids(models.PROMPT.format(prefix + x))) for x in probes)
    need = grown.n_image_tokens + longest + grown.max_new_tokens
    fits = ike.IKE(tiny.grown(need, ike.FORMAT_WORDS).eval(), world_store)
    fits.edit(r)
    assert fits.prefix(r) == prefix
    evaluate.observe(fits.backbone, r, prefix=prefix)  # every probe encodes, none is cut
    short = ike.IKE(tiny.grown(need - 1, ike.FORMAT_WORDS).eval(), world_store)
    with pytest.raises(ValueError, match=f"needs {need} positions; the model has {need - 1}"):
        short.edit(r)


def test_encode_refuses_a_question_too_long(grown, records):
    r = records[0]
    long = " ".join([r.question] * 40)
    with pytest.raises(ValueError, match="positions"):
        grown.encode([r.image], [long], [r.target])
    with pytest.raises(ValueError, match="positions"):
        grown.generate([r.image], [long])


# ---------------------------------------------------------------- the training stream
FAMILIES = {
    "shape": ["what shape is this?", "which shape is shown?"],
    "colour": ["what colour is this?", "what hue is this object?"],
    "name": ["what is this called?", "what do people call this?"],
}
FAMILY = {q: f for f, qs in FAMILIES.items() for q in qs}
WORDS = {"shape": ["circle", "square"], "colour": ["red", "blue"], "name": ["daben", "fesak"]}
WORDS["count"] = ["two", "three"]  # a family no fact asks: its questions only ever ignore one
FACTS = ike.Facts(FAMILIES, lambda q: FAMILY.get(q, "count"), WORDS)


def hand_made_stream(n: int) -> list[Sample]:
    rng = random.Random(5)
    questions = [*FAMILY, "how many objects are there?"]  # the last one of no family
    return [
        Sample(i, rng.choice(questions), rng.choice(["circle", "red", "lapux"])) for i in range(n)
    ]


def test_the_stream_tells_a_fact_that_answers_only_its_own_family():
    stream = hand_made_stream(400)
    out = list(ike.context_stream(iter(stream), FACTS, share=1.0, seed=3))
    assert len(out) == len(stream)
    told = 0
    kept = 0
    n_demos = Counter()
    for s, o in zip(stream, out):
        assert o.image == s.image
        assert o.question.startswith("New Fact: ")
        assert o.question.endswith("Prompt: " + s.question)
        n_demos[o.question.count("New Fact:") - 1] += 1
        fact = o.question.rsplit("New Fact: ", 1)[1].split("\n")[0]
        q, a = fact.rsplit(" ", 1)
        assert q in FAMILY and a in WORDS[FACTS.family_of(s.question)]  # it could answer s
        if FAMILY[q] == FACTS.family_of(s.question):
            assert o.answer == a
            told += 1
        else:
            assert o.answer == s.answer
            kept += 1
    assert told > 100 and kept > 100, (told, kept)
    assert set(n_demos) == set(range(ike.MAX_DEMONSTRATIONS + 1)), n_demos
    again = list(ike.context_stream(iter(stream), FACTS, share=1.0, seed=3))
    assert [o.question for o in again] == [o.question for o in out]


def test_the_project_worlds_stream_is_the_one_its_shipped_model_learnt_from():
    """`python train.py --from FIRST` remakes assets/tinyvlm only while the mixture draws the
    same samples: a golden digest of its first 2,000, as the shipped model saw them."""
    share = train.CONTEXT_SHARE
    stream = ike.context_stream(
        world.training_stream(0), world.facts(), share, 0, train.CONTEXT_RELEVANT
    )
    text = "".join(f"{s.question}|{s.answer}\n" for _, s in zip(range(2000), stream))
    digest = "1e51e52a02464bca11f6eae78d768fede19db837abefb4605602817cfc65c06f"
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_the_stream_without_share_is_unchanged():
    stream = hand_made_stream(50)
    out = list(ike.context_stream(iter(stream), FACTS, share=0.0, seed=3))
    assert len(out) == len(stream) and all(o is s for o, s in zip(out, stream))


# ---------------------------------------------------------------- the grown TinyVLM
def test_grown_keeps_the_old_model_and_adds_the_words(tiny, grown):
    old = tiny.tokenizer.get_vocab()
    new = grown.tokenizer.get_vocab()
    assert all(new[w] == i for w, i in old.items())
    assert {"New", "Fact", "Prompt"} <= set(new) - set(old)
    ids = grown.token_ids("New Fact: daben Prompt:")
    assert len(ids) == 6 and grown.tokenizer.unk_token_id not in ids
    assert (grown.max_positions, tiny.max_positions) == (192, 64)
    samples = data.load_sample(limit=4)
    images = [s.image for s in samples]
    questions = [q for s in samples for q in (s.question, s.rephrases[0])]
    images = [s.image for s in samples for _ in range(2)]
    assert grown.generate(images, questions) == tiny.generate(images, questions)
    batch = tiny.encode(images, questions, [s.target for s in samples for _ in range(2)])
    with torch.no_grad():
        before = tiny(**batch).logits  # (B, T, V)
        after = grown(**batch).logits  # (B, T, V + 3)
    torch.testing.assert_close(after[..., : len(old)], before)


# ---------------------------------------------------------------- the sentence encoder
def tiny_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "new", "fact", "prompt", ":", "what"]
    words += ["shape", "is", "this", "?", "circle", "daben", "colour"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def test_the_sentence_encoder_reads_a_local_folder(tmp_path):
    tiny_bert(tmp_path / "bert")
    encoder = ike.SentenceEncoder(tmp_path / "bert")
    texts = ["New Fact: what shape is this? daben", "what colour is this?", "circle"]
    v = encoder.embed([*texts, texts[0]])
    assert v.shape == (4, 32)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(v[0], v[3])
    assert not torch.allclose(v[0], v[1])
    torch.testing.assert_close(encoder.embed(texts[2:])[0], v[2])  # padding changes nothing

    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{not json")
    for folder in (tmp_path / "empty", tmp_path / "garbage", tmp_path / "missing"):
        with pytest.raises(ValueError, match=f"--retriever {folder}: ") as e:
            ike.SentenceEncoder(folder)
        assert "\n" not in str(e.value)


def test_the_command_line_refuses_a_missing_retriever_in_one_line(tmp_path):
    missing = tmp_path / "minilm"
    out = tmp_path / "runs" / "x.json"
    command = [sys.executable, "evaluate.py", "--methods", "ike", "--retriever", str(missing)]
    command += ["--limit", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--retriever {missing}" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no journal, no folder made for them


# ---------------------------------------------------------------- under the protocols
def test_ike_under_both_protocols(grown, records, monkeypatch):
    seen = []
    observe = evaluate.observe

    def spy(backbone, record, batch_size=32, prefix=""):
        seen.append((record.id, prefix))
        return observe(backbone, record, batch_size, prefix)

    monkeypatch.setattr(evaluate, "observe", spy)
    three = records[:3]
    editor = ike.IKE(grown, SMALL_STORE)
    for run in (evaluate.run_single, evaluate.run_sequential):
        seen.clear()
        result = run(editor, grown, three, progress=False)
        assert result["n_records"] == 3
        for key in ("acc", "t_gen", "loc"):
            assert 0 <= result[key] <= 100, (key, result)
        told = {i: p for i, p in seen if p}
        assert sorted(told) == [r.id for r in three]
        for r in three:
            assert told[r.id].endswith(f"New Fact: {r.question} {r.target}\nPrompt: ")
        assert (len(editor), editor.store) == (0, SMALL_STORE)


def test_the_shipped_model_reads_a_fact_in_its_prompt():
    """TinyVLM's second stage: on held-out images, a fact in the prompt answers the rephrased
    question (the first-stage model answered 0 of these), and a fact about another question
    leaves most answers as they were (the model shipped before it, which copied every fact,
    kept 0 of these). Measured: 83.0 and 73.75 on the 40 records."""
    reading = ike.reading(models.TinyVLM.from_pretrained(), data.load_sample())
    assert reading["follows"] >= 80 and reading["ignores"] >= 70
