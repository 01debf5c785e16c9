"""The world of world.py: determinism, the train/eval split, and well-formed edit records."""

import hashlib
import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import world

seeds = st.integers(0, 2**31 - 1)


def _digest(image):
    return hashlib.sha1(image.tobytes()).hexdigest()


@settings(max_examples=5, deadline=None)
@given(seeds)
def test_records_are_deterministic_per_seed(seed):
    assert world.make_records(seed, n=4) == world.make_records(seed, n=4)


def test_different_seeds_give_different_records():
    assert world.make_records(1, n=4) != world.make_records(2, n=4)


@settings(max_examples=200, deadline=None)
@given(seeds, st.integers(14, 21))
def test_centre_parity_splits_train_from_eval(seed, r):
    lo = world.SIZE // 2 - world.JITTER
    hi = world.SIZE // 2 + world.JITTER
    assert lo - r >= 0 and hi + r < world.SIZE  # the object stays inside the image
    cx, cy = world.centre(random.Random(seed), r, "train")
    assert (cx + cy) % 2 == 0 and lo <= cx <= hi and lo <= cy <= hi
    cx, cy = world.centre(random.Random(seed), r, "eval")
    assert (cx + cy) % 2 == 1 and lo <= cx <= hi and lo <= cy <= hi


@settings(max_examples=3, deadline=None)
@given(seeds, seeds)
def test_training_stream_never_produces_an_evaluation_rendering(train_seed, eval_seed):
    evaluation = set()
    for r in world.make_records(eval_seed, n=6):
        for image in [r.image, *r.rephrase_images, *(s.image for s in r.locality + r.m_locality)]:
            evaluation.add(_digest(image))
    training = {_digest(s.image) for s in itertools.islice(world.training_stream(train_seed), 500)}
    training -= {_digest(data.anchor_image(k, world.SIZE)) for k in world.ANCHOR_ANSWERS}
    assert not training & evaluation


@settings(max_examples=5, deadline=None)
@given(seeds)
def test_records_are_well_formed(seed):
    records = world.make_records(seed, n=8)
    assert (
        [r.category for r in records].count("kind")
        == [r.category for r in records].count("shape")
        == 4
    )
    for r in records:
        assert len(r.rephrases) >= 5 and len(r.train_rephrases) >= 2 and len(r.rephrase_images) >= 5
        assert len(r.locality) >= 3 and len(r.m_locality) >= 2
        assert not set(r.rephrases) & set(r.train_rephrases)  # scoring vs training rephrasings
        assert r.question not in r.rephrases + r.train_rephrases
        family = world.FAMILY_OF[r.question]
        assert all(world.FAMILY_OF[q] == family for q in r.rephrases + r.train_rephrases)
        assert r.target in world.NEW_WORDS and r.answer != r.target
        for s in r.locality:  # near misses: outside the scope
            assert s.question == r.question and s.answer != r.answer
        assert all(world.FAMILY_OF[s.question] != family for s in r.m_locality)


@settings(max_examples=5, deadline=None)
@given(seeds)
def test_records_can_all_be_applied_at_once(seed):
    """Sequential consistency: one answer -> one target, and no locality sample is edited."""
    records = world.make_records(seed, n=40)
    target_of = {}
    edited = set()
    for r in records:
        key = (world.FAMILY_OF[r.question], r.answer)
        assert target_of.setdefault(key, r.target) == r.target
        edited.add(key)
    for r in records:
        for s in r.locality + r.m_locality:
            assert (world.FAMILY_OF[s.question], s.answer) not in edited


def test_every_family_has_enough_paraphrases_and_anchors_have_answers():
    for family, questions in world.QUESTIONS.items():
        assert len(set(questions)) == len(questions) >= 8
        for anchor in ("black", "white"):
            assert world.ANCHOR_ANSWERS[anchor][family]
    assert set(world.rephrasings("what shape is this?")) == set(world.QUESTIONS["shape"]) - {
        "what shape is this?"
    }


def test_vocabulary_covers_every_word_of_the_world():
    vocab = set(world.vocabulary())
    for r in world.make_records(0, n=10):
        for text in [r.question, r.answer, r.target, *r.rephrases, *(s.answer for s in r.locality)]:
            assert set(re.findall(r"\w+|[^\w\s]", text)) <= vocab


def test_shipped_sample_is_the_committed_seed(tmp_path):
    """assets/okedit_tiny is `make-sample --seed SAMPLE_SEED`, byte for byte."""
    world.make_sample(world.SAMPLE_SEED, tmp_path)
    shipped = sorted(
        p.relative_to(data.SAMPLE_DIR) for p in data.SAMPLE_DIR.rglob("*") if p.is_file()
    )
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == made
    for rel in shipped:
        assert (data.SAMPLE_DIR / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert data.load_sample() == world.make_records(world.SAMPLE_SEED)


def test_many_records_for_long_sequential_runs():
    # more kind edits than there are new words: targets repeat
    records = world.make_records(0, n=130)
    assert len(records) == 130 and len({r.id for r in records}) == 130
    assert all(r.target in world.NEW_WORDS and r.target != r.answer for r in records)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_make_sample_counts_only_the_files_it_wrote(tmp_path, capsys):
    """A smaller sample written over a bigger one reports this run's files; the rest stay as
    they were."""
    world.main(["make-sample", "-n", "2", "--out", str(tmp_path / "small")])
    small = _files(tmp_path / "small")
    assert (
        f"wrote 2 records, {len(small)} files, {sum(map(len, small.values()))} bytes"
        in capsys.readouterr().out
    )
    world.main(["make-sample", "-n", "4", "--out", str(tmp_path / "big")])
    big = _files(tmp_path / "big")
    capsys.readouterr()
    world.main(["make-sample", "-n", "2", "--out", str(tmp_path / "big")])
    out = capsys.readouterr().out
    assert f"wrote 2 records, {len(small)} files, {sum(map(len, small.values()))} bytes" in out, out
    assert f"({len(big) - len(small)} other files already there were left as they were)" in out, out
    after = _files(tmp_path / "big")
    assert after == {**big, **small}  # nothing lost: the bigger sample's other files are untouched
    assert data.load_okedit(tmp_path / "big") == world.make_records(world.SAMPLE_SEED, n=2)


def test_make_sample_claims_its_folder_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        world.main(["make-sample", "--out", "/proc/x/sample"])
    assert e.value.code == 2
    assert "cannot write there" in capsys.readouterr().err
