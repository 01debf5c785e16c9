"""The paper's data as the authors release it: OKEDIT and E-VQA folders built here in their exact
schema (our own text and images), every field checked where Eq. 3-7 use it, and the command line
run on them end to end with a tiny random BLIP-2 saved to disk."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import balancedit as be
import blip2
import cli
import data
import evaluate
import world
import writers

CF_TYPES = ("image-text based", "text based")
EMPTY = 2  # the annotation (and E-VQA record) whose counterfactual is ""


def _image(rng: np.random.Generator, path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)  # .jpg or .png by the name, as the authors'


def _text(i: int) -> dict:
    """Record i's words, all from the world's vocabulary so that the test backbones spell them."""
    r = random.Random(i)
    kind = world.KINDS[i % len(world.KINDS)]
    questions = r.sample(world.QUESTIONS["name"], 6)
    near = r.choice([k for k in world.KINDS if k != kind])
    return {
        "question": questions[0],
        "rephrases": questions[1:3],
        "train": questions[3:6],
        "answer": world.KIND_NAMES[kind],
        "target": world.NEW_WORDS[i % len(world.NEW_WORDS)],
        "loc_answer": world.KIND_NAMES[near],
        "object": " ".join(kind[::-1]),
        "near": " ".join(near[::-1]),
    }


def authors_okedit(folder: Path, n: int = 6, images: int = 10) -> dict:
    """OKEDIT as the authors' loader reads it: their two VQA-API files in vqautils/, the COCO
    images under EasyEdit/val2014/, and `images` rephrase (.jpg) and locality (DALL-E's .png)
    images per question under VQA/. Annotation EMPTY has counterfact_answer ""; the
    counterfact_types alternate; the last record has no rephrased_questions_train. Returns
    the options that point the command line at it."""
    rng = np.random.default_rng(0)
    roots = {
        "--data": folder / "vqautils",
        "--coco-root": folder / "EasyEdit",
        "--rephrase-root": folder / "VQA" / "rephrased_images",
        "--locality-root": folder / "VQA" / "locality_images_dalle2",
    }
    annotations = []
    questions = []
    for i in range(n):
        t = _text(i)
        image_id = 297147 + i
        qid = image_id * 1000 + 3  # VQA's question ids
        _image(rng, roots["--coco-root"] / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        for k in range(images):
            _image(rng, roots["--rephrase-root"] / str(qid) / f"{k}.jpg")
            _image(rng, roots["--locality-root"] / str(qid) / f"{k}.png")
        ann = {
            "question_id": qid,
            "image_id": image_id,
            "question_type": "what is the",
            "answer_type": "other",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                for k, a in enumerate([t["answer"], t["loc_answer"], t["answer"]])
            ],
            "counterfact_answer": "" if i == EMPTY else t["target"],
            "counterfact_type": CF_TYPES[i % 2],
            "counterfact_type_reason": f"[{CF_TYPES[i % 2]}], because the name changes",
            "image_object": t["object"],
            "locality_answer": t["loc_answer"],
            "locality_image_object": t["near"],
        }
        if i % 2:
            ann["locality_answer_train"] = t["loc_answer"]
        annotations.append(ann)
        q = {
            "question_id": qid,
            "image_id": image_id,
            "question": t["question"],
            "rephrased_questions": t["rephrases"],
        }
        if i < n - 1:
            q["rephrased_questions_train"] = t["train"]
        questions.append(q)
    info = {"info": {"description": "ours"}, "license": {"name": "ours"}, "data_subtype": "val2014"}
    vqautils = roots["--data"]
    vqautils.mkdir(parents=True)
    ann_file = {**info, "annotations": annotations}
    q_file = {**info, "task_type": "Open-Ended", "questions": questions}
    (vqautils / data.ANNOTATION_FILES[0]).write_text(json.dumps(ann_file, indent=4))
    (vqautils / data.QUESTION_FILES[0]).write_text(json.dumps(q_file, indent=4))
    return roots


def authors_evqa(folder: Path, n: int = 6) -> dict:
    """MMEdit's E-VQA with the authors' fields (their vqa_eval.json: 13 fields a record), the
    images under coco/ as MMEdit ships them. Record EMPTY has alt ""."""
    rng = np.random.default_rng(1)
    coco = folder / "coco"
    items = []
    for i in range(n):
        t = _text(i)
        name = f"COCO_val2014_{451435 + i:012d}"
        m_name = f"COCO_val2014_{297147 + i:012d}"
        item = {
            "src": t["question"],
            "pred": t["answer"],
            "rephrase": t["rephrases"][0],
            "alt": "" if i == EMPTY else t["target"],
            "image": f"val2014/{name}.jpg",
            "image_rephrase": f"val2014_image_rephrase/{451435 + i}003_{name}.png",
            "loc": "nq question: what colour is this?",
            "loc_ans": "red",
            "m_loc": f"val2014/{m_name}.jpg",
            "m_loc_q": "what shape is this?",
            "m_loc_a": "circle",
            "rephrased_questions_train": t["train"],
            "locality_answer_train": t["loc_answer"],
        }
        for key in ("image", "image_rephrase", "m_loc"):
            _image(rng, coco / item[key])
        items.append(item)
    (folder / "vqa_eval.json").write_text(json.dumps(items, indent=1))
    return {"--data": folder / "vqa_eval.json", "--coco-root": coco}


def _decoded(path: Path) -> Image.Image:
    return data.ImageFile(path, "?", "?").decode()


def test_okedit_fields_land_where_the_equations_use_them(tmp_path, tiny):
    roots = authors_okedit(tmp_path)
    skipped = {}
    records = data.load_okedit(
        roots["--data"],
        roots["--coco-root"],
        roots["--rephrase-root"],
        roots["--locality-root"],
        skipped=skipped,
    )
    anns = json.loads((roots["--data"] / data.ANNOTATION_FILES[0]).read_text())["annotations"]
    qs = json.loads((roots["--data"] / data.QUESTION_FILES[0]).read_text())["questions"]
    kept = [i for i in range(len(anns)) if i != EMPTY]
    assert skipped == {data.EMPTY_TARGET: 1} and len(records) == len(kept)
    editor = be.BalancEditor(tiny, be.BalancEditConfig())
    for r, i in zip(records, kept):
        ann = anns[i]
        q = qs[i]
        qid = str(ann["question_id"])
        coco = roots["--coco-root"] / "val2014" / f"COCO_val2014_{ann['image_id']:012d}.jpg"
        rephrase_files = sorted((roots["--rephrase-root"] / qid).iterdir())
        assert len(rephrase_files) == 10
        loc_image = _decoded(roots["--locality-root"] / qid / "0.png")
        assert r.id == qid and r.category == ann["counterfact_type"]
        assert r.negative_answer == ann.get("locality_answer_train", "")
        parts = evaluate.probes(r)
        y = ann["counterfact_answer"]
        assert parts["acc"] == [data.Sample(_decoded(coco), q["question"], y)]  # Eq. 4
        assert parts["t_gen"] == [  # Eq. 5
            data.Sample(_decoded(coco), p, y) for p in q["rephrased_questions"]
        ]
        assert parts["i_gen"] == [  # Eq. 6
            data.Sample(_decoded(p), q["question"], y) for p in rephrase_files
        ]
        assert parts["loc"] == [  # Eq. 7: 0.png of the ten, asked the edit's question
            data.Sample(loc_image, q["question"], ann["locality_answer"])
        ]
        assert r.answer == ann["answers"][0]["answer"]  # y^o
        if "rephrased_questions_train" in q:  # Eq. 3's positive: the authors' first
            assert r.train_rephrases == q["rephrased_questions_train"]
            assert editor.positive_question(r) == q["rephrased_questions_train"][0]
        else:  # the backbone's own, never a T-Gen rephrasing
            assert r.train_rephrases == [] and editor.positive_question(r) not in r.rephrases


def test_okedit_keeps_given_counterfact_types(tmp_path):
    roots = authors_okedit(tmp_path)
    folders = (roots["--coco-root"], roots["--rephrase-root"], roots["--locality-root"])
    kinds = {  # annotations 0, 2, 4 are of the first type (2 has no counterfactual), 1, 3, 5 not
        CF_TYPES[0]: (2, {data.OTHER_TYPE: 3, data.EMPTY_TARGET: 1}),
        CF_TYPES[1]: (3, {data.OTHER_TYPE: 3}),
    }
    for kept, (n, why) in kinds.items():
        skipped = {}
        records = data.load_okedit(roots["--data"], *folders, types=[kept], skipped=skipped)
        assert {r.category for r in records} == {kept} and len(records) == n and skipped == why


def test_evqa_fields_land_where_the_equations_use_them(tmp_path, tiny):
    roots = authors_evqa(tmp_path)
    items = json.loads(roots["--data"].read_text())
    skipped = {}
    records = data.load_mmedit(roots["--data"], roots["--coco-root"], skipped=skipped)
    assert skipped == {data.EMPTY_ALT: 1} and [r.id for r in records] == ["0", "1", "3", "4", "5"]
    editor = be.BalancEditor(tiny, be.BalancEditConfig())
    for r in records:
        item = items[int(r.id)]
        coco = roots["--coco-root"]
        parts = evaluate.probes(r)
        y = item["alt"]
        assert parts["acc"] == [data.Sample(_decoded(coco / item["image"]), item["src"], y)]
        assert parts["t_gen"] == [data.Sample(_decoded(coco / item["image"]), item["rephrase"], y)]
        assert parts["i_gen"] == [
            data.Sample(_decoded(coco / item["image_rephrase"]), item["src"], y)
        ]
        assert parts["loc"] == [data.Sample(None, item["loc"], item["loc_ans"])]
        assert parts["m_loc"] == [
            data.Sample(_decoded(coco / item["m_loc"]), item["m_loc_q"], item["m_loc_a"])
        ]
        assert r.answer == item["pred"] and r.negative_answer == item["locality_answer_train"]
        assert editor.positive_question(r) == item["rephrased_questions_train"][0]  # Eq. 3


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """A tiny random BLIP-2 OPT of the real model's depth (32 layers, so that the authors' layer
    31 exists), saved to disk as a downloaded one would be."""
    folder = tmp_path_factory.mktemp("blip2")
    model = blip2.random_blip2(layers=32)
    model.model.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    return folder


def _run(options: dict, *more: str, out: Path) -> dict:
    argv = ["--backbone", "blip2", "--no-progress", "--out", str(out), *more]
    for flag, value in options.items():
        argv += [flag, str(value)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def test_the_command_line_runs_the_authors_okedit(tmp_path, blip2_dir, capsys):
    roots = authors_okedit(tmp_path / "okedit", n=3)
    options = {**roots, "--model": blip2_dir, "--steps": 2, "--methods": "balancedit"}
    result = _run(options, "--preset", "blip2", out=tmp_path / "r.json")
    printed = capsys.readouterr().out
    assert (
        f"--data {roots['--data']}: records read: 2; skipped: 1 (empty counterfact_answer)"
        in printed
    )
    assert result["methods"]["balancedit"]["n_records"] == 2
    cfg = result["config"]
    assert (cfg["layer"], cfg["distance"], cfg["alpha"]) == (cli.BLIP2_LAYER, "cos", 0.05)
    assert (cfg["lr"], cfg["steps"]) == (1e-4, 2)  # the preset's lr; --steps overrides it
    kept = {**options, "--counterfact-types": "text based", "--methods": "ft"}
    result = _run(kept, "--protocol", "sequential", out=tmp_path / "s.json")
    assert "records read: 1; skipped: 2 (counterfact_type not kept)" in capsys.readouterr().out
    assert result["methods"]["ft"]["n_records"] == 1


def test_the_command_line_runs_the_authors_evqa(tmp_path, blip2_dir, capsys):
    roots = authors_evqa(tmp_path / "evqa", n=4)
    options = {**roots, "--model": blip2_dir, "--steps": 2, "--methods": "balancedit"}
    result = _run(options, "--preset", "blip2_cos", "--limit", "1", out=tmp_path / "r.json")
    assert "records read: 1; skipped: none" in capsys.readouterr().out  # the limit comes first
    assert result["methods"]["balancedit"]["n_records"] == 1 and result["config"]["alpha"] == 0.1


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--data", "EVQA"], "needs --coco-root DIR"),
        (["--data", "EVQA", "--coco-root", "COCO", "--locality-root", "COCO"], "OKEDIT's"),
        (["--data", "EVQA", "--coco-root", "NOWHERE"], "--coco-root NOWHERE: no such folder"),
        (["--data", "OKEDIT", "--counterfact-types", "text"], "no annotation has a counterfact"),
        (["--data", "OKEDIT", "--preset", "minigpt4"], "for --backbone minigpt4, not tiny"),
        (["--coco-root", "COCO"], "--coco-root needs --data"),
    ],
)
def test_the_command_line_refuses_bad_data_options_in_one_line(tmp_path, argv, says, capsys):
    names = {
        "EVQA": str(authors_evqa(tmp_path / "e", n=3)["--data"]),
        "COCO": str(tmp_path / "e" / "coco"),
        "OKEDIT": str(tmp_path / "o"),
        "NOWHERE": str(tmp_path / "nowhere"),
    }
    writers.write_okedit(world.make_records(0, n=2), tmp_path / "o")
    argv = [names.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--no-progress", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert says.replace("NOWHERE", names["NOWHERE"]) in err
    assert not (tmp_path / "r.json").exists()
