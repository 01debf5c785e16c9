"""Tests for data.py: anchor images, exact round trips of both layouts,
deterministic writing, and a clear DataError for each sort of bad input."""

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data import (
    ANNOTATION_FILES,
    LOCALITY_DIR,
    QUESTION_FILES,
    REPHRASE_DIR,
    DataError,
    EditRecord,
    Sample,
    anchor_image,
    load_mmedit,
    load_okedit,
)
from writers import write_mmedit, write_okedit

ANN = ANNOTATION_FILES[0]
QUE = QUESTION_FILES[0]

# -----------------------------------------------------------------------------
# helpers

_rng = np.random.default_rng(0)


def rand_image(w=8, h=6):
    return Image.fromarray(_rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")


def okedit_record(i, n_rephrase_images=2, n_loc=2, n_m_loc=1, text="x"):
    return EditRecord(
        id=str(i),
        image=rand_image(),
        question=f"q{i} {text}?",
        answer=f"old{i}",
        target=f"new{i}",
        rephrases=[f"r{i}a {text}", f"r{i}b"],
        train_rephrases=[f"t{i}"] if i % 2 else [],
        rephrase_images=[rand_image() for _ in range(n_rephrase_images)],
        locality=[Sample(rand_image(), f"lq{i}{k}", f"la{i}{k}") for k in range(n_loc)],
        m_locality=[Sample(rand_image(), f"mq{i}{k}", f"ma{i}{k}") for k in range(n_m_loc)],
        category=f"cat{i % 2}" if i % 3 else "",
        negative_answer=f"neg{i}" if i % 4 else "",
    )


def mmedit_record(i, text="x"):
    return EditRecord(
        id=str(i),
        image=rand_image(),
        question=f"src{i} {text}",
        answer=f"pred{i}",
        target=f"alt{i}",
        rephrases=[f"reph{i}"],
        train_rephrases=[],
        rephrase_images=[rand_image()],
        locality=[Sample(None, f"loc{i}", f"locans{i}")],
        m_locality=[Sample(rand_image(), f"mlq{i}", f"mla{i}")],
        negative_answer=f"neg{i}" if i % 2 else "",
    )


def all_files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit_json(path, fn):
    data = json.loads(path.read_text())
    data = fn(data)
    path.write_text(json.dumps(data))


def edit_annotations(folder, fn):
    """Apply fn to the list of an OKEDIT folder's annotations."""
    edit_json(folder / ANN, lambda d: {**d, "annotations": fn(d["annotations"])})


def in_memory(records):
    """The records with every image decoded now: loaded records read their files when asked."""

    def now(samples):
        return [Sample(s.image, s.question, s.answer) for s in samples]

    return [
        replace(
            r,
            locality=now(r.locality),
            m_locality=now(r.m_locality),
            q_locality=now(r.q_locality),
        )  # replace reads image and rephrase_images
        for r in records
    ]


def assert_error(fn, *parts):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


@pytest.fixture
def okedit_dir(tmp_path):
    write_okedit([okedit_record(17), okedit_record(23)], tmp_path / "ok")
    return tmp_path / "ok"


@pytest.fixture
def mmedit_dir(tmp_path):
    write_mmedit(
        [mmedit_record(0), mmedit_record(1)],
        tmp_path / "mm" / "e-vqa.json",
        tmp_path / "mm" / "img",
    )
    return tmp_path / "mm"


def load_mm(d):
    return load_mmedit(d / "e-vqa.json", d / "img")


# -----------------------------------------------------------------------------
# anchors


def test_anchor_black_white():
    assert (np.asarray(anchor_image("black")) == 0).all()
    assert (np.asarray(anchor_image("white")) == 255).all()
    assert anchor_image("black").mode == "RGB"


def test_anchor_noise_deterministic_per_seed():
    a = anchor_image("noise", seed=1)
    b = anchor_image("noise", seed=1)
    c = anchor_image("noise", seed=2)
    assert a == b
    assert a != c
    arr = np.asarray(a)
    assert arr.min() < 30 and arr.max() > 225  # spread over the range, not constant


def test_anchor_sizes():
    assert anchor_image("white").size == (64, 64)
    assert anchor_image("black", size=10).size == (10, 10)
    assert anchor_image("noise", size=(12, 5)).size == (12, 5)
    assert np.asarray(anchor_image("noise", size=(12, 5))).shape == (5, 12, 3)


def test_anchor_unknown_name():
    with pytest.raises(ValueError, match="black, white, noise"):
        anchor_image("grey")


# -----------------------------------------------------------------------------
# round trips

safe_text = st.text(alphabet="abcXYZ 019?é'\"", min_size=1, max_size=8).filter(lambda s: s.strip())


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(0, 3),
    n_rep=st.integers(1, 11),
    n_loc=st.integers(1, 3),
    n_m=st.integers(0, 2),
    text=safe_text,
)
def test_okedit_round_trip(n, n_rep, n_loc, n_m, text):
    records = [okedit_record(i * 7, n_rep, n_loc, n_m, text) for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        write_okedit(records, d)
        loaded = load_okedit(d)
        assert loaded == records  # while the files are there: records hold their paths
    assert [r.id for r in loaded] == [str(i * 7) for i in range(n)]


def test_okedit_round_trip_detects_pixel_change(okedit_dir):
    records = load_okedit(okedit_dir)
    other = [okedit_record(17), okedit_record(23)]
    assert records != other  # different random pixels: equality really compares images


def test_okedit_rephrase_images_sorted_by_name(tmp_path):
    """The loader sorts a folder's names as the authors' code does (10.png before 2.png); the
    writer pads its names (00.png to 11.png) so that the order survives a round trip."""
    r = okedit_record(5, n_rephrase_images=12)
    write_okedit([r], tmp_path)
    assert sorted(p.name for p in (tmp_path / REPHRASE_DIR / "5").iterdir())[:2] == [
        "00.png",
        "01.png",
    ]
    assert load_okedit(tmp_path)[0].rephrase_images == r.rephrase_images
    folder = tmp_path / REPHRASE_DIR / "5"
    for k, p in enumerate(sorted(folder.iterdir())):
        p.rename(folder / f"{k}.png")  # the authors' names, unpadded
    order = sorted(range(12), key=lambda k: f"{k}.png")  # 0, 1, 10, 11, 2, ...
    assert order[:4] == [0, 1, 10, 11]
    assert load_okedit(tmp_path)[0].rephrase_images == [r.rephrase_images[k] for k in order]


def test_okedit_limit_and_custom_roots(okedit_dir, tmp_path):
    assert [r.id for r in load_okedit(okedit_dir, limit=1)] == ["17"]
    records = in_memory(load_okedit(okedit_dir))
    for name in ("val2014", REPHRASE_DIR, LOCALITY_DIR):
        (tmp_path / name).mkdir()
        (okedit_dir / name).rename(tmp_path / name / name)
    roots = {
        "coco_root": tmp_path / "val2014",
        "rephrase_root": tmp_path / REPHRASE_DIR / REPHRASE_DIR,
        "locality_root": tmp_path / LOCALITY_DIR / LOCALITY_DIR,
    }
    assert load_okedit(okedit_dir, **roots) == records
    assert_error(lambda: load_okedit(okedit_dir), "val2014", "record 17", "not found")


def test_okedit_file_names_without_train(okedit_dir):
    records = load_okedit(okedit_dir)
    (okedit_dir / ANN).rename(okedit_dir / ANNOTATION_FILES[1])
    (okedit_dir / QUE).rename(okedit_dir / QUESTION_FILES[1])
    assert load_okedit(okedit_dir) == records


def test_okedit_authors_form(okedit_dir):
    """A jpg image, VQA's answers (the first is y^o), a plain-string locality_answer asked of
    0.png with the edit's question (the folder's other images are not read), the fields the
    project does not use."""
    rec = in_memory(load_okedit(okedit_dir))[0]
    png = okedit_dir / "val2014" / "COCO_val2014_000000000001.png"
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
    png.unlink()
    (okedit_dir / LOCALITY_DIR / "17" / "1.png").write_text("not read")

    def authors(anns):
        a = anns[0]
        a["answers"] = [{"answer": "old17", "answer_id": 1}, {"answer": "other"}]
        a["locality_answer"] = "la170"
        del a["locality_questions"], a["m_loc"], a["counterfact_type"]
        a["image_object"] = "cat"
        a["locality_image_object"] = "dog"
        a["question_type"] = "what is"
        a["counterfact_type_reason"] = "[text based], because"
        return anns

    edit_annotations(okedit_dir, authors)
    got = load_okedit(okedit_dir)[0]
    assert (got.answer, got.target, got.category, got.m_locality) == ("old17", "new17", "", [])
    assert got.locality == [Sample(rec.locality[0].image, rec.question, "la170")]
    assert got.image.size == rec.image.size and got.image.mode == "RGB" and got.image.info == {}


def test_okedit_skips_an_empty_counterfact_answer_and_keeps_given_types(okedit_dir):
    def two_types(anns):
        anns[0]["counterfact_type"] = "text based"
        anns[1]["counterfact_type"] = "image-text based"
        return anns

    edit_annotations(okedit_dir, two_types)
    skipped = {}
    assert [r.id for r in load_okedit(okedit_dir, types=["text based"], skipped=skipped)] == ["17"]
    assert skipped == {"counterfact_type not kept": 1}
    edit_annotations(okedit_dir, lambda anns: [{**anns[0], "counterfact_answer": ""}, anns[1]])
    skipped = {}
    assert [r.id for r in load_okedit(okedit_dir, skipped=skipped)] == ["23"]
    assert skipped == {"empty counterfact_answer": 1}
    assert_error(
        lambda: load_okedit(okedit_dir, types=["text"]),
        ANN,
        "no annotation has a counterfact_type in ['text']",
        "'image-text based', 'text based'",
    )


def test_okedit_limit_counts_records_and_reads_nothing_after_them(okedit_dir):
    """A skipped annotation does not count; one after the limit is not read (record 99 has no
    question and no images)."""
    edit_annotations(
        okedit_dir,
        lambda anns: [
            {**anns[0], "counterfact_answer": ""},
            anns[1],
            {**anns[1], "question_id": 99},
        ],
    )
    assert [r.id for r in load_okedit(okedit_dir, limit=1)] == ["23"]
    assert_error(lambda: load_okedit(okedit_dir), "record 99", "'question_id'")


def test_loading_decodes_no_image(okedit_dir, mmedit_dir, monkeypatch):
    """Records hold image files; pixels are decoded when a field is read, and a truncated file
    fails then, naming the file, the record and the field."""
    path = okedit_dir / REPHRASE_DIR / "23" / "1.png"
    path.write_bytes(path.read_bytes()[:60])

    def no_decoding(self):
        raise AssertionError("decoded at load time")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "load", no_decoding)
        m.setattr(Image.Image, "verify", no_decoding)
        records = load_okedit(okedit_dir) + load_mm(mmedit_dir)
    assert len(records) == 4
    assert records[0].rephrase_images[0].size == (8, 6)
    assert_error(
        lambda: records[1].rephrase_images,
        str(path),
        "record 23",
        "'rephrase_images'",
        "cannot read image",
    )


def test_a_read_image_is_a_copy_of_its_own(okedit_dir):
    record = load_okedit(okedit_dir)[0]
    first = record.image
    first.paste((0, 0, 0), (0, 0, 8, 6))
    assert record.image != first and record.image == load_okedit(okedit_dir)[0].image


def test_mmedit_round_trip():
    for n in (0, 1, 3):
        records = [mmedit_record(i, text="é ok") for i in range(n)]
        with tempfile.TemporaryDirectory() as d:
            write_mmedit(records, Path(d) / "e.json", Path(d) / "img")
            assert load_mmedit(Path(d) / "e.json", Path(d) / "img") == records
            assert len(load_mmedit(Path(d) / "e.json", Path(d) / "img", limit=1)) == min(n, 1)


def test_write_twice_byte_identical(tmp_path):
    ok = [okedit_record(3), okedit_record(4)]
    mm = [mmedit_record(0), mmedit_record(1)]
    for name in ("a", "b"):
        write_okedit(ok, tmp_path / name / "ok")
        write_mmedit(mm, tmp_path / name / "mm" / "e.json", tmp_path / name / "mm" / "img")
    write_okedit(ok, tmp_path / "a" / "ok")  # rewriting in place is allowed and changes nothing
    a = all_files(tmp_path / "a")
    b = all_files(tmp_path / "b")
    assert a == b and len(a) > 10


def test_write_okedit_rejects_unloadable_records(tmp_path):
    assert_error(
        lambda: write_okedit([replace(okedit_record(1), id="a1")], tmp_path), "'id'", "int-like"
    )
    assert_error(
        lambda: write_okedit([replace(okedit_record(1), id="01")], tmp_path), "'id'", "int-like"
    )
    r = okedit_record(1)
    r.locality = []
    assert_error(lambda: write_okedit([r], tmp_path / "x"), "record 1", "'locality'")
    assert_error(
        lambda: write_okedit([okedit_record(1), okedit_record(1)], tmp_path / "y"), "duplicated"
    )


def test_write_okedit_refuses_stale_files(okedit_dir):
    (okedit_dir / REPHRASE_DIR / "17" / "zz.png").write_bytes(b"")
    assert_error(
        lambda: write_okedit([okedit_record(17)], okedit_dir), REPHRASE_DIR, "record 17", "zz.png"
    )


def test_write_mmedit_rejects_other_shapes(tmp_path):
    assert_error(
        lambda: write_mmedit([okedit_record(0)], tmp_path / "e.json", tmp_path), "record 0"
    )
    r = mmedit_record(0)
    r.category = "c"
    assert_error(lambda: write_mmedit([r], tmp_path / "e.json", tmp_path), "'category'")
    assert_error(lambda: write_mmedit([mmedit_record(5)], tmp_path / "e.json", tmp_path), "'id'")


# -----------------------------------------------------------------------------
# bad input, OKEDIT


def test_okedit_missing_annotations_file(okedit_dir):
    (okedit_dir / ANN).unlink()
    assert_error(lambda: load_okedit(okedit_dir), ANN, ANNOTATION_FILES[1], "not found")


def test_okedit_missing_image(okedit_dir):
    (okedit_dir / "val2014" / "COCO_val2014_000000000002.png").unlink()
    assert_error(
        lambda: load_okedit(okedit_dir),
        "COCO_val2014_000000000002.jpg",
        "COCO_val2014_000000000002.png",
        "record 23",
        "'image'",
        "not found",
    )


def test_okedit_missing_field(okedit_dir):
    edit_annotations(
        okedit_dir,
        lambda a: [a[0], {k: v for k, v in a[1].items() if k != "counterfact_answer"}],
    )
    assert_error(
        lambda: load_okedit(okedit_dir), ANN, "record 23", "'counterfact_answer'", "missing"
    )


def test_okedit_missing_question_field(okedit_dir):
    def drop(q):
        del q["questions"][0]["rephrased_questions"]
        return q

    edit_json(okedit_dir / QUE, drop)
    assert_error(
        lambda: load_okedit(okedit_dir), QUE, "record 17", "'rephrased_questions'", "missing"
    )


def test_okedit_blank_field(okedit_dir):
    """Only "" is the authors' mark of a missing counterfactual; blanks are an error."""

    def blank(a):
        a[0]["counterfact_answer"] = "  "
        return a

    edit_annotations(okedit_dir, blank)
    assert_error(lambda: load_okedit(okedit_dir), ANN, "record 17", "'counterfact_answer'", "empty")


@pytest.mark.parametrize(
    "value, says",
    [
        (5, "should be a list of objects, got int"),
        (["old"], "should be a list of objects, got list of str"),
        ([], "is empty"),
    ],
)
def test_okedit_answers_are_vqa_objects(okedit_dir, value, says):
    def bad(a):
        a[1]["answers"] = value
        return a

    edit_annotations(okedit_dir, bad)
    assert_error(lambda: load_okedit(okedit_dir), ANN, "record 23", "'answers'", says)
    edit_annotations(okedit_dir, lambda a: [a[0], {**a[1], "answers": [{"answer_id": 1}]}])
    assert_error(lambda: load_okedit(okedit_dir), "record 23 (answers item 0)", "'answer'")


def test_okedit_top_level_wrong_type(okedit_dir):
    (okedit_dir / ANN).write_text("[1]")
    assert_error(lambda: load_okedit(okedit_dir), ANN, "top level", "an object", "list")
    (okedit_dir / ANN).write_text('{"questions": []}')
    assert_error(lambda: load_okedit(okedit_dir), ANN, "'annotations'", "missing")


def test_okedit_invalid_json(okedit_dir):
    (okedit_dir / QUE).write_text('{"questions": [')
    assert_error(lambda: load_okedit(okedit_dir), QUE, "invalid JSON")


def test_okedit_not_an_image(okedit_dir):
    path = okedit_dir / LOCALITY_DIR / "17" / "0.png"
    path.write_text("hello")
    record = load_okedit(okedit_dir)[0]
    assert_error(
        lambda: record.locality[0].image, str(path), "record 17", "'locality'", "cannot read image"
    )


def test_okedit_question_id_not_in_questions(okedit_dir):
    edit_json(okedit_dir / QUE, lambda q: {"questions": q["questions"][:1]})
    assert_error(lambda: load_okedit(okedit_dir), ANN, "record 23", "'question_id'", QUE)


def test_okedit_missing_rephrase_dir(okedit_dir):
    shutil.rmtree(okedit_dir / REPHRASE_DIR / "17")
    assert_error(
        lambda: load_okedit(okedit_dir), REPHRASE_DIR, "record 17", "'rephrase_images'", "not found"
    )


def test_okedit_zero_locality_images(okedit_dir):
    def none(a):
        a[0]["locality_answer"] = []
        a[0]["locality_questions"] = []
        return a

    edit_annotations(okedit_dir, none)
    assert_error(lambda: load_okedit(okedit_dir), ANN, "record 17", "'locality_answer'", "empty")


def test_okedit_missing_locality_image(okedit_dir):
    (okedit_dir / LOCALITY_DIR / "23" / "1.png").unlink()
    assert_error(lambda: load_okedit(okedit_dir), "1.png", "record 23", "'locality'", "not found")


def test_okedit_locality_counts_disagree(okedit_dir):
    def more(a):
        a[0]["locality_questions"] = ["y"]
        return a

    edit_annotations(okedit_dir, more)
    assert_error(
        lambda: load_okedit(okedit_dir),
        ANN,
        "record 17",
        "'locality_questions' has 1 items but 'locality_answer' has 2",
    )


# -----------------------------------------------------------------------------
# bad input, MMEdit


def test_mmedit_missing_json(tmp_path):
    assert_error(lambda: load_mmedit(tmp_path / "nope.json", tmp_path), "nope.json", "not found")


def test_mmedit_missing_image(mmedit_dir):
    (mmedit_dir / "img" / "1_rephrase.png").unlink()
    assert_error(
        lambda: load_mm(mmedit_dir), "1_rephrase.png", "record 1", "'image_rephrase'", "not found"
    )


def test_mmedit_missing_field(mmedit_dir):
    def drop(items):
        del items[1]["alt"]
        return items

    edit_json(mmedit_dir / "e-vqa.json", drop)
    assert_error(lambda: load_mm(mmedit_dir), "e-vqa.json", "record 1", "'alt'", "missing")


def test_mmedit_empty_field(mmedit_dir):
    def empty(items):
        items[0]["loc_ans"] = ""
        return items

    edit_json(mmedit_dir / "e-vqa.json", empty)
    assert_error(lambda: load_mm(mmedit_dir), "e-vqa.json", "record 0", "'loc_ans'", "empty")


def test_mmedit_wrong_type(mmedit_dir):
    def bad(items):
        items[0]["rephrase"] = ["a", "b"]
        return items

    edit_json(mmedit_dir / "e-vqa.json", bad)
    assert_error(
        lambda: load_mm(mmedit_dir),
        "e-vqa.json",
        "record 0",
        "'rephrase'",
        "should be a string, got list of str",
    )


def test_mmedit_top_level_wrong_type(mmedit_dir):
    (mmedit_dir / "e-vqa.json").write_text('{"src": "q"}')
    assert_error(lambda: load_mm(mmedit_dir), "e-vqa.json", "top level", "dict")


def test_mmedit_record_wrong_type(mmedit_dir):
    (mmedit_dir / "e-vqa.json").write_text("[3]")
    assert_error(lambda: load_mm(mmedit_dir), "e-vqa.json", "record 0", "object", "int")


def test_mmedit_invalid_json(mmedit_dir):
    (mmedit_dir / "e-vqa.json").write_text('[{"src": }]')
    assert_error(lambda: load_mm(mmedit_dir), "e-vqa.json", "invalid JSON", "line 1")


def test_mmedit_truncated_image(mmedit_dir):
    path = mmedit_dir / "img" / "0_m_loc.png"
    path.write_bytes(path.read_bytes()[:-20])
    record = load_mm(mmedit_dir)[0]  # found, decoded when read
    assert_error(
        lambda: record.m_locality[0].image, "0_m_loc.png", "record 0", "'m_loc'", "cannot read"
    )


def test_mmedit_authors_fields_and_skips(mmedit_dir):
    """rephrased_questions_train are the positives, locality_answer_train the answer on Neg; a
    record whose alt is "" is skipped (ids stay list positions); image_rephrase may live under
    its own root."""

    def authors(items):
        items[0]["rephrased_questions_train"] = ["t0 a", "t0 b", "t0 c"]
        items[0]["locality_answer_train"] = "3"
        return [{**items[0], "alt": ""}, *items]

    edit_json(mmedit_dir / "e-vqa.json", authors)
    skipped = {}
    records = in_memory(load_mmedit(mmedit_dir / "e-vqa.json", mmedit_dir / "img", skipped=skipped))
    assert skipped == {"empty alt": 1} and [r.id for r in records] == ["1", "2"]
    assert records[0].train_rephrases == ["t0 a", "t0 b", "t0 c"]
    assert records[0].negative_answer == "3" and records[1].negative_answer == "neg1"
    (mmedit_dir / "rep").mkdir()
    for name in ("0_rephrase.png", "1_rephrase.png"):
        (mmedit_dir / "img" / name).rename(mmedit_dir / "rep" / name)
    assert_error(lambda: load_mm(mmedit_dir), "0_rephrase.png", "record 1", "not found")
    moved = load_mmedit(mmedit_dir / "e-vqa.json", mmedit_dir / "img", mmedit_dir / "rep")
    assert moved == records


# -----------------------------------------------------------------------------
# paths from a data file stay inside their data root


@pytest.mark.parametrize("qid", ["../outside", "..\\outside", "17/../../outside", "/tmp/outside"])
def test_okedit_question_id_cannot_leave_the_data_folder(okedit_dir, qid):
    shutil.copytree(okedit_dir / REPHRASE_DIR / "17", okedit_dir / "outside")  # loadable if reached
    edit_annotations(
        okedit_dir,
        lambda anns: [{**a, "question_id": qid} if a["question_id"] == 17 else a for a in anns],
    )
    edit_json(
        okedit_dir / QUE,
        lambda d: {
            "questions": [
                {**q, "question_id": qid} if q["question_id"] == 17 else q for q in d["questions"]
            ]
        },
    )
    before = all_files(okedit_dir)
    assert_error(
        lambda: load_okedit(okedit_dir),
        ANN,
        f"record {qid}",
        "'question_id'",
        "inside",
        repr(qid),
    )
    assert all_files(okedit_dir) == before


@pytest.mark.parametrize(
    "where",
    [
        "../outside.png",
        "m_loc/../../outside.png",
        "ABSOLUTE",
        "C:\\outside.png",
        "\\\\server\\share\\outside.png",
    ],
)
def test_okedit_m_loc_cannot_leave_the_data_folder(okedit_dir, where):
    outside = okedit_dir.parent / "outside.png"
    rand_image().save(outside)  # a real image: only the path check stops the load
    where = str(outside) if where == "ABSOLUTE" else where

    def point(anns):
        anns[1]["m_loc"][0]["image"] = where
        return anns

    edit_annotations(okedit_dir, point)
    before = all_files(okedit_dir.parent)
    assert_error(
        lambda: load_okedit(okedit_dir),
        ANN,
        "record 23 (m_loc item 0)",
        "'image'",
        "inside",
        repr(where),
    )
    assert all_files(okedit_dir.parent) == before


@pytest.mark.parametrize("field", ["image", "image_rephrase", "m_loc"])
@pytest.mark.parametrize("where", ["../outside.png", "ABSOLUTE", "img/../../outside.png"])
def test_mmedit_image_paths_cannot_leave_the_image_root(mmedit_dir, field, where):
    outside = mmedit_dir / "outside.png"
    rand_image().save(outside)
    where = str(outside) if where == "ABSOLUTE" else where

    def point(items):
        items[1][field] = where
        return items

    edit_json(mmedit_dir / "e-vqa.json", point)
    before = all_files(mmedit_dir)
    assert_error(
        lambda: load_mm(mmedit_dir), "e-vqa.json", "record 1", f"'{field}'", "inside", repr(where)
    )
    assert all_files(mmedit_dir) == before


def test_symlinks_inside_the_data_folder_are_followed(okedit_dir, tmp_path):
    """A folder linked into the dataset (say a shared val2014) is the folder owner's choice."""
    records = load_okedit(okedit_dir)
    (okedit_dir / "val2014").rename(tmp_path / "shared")
    (okedit_dir / "val2014").symlink_to(tmp_path / "shared", target_is_directory=True)
    assert load_okedit(okedit_dir) == records


# -----------------------------------------------------------------------------
# image modes: 16-bit grey and transparency


def load_as_rephrase_image(okedit_dir, image, **save):
    """Save `image` as record 17's first rephrase image and load it back through the loader."""
    image.save(okedit_dir / REPHRASE_DIR / "17" / "0.png", **save)
    before = all_files(okedit_dir)
    got = load_okedit(okedit_dir)[0].rephrase_images[0]
    assert all_files(okedit_dir) == before
    assert got.mode == "RGB" and got.info == {}
    return np.asarray(got)


def test_sixteen_bit_grey_scales_to_8_bits(okedit_dir):
    v = np.array([[0, 128, 129, 257, 32768, 65279, 65535]], dtype=np.uint16)
    want = np.round(v / 257).astype(np.uint8)
    assert want.tolist() == [[0, 0, 1, 1, 128, 254, 255]]
    # a 16-bit PNG opens as "I;16" (as "I" in older Pillow, which cannot write "I" as PNG:
    # TIFF then)
    for image, fmt in ((Image.fromarray(v), "PNG"), (Image.fromarray(v.astype(np.int32)), "TIFF")):
        got = load_as_rephrase_image(okedit_dir, image, format=fmt)
        assert (got == want[..., None]).all(), (image.mode, got[..., 0])


def test_transparent_images_are_composited_onto_white(okedit_dir):
    rgba = Image.fromarray(
        np.array([[[200, 0, 0, 255], [0, 0, 200, 0], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA"
    )
    got = load_as_rephrase_image(okedit_dir, rgba)
    assert got[0, :2].tolist() == [[200, 0, 0], [255, 255, 255]]
    assert np.abs(got[0, 2].astype(int) - 127).max() <= 1  # half black over white
    la = Image.fromarray(np.array([[[30, 255], [30, 0]]], dtype=np.uint8), "LA")
    assert load_as_rephrase_image(okedit_dir, la)[0].tolist() == [[30, 30, 30], [255, 255, 255]]
    p = Image.new("P", (2, 1))
    p.putpalette([200, 0, 0, 0, 0, 200])
    p.putpixel((1, 0), 1)
    assert load_as_rephrase_image(okedit_dir, p, transparency=1)[0].tolist() == [
        [200, 0, 0],
        [255, 255, 255],
    ]
    grey = Image.fromarray(np.array([[10, 20]], dtype=np.uint8), "L")
    assert load_as_rephrase_image(okedit_dir, grey, transparency=10)[0].tolist() == [
        [255] * 3,
        [20] * 3,
    ]
    g16 = Image.fromarray(np.array([[0, 65535, 257]], dtype=np.uint16))
    assert load_as_rephrase_image(okedit_dir, g16, transparency=0)[0].tolist() == [
        [255] * 3,
        [255] * 3,
        [1] * 3,
    ]


def test_opaque_images_load_as_before(okedit_dir):
    rgb = rand_image()
    grey = rand_image().convert("L")
    p = rand_image().convert("P")
    for image in (rgb, grey, p):
        assert (
            load_as_rephrase_image(okedit_dir, image) == np.asarray(image.convert("RGB"))
        ).all(), image.mode


def test_q_locality_round_trips_and_asks_the_records_own_images(tmp_path):
    r = okedit_record(3)
    r.q_locality = [
        Sample(r.image, "what colour?", "red"),
        Sample(r.rephrase_images[1], "what shape?", "star"),
    ]
    write_okedit([r], tmp_path / "ok")
    back = load_okedit(tmp_path / "ok")[0]
    assert back.q_locality == r.q_locality
    item = json.loads((tmp_path / "ok" / ANN).read_text())["annotations"][0]["q_locality"]
    assert [q["image_index"] for q in item] == [0, 2]  # the edit image, rephrase image 1
    edit_annotations(
        tmp_path / "ok", lambda a: [{**a[0], "q_locality": [{**item[0], "image_index": 3}]}]
    )
    assert_error(
        lambda: load_okedit(tmp_path / "ok"),
        "record 3 (q_locality item 0)",
        "'image_index'",
        "0..2, got 3",
    )
    r.q_locality = [Sample(rand_image(), "what colour?", "red")]  # not one of the record's images
    assert_error(lambda: write_okedit([r], tmp_path / "bad"), "record 3", "q_locality")
    assert not (tmp_path / "bad" / ANN).exists()
