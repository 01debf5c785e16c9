"""Writes EditRecords in the authors' layouts (OKEDIT, MMEdit's E-VQA), so that generated
records (the world's sample, easy-VQA's records) are read by the same loaders as the authors'
files. Every run writes byte-identical files, and ``load_x(write_x(records)) == records``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

from data import (
    ANNOTATION_FILES,
    LOCALITY_DIR,
    QUESTION_FILES,
    REPHRASE_DIR,
    DataError,
    EditRecord,
    is_int,
)


def _save_png(image: Image.Image, path: Path) -> Path:
    """Save with fixed options and no metadata, so reruns are byte-identical."""
    if not isinstance(image, Image.Image):
        raise DataError(f"{path}: cannot write {type(image).__name__} as an image")
    rgb = image.convert("RGB")
    rgb.info = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(path, format="PNG", compress_level=6)
    return path


def _write_json(data: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _check_owned_dir(folder: Path, names: set[str], rid: str, field: str) -> None:
    """Refuse to write into a per-record folder holding files we would not write:
    the loader reads every file there, so stale files would change the dataset."""
    if folder.is_dir():
        stale = sorted(p.name for p in folder.iterdir() if p.name not in names)
        if stale:
            raise DataError(
                f"{folder}: record {rid}: field '{field}': folder already holds "
                f"files this write would not produce ({', '.join(stale[:5])}); "
                f"write into an empty directory"
            )


def _okedit_checks(r: EditRecord, seen: set[str]) -> None:
    """Refuse a record that OKEDIT cannot hold, naming its field."""
    if not (isinstance(r.id, str) and re.fullmatch(r"-?[0-9]+", r.id) and str(int(r.id)) == r.id):
        raise DataError(
            f"write_okedit: record {r.id!r}: field 'id' must be an int-like string "
            f"such as '17' (OKEDIT's question_id is an int)"
        )
    if r.id in seen:
        raise DataError(f"write_okedit: record {r.id}: field 'id' is duplicated")
    for name, items in (("rephrase_images", r.rephrase_images), ("locality", r.locality)):
        if not items:
            raise DataError(
                f"write_okedit: record {r.id}: field '{name}' is empty; OKEDIT needs at least one"
            )
    for name, samples in (("locality", r.locality), ("m_locality", r.m_locality)):
        if any(s.image is None for s in samples):
            raise DataError(
                f"write_okedit: record {r.id}: field '{name}' has a text-only "
                f"sample; OKEDIT stores an image for each"
            )


def write_okedit(
    records: list[EditRecord],
    out_dir: Union[str, os.PathLike],
    image_ids: Optional[list[int]] = None,
) -> list[Path]:
    """Write records as the authors release OKEDIT, with our extensions where a record needs
    them; load_okedit reads them back equal. Images are lossless PNGs:
    val2014/COCO_val2014_{image_id:012d}.png, rephrased_images/{qid}/{k}.png,
    locality_images_dalle2/{qid}/{k}.png and m_loc/{qid}/{k}.png. Deterministic; returns the
    paths written. image_id defaults to 1..N in order; ids must be int-like strings."""
    out = Path(out_dir)
    if image_ids is None:
        image_ids = list(range(1, len(records) + 1))
    if (
        len(image_ids) != len(records)
        or len(set(image_ids)) != len(image_ids)
        or not all(is_int(x) and x >= 0 for x in image_ids)
    ):
        raise DataError(
            f"write_okedit: image_ids must be {len(records)} distinct non-negative ints"
        )
    annotations = []
    questions = []
    seen: set[str] = set()
    written = []
    for r, image_id in zip(records, image_ids):
        _okedit_checks(r, seen)
        seen.add(r.id)
        image = r.image  # each read decodes: read once
        rephrase_images = r.rephrase_images
        written += _save_okedit_images(r, image, rephrase_images, image_id, out)
        own = [im.tobytes() for im in [image, *rephrase_images]]  # what image_index counts
        annotations.append(_okedit_annotation(r, image_id, own))
        questions.append(_okedit_question(r, image_id))
    written.append(_write_json({"annotations": annotations}, out / ANNOTATION_FILES[0]))
    written.append(_write_json({"questions": questions}, out / QUESTION_FILES[0]))
    return written


def _m_loc_path(rid: str, k: int) -> str:
    """Where an OKEDIT record's k-th m_loc image is written, relative to the data folder."""
    return f"m_loc/{rid}/{k}.png"


def _save_okedit_images(
    r: EditRecord,
    image: Image.Image,
    rephrase_images: list[Image.Image],
    image_id: int,
    out: Path,
) -> list[Path]:
    """Write a record's images (decoded once: image, rephrase_images) where load_okedit looks
    for them; returns the paths written, in order."""
    stem = out / "val2014" / f"COCO_val2014_{image_id:012d}"
    if stem.with_suffix(".jpg").exists():  # the loader would read it instead
        raise DataError(
            f"{stem.with_suffix('.jpg')}: record {r.id}: field 'image': a stale "
            f".jpg would shadow the .png written here; write into an empty directory"
        )
    written = [_save_png(image, stem.with_suffix(".png"))]
    width = len(str(len(rephrase_images) - 1))  # 0-9, or 00-11: name order = list order
    rep_names = [f"{k:0{width}d}.png" for k in range(len(rephrase_images))]
    rdir = out / REPHRASE_DIR / r.id
    _check_owned_dir(rdir, set(rep_names), r.id, "rephrase_images")
    for name, im in zip(rep_names, rephrase_images):
        written.append(_save_png(im, rdir / name))
    for k, s in enumerate(r.locality):
        written.append(_save_png(s.image, out / LOCALITY_DIR / r.id / f"{k}.png"))
    for k, s in enumerate(r.m_locality):
        written.append(_save_png(s.image, out / _m_loc_path(r.id, k)))
    return written


def _okedit_annotation(r: EditRecord, image_id: int, own: list[bytes]) -> dict:
    """A record's entry of the annotations file; `own` holds the pixels of its images, which
    q_locality's image_index counts."""
    m_loc = []
    for k, s in enumerate(r.m_locality):
        m_loc.append({"image": _m_loc_path(r.id, k), "question": s.question, "answer": s.answer})
    q_loc = []
    for k, s in enumerate(r.q_locality):
        if s.image is None or s.image.tobytes() not in own:
            raise DataError(
                f"write_okedit: record {r.id}: field 'q_locality' item {k}: its image must be "
                f"the record's image or one of its rephrase images"
            )
        index = own.index(s.image.tobytes())
        q_loc.append({"image_index": index, "question": s.question, "answer": s.answer})
    ann = {
        "question_id": int(r.id),
        "image_id": image_id,
        "answers": [{"answer": r.answer}],  # VQA's form
        "counterfact_answer": r.target,
    }
    loc_answers = [s.answer for s in r.locality]  # one: the authors' form, a string
    ann["locality_answer"] = loc_answers[0] if len(loc_answers) == 1 else loc_answers
    if any(s.question != r.question for s in r.locality):
        ann["locality_questions"] = [s.question for s in r.locality]
    optional = {
        "counterfact_type": r.category,
        "locality_answer_train": r.negative_answer,
        "m_loc": m_loc,
        "q_locality": q_loc,
    }
    ann.update({k: v for k, v in optional.items() if v})
    return ann


def _okedit_question(r: EditRecord, image_id: int) -> dict:
    """A record's entry of the questions file."""
    q = {
        "question_id": int(r.id),
        "image_id": image_id,
        "question": r.question,
        "rephrased_questions": list(r.rephrases),
    }
    if r.train_rephrases:
        q["rephrased_questions_train"] = list(r.train_rephrases)
    return q


def write_mmedit(
    records: list[EditRecord],
    json_path: Union[str, os.PathLike],
    image_root: Union[str, os.PathLike],
) -> None:
    """Write records of MMEdit's shape as E-VQA json + PNGs named {i}.png,
    {i}_rephrase.png, {i}_m_loc.png under image_root (the coco and the rephrase root). Raises
    rather than drop anything E-VQA cannot hold (ids other than list positions, category,
    more than one rephrase / rephrase image / locality / m_loc)."""
    path = Path(json_path)
    image_root = Path(image_root)
    items = []
    for i, r in enumerate(records):
        shape = {
            "id": r.id == str(i),
            "rephrases": len(r.rephrases) == 1,
            "rephrase_images": len(r.rephrase_images) == 1,
            "locality": len(r.locality) == 1 and r.locality[0].image is None,
            "m_locality": len(r.m_locality) == 1 and r.m_locality[0].image is not None,
            "category": r.category == "",
            "q_locality": not r.q_locality,
        }
        bad = [k for k, ok in shape.items() if not ok]
        if bad:
            raise DataError(
                f"write_mmedit: record {r.id}: field '{bad[0]}' does not fit MMEdit's shape "
                f"(id = list position '{i}', exactly one rephrase, one rephrase image, one "
                f"text-only locality, one m_loc with an image, no category, no q_locality)"
            )
        names = {
            "image": f"{i}.png",
            "image_rephrase": f"{i}_rephrase.png",
            "m_loc": f"{i}_m_loc.png",
        }
        _save_png(r.image, image_root / names["image"])
        _save_png(r.rephrase_images[0], image_root / names["image_rephrase"])
        _save_png(r.m_locality[0].image, image_root / names["m_loc"])
        item = {
            "src": r.question,
            "pred": r.answer,
            "rephrase": r.rephrases[0],
            "alt": r.target,
            "loc": r.locality[0].question,
            "loc_ans": r.locality[0].answer,
            "m_loc_q": r.m_locality[0].question,
            "m_loc_a": r.m_locality[0].answer,
            **names,
        }
        if r.train_rephrases:
            item["rephrased_questions_train"] = list(r.train_rephrases)
        if r.negative_answer:
            item["locality_answer_train"] = r.negative_answer
        items.append(item)
    _write_json(items, path)
