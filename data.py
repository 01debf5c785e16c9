"""The data that edits are made and scored on: edit records, the paper's two dataset
loaders, anchor images, and the tiny world behind TinyVLM and the shipped sample.

The paper (Guo et al., ICML 2025) evaluates on OKEDIT, its own benchmark, and on
MMEdit's E-VQA; both are read here into one structure, `EditRecord`, which carries
everything the metrics of the paper's Appendix C need:

    question, image, answer -> target   the edit, y^o -> y^n     (Acc, Eq. 4)
    rephrases                           unseen paraphrases       (T-Gen, Eq. 5)
    rephrase_images                     other images, same scope (I-Gen, Eq. 6)
    locality                            similar but out of scope (Loc, Eq. 7)
    train_rephrases                     positives for the radius (Eq. 3)
    m_locality                          unrelated samples (MMEdit's m_loc)
    q_locality                          the edit's own images, asked the other question
                                        families: an edit must not change them (q_loc)

`anchor_image` makes the black / white / noise negative anchor images of the
paper's Table 7 ablation.

The world (bottom of the file) is a tiny, fully known visual domain that
generates both TinyVLM's endless training stream and the shipped tiny OKEDIT
sample (`python data.py make-sample --seed 0 --out assets/okedit_tiny`).

Layouts, as the authors release them (their loaders: donglgcn/EasyEdit, branch MMOKVQA,
easyeditor/dataset/okvqa.py and vqa.py):

    OKEDIT  mscoco_val2014_annotations_train.json     {"annotations": [...]}, VQA's form
            OpenEnded_mscoco_val2014_questions_train.json   {"questions": [...]}
            (or the same names without _train), and three image roots:
            {coco}/val2014/COCO_val2014_{image_id:012d}.jpg (or lossless .png)
            {rephrase}/{question_id}/*                  every file, sorted by name
            {locality}/{question_id}/0.png              asked the edit's question
            Our extensions, optional fields of the same files: several locality probes
            (locality_answer a list, locality_questions), m_loc (images relative to the
            data folder) and q_locality (the record's own images by index).
    MMEdit  E-VQA: one json list of {src, pred, rephrase, alt, image, image_rephrase,
            loc, loc_ans, m_loc, m_loc_q, m_loc_a}, image paths relative to a root, and the
            authors' rephrased_questions_train and locality_answer_train.

Records hold image files, decoded when read (`ImageFile`). Bad input gets a `DataError`
naming the file, the record and the field; the only records skipped are those the authors'
loaders skip (an empty target), and they are counted. Writers produce byte-identical files
on every run, and `load_x(write_x(records)) == records`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator, NamedTuple, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# records


@dataclass(eq=False)  # hashed by identity: a key of _recent
class ImageFile:
    """An image file of a dataset, found at load time and decoded when read, so that loaded
    records hold paths: the authors' E-VQA file alone names 6,279 COCO-sized images."""

    path: Path
    record: str  # for the error message: the record and the field that name the file
    field: str

    def decode(self) -> Image.Image:
        """The pixels, a copy of its own for each caller; the last RECENT files decoded are
        kept, as a protocol reads a record's images many times (about 30 on the sample)."""
        image = _recent.pop(self, None)
        if image is None:
            image = _open_image(self.path, self.record, self.field)
        _recent[self] = image  # now the newest
        if len(_recent) > RECENT:
            _recent.popitem(last=False)  # drop the oldest
        return image.copy()


RECENT = 32  # about two OKEDIT records' images
_recent: OrderedDict[ImageFile, Image.Image] = OrderedDict()


class Decoded:
    """A dataclass field of images (one, a list, or None), stored as given: PIL images or
    ImageFiles. Reading it gives PIL images, decoding the files then (ImageFile.decode keeps
    only the last few), so `record.image.size` works either way. It gives the field no
    default: the field stays required."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.stored = "_" + name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:  # the class asks for a default: there is none, the field is required
            raise AttributeError(self.stored)
        value = getattr(obj, self.stored)
        if isinstance(value, list):
            return [v.decode() if isinstance(v, ImageFile) else v for v in value]
        return value.decode() if isinstance(value, ImageFile) else value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.stored, value)


@dataclass
class Sample:
    """One scored (image, question, answer) triple; image None = text-only."""

    image: Optional[Image.Image] = Decoded()  # required; Decoded says how it is read
    question: str
    answer: str


@dataclass
class EditRecord:
    """One edit and everything needed to score it; its images may be files (ImageFile),
    decoded when read."""

    id: str
    image: Image.Image = Decoded()  # required; Decoded says how it is read
    question: str
    answer: str  # y^o, the old answer
    target: str  # y^n, the new answer
    rephrases: list[str]  # scoring T-Gen (Eq. 5)
    train_rephrases: list[str]  # positives for Eq. 3; may be empty
    rephrase_images: list[Image.Image] = Decoded()  # scoring I-Gen (Eq. 6)
    locality: list[Sample]  # scoring Loc (Eq. 7)
    m_locality: list[Sample]  # unrelated multimodal locality
    category: str = ""  # OKEDIT's counterfact_type (the world's: its scope, kind or shape)
    # the edit's images, asked the other questions (q_loc)
    q_locality: list[Sample] = field(default_factory=list)
    # the answer the authors' code teacher-forces on Neg (their locality_answer_train): only a
    # key over every position sees it, ours pool the prompt
    negative_answer: str = ""


class DataError(ValueError):
    """Bad dataset input; the message names the file, the record and the field."""


# -----------------------------------------------------------------------------
# anchor images (negative anchors, paper Table 7)

ANCHORS = ("black", "white", "noise")


def anchor_image(anchor: str, size: Union[int, tuple[int, int]] = 64, seed: int = 0) -> Image.Image:
    """The anchor image `anchor` (one of ANCHORS): a black, white or uniform-noise RGB image;
    `size` is an int or (w, h)."""
    if isinstance(size, int):
        w = size
        h = size
    else:
        w, h = size
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        raise ValueError(f"anchor_image: size must be a positive int or (w, h), got {size!r}")
    if anchor == "black":
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
    elif anchor == "white":
        pixels = np.full((h, w, 3), 255, dtype=np.uint8)
    elif anchor == "noise":
        pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    else:
        raise ValueError(f"anchor_image: unknown anchor {anchor!r}; allowed: {', '.join(ANCHORS)}")
    return Image.fromarray(pixels, mode="RGB")


# -----------------------------------------------------------------------------
# validation helpers: every check goes through these, so every message has
# the same shape "{file}: record {id}: field '{name}' {problem}"

_MISSING = object()


def _err(file: Any, record: str, field: str, problem: str) -> DataError:
    return DataError(f"{file}: record {record}: field '{field}' {problem}")


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        return "list of " + ", ".join(inner) if inner else "list"
    return type(value).__name__


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_id(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_or_str_list(v: Any) -> bool:
    return isinstance(v, str) or _is_str_list(v)


def _is_dict_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


# expected type name -> (check, description for "should be {description}")
_EXPECTED = {
    "str": (_is_str, "a string"),
    "id": (_is_id, "an int or a string"),
    "int": (_is_int, "an int"),
    "str_list": (_is_str_list, "a list of strings"),
    "str_or_str_list": (_is_str_or_str_list, "a string or a list of strings"),
    "dict_list": (_is_dict_list, "a list of objects"),
}


def _field(
    obj: dict,
    name: str,
    expected: str,
    file: Any,
    record: str,
    default: Any = _MISSING,
    nonempty: bool = True,
) -> Any:
    """obj[name], checked: present (unless a default is given), of the type `expected` (a key
    of _EXPECTED), and (if `nonempty`) not an empty string / empty list / list with an empty
    string."""
    if name not in obj:
        if default is _MISSING:
            raise _err(file, record, name, "is missing")
        return default
    value = obj[name]
    check, description = _EXPECTED[expected]
    if not check(value):
        raise _err(file, record, name, f"should be {description}, got {_type_name(value)}")
    if nonempty:
        if isinstance(value, str) and not value.strip():
            raise _err(file, record, name, "is empty")
        if isinstance(value, list):
            if not value:
                raise _err(file, record, name, "is empty")
            for i, item in enumerate(value):
                if isinstance(item, str) and not item.strip():
                    raise _err(file, record, name, f"item {i} is empty")
    return value


def _read_json(path: Path, top: type) -> Any:
    """Parse a json file whose top level must be of type `top` (list or dict)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, top):
        want = "a list" if top is list else "an object"
        raise DataError(f"{path}: top level should be {want}, got {type(data).__name__}")
    return data


def _inside(root: Path, rel: str, file: Any, record: str, field: str) -> Path:
    """root / rel for a path read from a data file, refusing one that could leave
    root: absolute paths, drive letters and '..' parts (with / or \\ as separator).
    Symlinks inside root are followed: the folder's owner made them, not the file."""
    parts = PureWindowsPath(rel)  # parses both separators, drives and UNC names
    if parts.drive or parts.root or ".." in parts.parts:
        raise _err(
            file, record, field, f"must be a relative path inside {root} without '..', got {rel!r}"
        )
    return root / rel


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB pixels of a decoded image. 16-bit grey ('I;16*', and 'I', read as 16-bit)
    becomes 8-bit as round(v / 257). Transparent images (RGBA, LA, PA, or a
    'transparency' entry, as P, L and RGB PNGs have) are composited onto white.
    Anything else goes through PIL's convert("RGB") unchanged."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        v = np.asarray(im, dtype=np.int64)
        grey = Image.fromarray(np.round(np.clip(v, 0, 65535) / 257).astype(np.uint8), "L")
        if im.info.get("transparency") is not None:  # one 16-bit grey value is transparent
            alpha = np.where(v == im.info["transparency"], 0, 255).astype(np.uint8)
            grey.putalpha(Image.fromarray(alpha, "L"))
        im = grey
    if im.mode in ("RGBA", "LA", "PA") or im.info.get("transparency") is not None:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def _open_image(path: Path, record: str, field: str) -> Image.Image:
    """Fully decode an image file into a detached RGB image (see _to_rgb) with empty
    .info, so that PIL's Image.__eq__ compares pixels (mode, size, info, bytes)."""
    if not path.is_file():
        raise DataError(f"{path}: record {record}: field '{field}': file not found")
    try:
        with Image.open(path) as im:
            im.verify()  # checks the file's structure (PNG chunk checksums, a cut-off end)
        with Image.open(path) as im:
            im.load()  # force full decoding: truncated pixel data fails here
            rgb = _to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: record {record}: field '{field}': "
            f"cannot read image (truncated or not an image: {e})"
        ) from e
    rgb.info = {}
    return rgb


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


# -----------------------------------------------------------------------------
# OKEDIT, as the authors release it (their loader: easyeditor/dataset/okvqa.py)

# the two VQA-API files: the authors' names, then the same without _train
ANNOTATION_FILES = ("mscoco_val2014_annotations_train.json", "mscoco_val2014_annotations.json")
QUESTION_FILES = (
    "OpenEnded_mscoco_val2014_questions_train.json",
    "OpenEnded_mscoco_val2014_questions.json",
)
REPHRASE_DIR = "rephrased_images"  # default image roots under the data folder: the authors' names
LOCALITY_DIR = "locality_images_dalle2"
# why the authors' loaders drop a record (the keys of `skipped`)
EMPTY_TARGET = "empty counterfact_answer"
EMPTY_ALT = "empty alt"
OTHER_TYPE = "counterfact_type not kept"


class _Okedit(NamedTuple):
    """Where an OKEDIT dataset's files are."""

    annotations: Path
    questions: Path
    root: Path  # the data folder: m_loc paths are relative to it
    coco: Path  # holds val2014/
    rephrase: Path  # holds {question_id}/
    locality: Path  # holds {question_id}/


def _first_file(root: Path, names: tuple[str, str]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root / names[0]}: file not found (nor {names[1]})")


def _image_file(path: Path, record: str, field: str) -> ImageFile:
    """The image file `path`, which must exist; it is decoded when read."""
    if not path.is_file():
        raise DataError(f"{path}: record {record}: field '{field}': file not found")
    return ImageFile(path, record, field)


def _question_index(path: Path) -> dict[str, dict]:
    """The questions file -> {str(question_id): entry}."""
    data = _read_json(path, dict)
    entries = _field(data, "questions", "dict_list", path, "(top level)", nonempty=False)
    index: dict[str, dict] = {}
    for i, q in enumerate(entries):
        qid = str(_field(q, "question_id", "id", path, f"at index {i}"))
        if qid in index:
            raise _err(path, qid, "question_id", "is duplicated")
        index[qid] = q
    return index


def _count(skipped: Optional[dict], reason: str) -> None:
    if skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + 1


def load_okedit(
    root: Union[str, os.PathLike],
    coco_root: Union[str, os.PathLike, None] = None,
    rephrase_root: Union[str, os.PathLike, None] = None,
    locality_root: Union[str, os.PathLike, None] = None,
    limit: Optional[int] = None,
    types: Optional[list[str]] = None,
    skipped: Optional[dict[str, int]] = None,
) -> list[EditRecord]:
    """Read OKEDIT as the authors release it into EditRecords (id = str(question_id)).

    root holds the two VQA-API files; coco_root holds val2014/ (default: root); rephrase_root
    and locality_root hold a folder per question_id (default: root/rephrased_images and
    root/locality_images_dalle2). As in the authors' loader, only annotations of a
    counterfact_type in `types` are kept (all when None), and those whose counterfact_answer
    is "" are skipped; each skip is counted in `skipped` (reason -> count) if a dict is given.
    `limit` stops after that many records: nothing after them is read. Image files are found,
    not decoded (see ImageFile)."""
    root = Path(root)
    files = _Okedit(
        annotations=_first_file(root, ANNOTATION_FILES),
        questions=_first_file(root, QUESTION_FILES),
        root=root,
        coco=Path(coco_root) if coco_root is not None else root,
        rephrase=Path(rephrase_root) if rephrase_root is not None else root / REPHRASE_DIR,
        locality=Path(locality_root) if locality_root is not None else root / LOCALITY_DIR,
    )
    if limit is not None and limit < 0:
        raise ValueError(f"load_okedit: limit must be >= 0, got {limit}")
    path = files.annotations
    annotations = _read_json(path, dict)
    annotations = _field(
        annotations, "annotations", "dict_list", path, "(top level)", nonempty=False
    )
    questions = _question_index(files.questions)
    records: list[EditRecord] = []
    seen: set[str] = set()
    for i, ann in enumerate(annotations):
        if len(records) == limit:
            break
        rid = str(_field(ann, "question_id", "id", path, f"at index {i}"))
        if rid in seen:
            raise _err(path, rid, "question_id", "is duplicated")
        seen.add(rid)
        if types is not None and _field(ann, "counterfact_type", "str", path, rid) not in types:
            _count(skipped, OTHER_TYPE)
        elif ann.get("counterfact_answer") == "":  # the authors' loader skips these
            _count(skipped, EMPTY_TARGET)
        else:
            records.append(_okedit_record(ann, rid, questions, files))
    if types is not None and not records and limit != 0:
        found = sorted({str(a.get("counterfact_type")) for a in annotations})
        raise DataError(f"{path}: no annotation has a counterfact_type in {types}; found {found}")
    return records


def _okedit_record(ann: dict, rid: str, questions: dict, files: _Okedit) -> EditRecord:
    # --- text fields: y^o is the first VQA answer, as in the authors' loader
    path = files.annotations
    image_id = _field(ann, "image_id", "int", path, rid)
    answers = _field(ann, "answers", "dict_list", path, rid)
    answer = _field(answers[0], "answer", "str", path, f"{rid} (answers item 0)")
    target = _field(ann, "counterfact_answer", "str", path, rid)
    loc_answer = _field(ann, "locality_answer", "str_or_str_list", path, rid)
    category = _field(ann, "counterfact_type", "str", path, rid, default="", nonempty=False)
    negative = _field(ann, "locality_answer_train", "str", path, rid, default="", nonempty=False)
    if rid not in questions:
        raise _err(path, rid, "question_id", f"has no entry in {files.questions}")
    q = questions[rid]
    question = _field(q, "question", "str", files.questions, rid)
    rephrases = _field(q, "rephrased_questions", "str_list", files.questions, rid)
    train_rephrases = _field(
        q, "rephrased_questions_train", "str_list", files.questions, rid, [], nonempty=False
    )

    # --- the edit image: COCO's name, .jpg as COCO ships it, or lossless .png
    stem = files.coco / "val2014" / f"COCO_val2014_{image_id:012d}"
    jpg = stem.with_suffix(".jpg")
    png = stem.with_suffix(".png")
    if not jpg.is_file() and not png.is_file():
        raise DataError(f"{jpg} or {png.name}: record {rid}: field 'image': file not found")
    image = ImageFile(jpg if jpg.is_file() else png, rid, "image")

    # --- rephrase images: every file of {rephrase root}/{qid}/, sorted by name
    rdir = _inside(files.rephrase, rid, path, rid, "question_id")
    if not rdir.is_dir():
        raise DataError(f"{rdir}: record {rid}: field 'rephrase_images': folder not found")
    names = sorted(p.name for p in rdir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{rdir}: record {rid}: field 'rephrase_images': folder holds no images")
    rephrase_images = [ImageFile(rdir / n, rid, "rephrase_images") for n in names]

    # --- locality: {locality root}/{qid}/0.png asked the edit's question (of the authors' ten
    # DALL-E images only 0.png is asked). Our extension: lists of answers and questions for
    # 0.png, 1.png, ...; other files of the folder are not read.
    loc_answers = [loc_answer] if isinstance(loc_answer, str) else loc_answer
    loc_questions = _field(
        ann, "locality_questions", "str_list", path, rid, default=[question] * len(loc_answers)
    )
    if len(loc_questions) != len(loc_answers):
        raise _err(
            path,
            rid,
            "locality_questions",
            f"has {len(loc_questions)} items but 'locality_answer' has {len(loc_answers)}",
        )
    ldir = _inside(files.locality, rid, path, rid, "question_id")
    locality = []
    for k, (lq, la) in enumerate(zip(loc_questions, loc_answers)):
        locality.append(Sample(_image_file(ldir / f"{k}.png", rid, "locality"), lq, la))

    # --- m_loc (our extension): unrelated samples, images relative to the data folder
    m_locality = []
    for k, m in enumerate(_field(ann, "m_loc", "dict_list", path, rid, [], nonempty=False)):
        where = f"{rid} (m_loc item {k})"
        m_path = _inside(files.root, _field(m, "image", "str", path, where), path, where, "image")
        m_locality.append(
            Sample(
                _image_file(m_path, rid, f"m_loc item {k}"),
                _field(m, "question", "str", path, where),
                _field(m, "answer", "str", path, where),
            )
        )

    # --- q_locality (our extension): the record's own images asked other questions;
    # image_index 0 is the edit image, k the k-th rephrase image
    own = [image, *rephrase_images]
    q_locality = []
    for k, item in enumerate(_field(ann, "q_locality", "dict_list", path, rid, [], nonempty=False)):
        where = f"{rid} (q_locality item {k})"
        j = _field(item, "image_index", "int", path, where)
        if not 0 <= j < len(own):
            raise _err(path, where, "image_index", f"should be in 0..{len(own) - 1}, got {j}")
        q_locality.append(
            Sample(
                own[j],
                _field(item, "question", "str", path, where),
                _field(item, "answer", "str", path, where),
            )
        )

    return EditRecord(
        id=rid,
        image=image,
        question=question,
        answer=answer,
        target=target,
        rephrases=list(rephrases),
        train_rephrases=list(train_rephrases),
        rephrase_images=rephrase_images,
        locality=locality,
        m_locality=m_locality,
        category=category,
        q_locality=q_locality,
        negative_answer=negative,
    )


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
        or not all(_is_int(x) and x >= 0 for x in image_ids)
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
        qid = int(r.id)
        image = r.image  # each read decodes: read once
        rephrase_images = r.rephrase_images

        stem = out / "val2014" / f"COCO_val2014_{image_id:012d}"
        if stem.with_suffix(".jpg").exists():  # the loader would read it instead
            raise DataError(
                f"{stem.with_suffix('.jpg')}: record {r.id}: field 'image': a stale "
                f".jpg would shadow the .png written here; write into an empty directory"
            )
        written.append(_save_png(image, stem.with_suffix(".png")))
        width = len(str(len(rephrase_images) - 1))  # 0-9, or 00-11: name order = list order
        rep_names = [f"{k:0{width}d}.png" for k in range(len(rephrase_images))]
        rdir = out / REPHRASE_DIR / r.id
        _check_owned_dir(rdir, set(rep_names), r.id, "rephrase_images")
        for name, im in zip(rep_names, rephrase_images):
            written.append(_save_png(im, rdir / name))
        for k, s in enumerate(r.locality):
            written.append(_save_png(s.image, out / LOCALITY_DIR / r.id / f"{k}.png"))
        m_loc = []
        for k, s in enumerate(r.m_locality):
            rel = f"m_loc/{r.id}/{k}.png"
            written.append(_save_png(s.image, out / rel))
            m_loc.append({"image": rel, "question": s.question, "answer": s.answer})
        own = [im.tobytes() for im in [image, *rephrase_images]]  # what image_index counts
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
            "question_id": qid,
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
        annotations.append(ann)
        q = {
            "question_id": qid,
            "image_id": image_id,
            "question": r.question,
            "rephrased_questions": list(r.rephrases),
        }
        if r.train_rephrases:
            q["rephrased_questions_train"] = list(r.train_rephrases)
        questions.append(q)
    written.append(_write_json({"annotations": annotations}, out / ANNOTATION_FILES[0]))
    written.append(_write_json({"questions": questions}, out / QUESTION_FILES[0]))
    return written


# -----------------------------------------------------------------------------
# MMEdit E-VQA json, with the authors' fields (their loader: easyeditor/dataset/vqa.py)

_MMEDIT_TEXT = ("src", "pred", "rephrase", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a")


def load_mmedit(
    json_path: Union[str, os.PathLike],
    coco_root: Union[str, os.PathLike],
    rephrase_root: Union[str, os.PathLike, None] = None,
    limit: Optional[int] = None,
    skipped: Optional[dict[str, int]] = None,
) -> list[EditRecord]:
    """Read MMEdit's E-VQA json into EditRecords (id = str(list index)), as the authors' loader:
    `image` and `m_loc` are relative to coco_root, `image_rephrase` to rephrase_root (default:
    coco_root); records whose alt is "" are skipped (counted in `skipped` if a dict is given);
    the authors' rephrased_questions_train are the positives of Eq. 3. `limit` stops after that
    many records. Image files are found, not decoded (see ImageFile)."""
    path = Path(json_path)
    coco_root = Path(coco_root)
    rephrase_root = Path(rephrase_root) if rephrase_root is not None else coco_root
    if limit is not None and limit < 0:
        raise ValueError(f"load_mmedit: limit must be >= 0, got {limit}")
    data = _read_json(path, list)
    records = []
    for i, item in enumerate(data):
        if len(records) == limit:
            break
        rid = str(i)
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {rid} should be an object, got {type(item).__name__}")
        if item.get("alt") == "":  # the authors' loader skips these
            _count(skipped, EMPTY_ALT)
            continue
        text = {k: _field(item, k, "str", path, rid) for k in _MMEDIT_TEXT}
        roots = {"image": coco_root, "image_rephrase": rephrase_root, "m_loc": coco_root}
        images = {}
        for k, root in roots.items():
            where = _inside(root, _field(item, k, "str", path, rid), path, rid, k)
            images[k] = _image_file(where, rid, k)
        train = _field(item, "rephrased_questions_train", "str_list", path, rid, [], False)
        negative = _field(item, "locality_answer_train", "str", path, rid, "", nonempty=False)
        records.append(
            EditRecord(
                id=rid,
                image=images["image"],
                question=text["src"],
                answer=text["pred"],
                target=text["alt"],
                rephrases=[text["rephrase"]],
                train_rephrases=list(train),
                rephrase_images=[images["image_rephrase"]],
                locality=[Sample(None, text["loc"], text["loc_ans"])],
                m_locality=[Sample(images["m_loc"], text["m_loc_q"], text["m_loc_a"])],
                negative_answer=negative,
            )
        )
    return records


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


# ---------------------------------------------------------------------------
# The world: a tiny, fully known visual domain.
#
# One object per 64x64 image: a shape in a colour (a "kind", e.g. a red
# circle), with nuisance variation (size, position, background tint, pixel
# noise). Three question families with ten paraphrases each: shape, colour
# and name, where every kind has a made-up name (the analogue of OKEDIT's
# "What brand is this computer?"). The knowledge is fixed; a seed only picks
# renderings and records, so one trained TinyVLM knows every seed's world.
#
# Edits change an answer at two scopes, like the paper's Fig. 1:
#   scope "kind":  the name of one kind       ("what is this called?" on red circles)
#   scope "shape": the shape word of a shape  ("what shape is this?" on all circles)
# Training and evaluation renderings never coincide: the object's centre
# (cx, cy) has cx + cy even in training renderings and odd in evaluation ones.
# ---------------------------------------------------------------------------

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
# The edit targets y^n, never trained on.
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


def _centre(rng: random.Random, r: int, split: str) -> tuple[int, int]:
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
    cx, cy = _centre(rng, r, split)
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
    words = rng.sample(NEW_WORDS, len(NEW_WORDS))  # a seeded order of the new words
    edited_shapes = rng.sample(SHAPES, len(SHAPES) // 2)  # shape scope: half of the shapes
    kinds = _edited_kinds(rng, n_locality, n // 2)  # kind scope
    target_of = dict(zip([*edited_shapes, *kinds], words))  # one target per shape / kind

    def unedited(family: str, k: tuple[str, str]) -> bool:
        """No edit changes the answer of this question family on kind k."""
        if family == "name":
            return k not in kinds
        if family == "shape":
            return k[0] not in edited_shapes
        return True  # no edit changes a colour

    records = []
    for i in range(n):
        if i % 2 == 0:  # scope "kind": the name of one kind
            kind = kinds[(i // 2) % len(kinds)]
            family = "name"
            target = target_of[kind]
            scope = [kind]
            near = [k for k in _near_misses(kind) if k not in kinds]
        else:  # scope "shape": the shape word of every colour of one shape
            shape = rng.choice(edited_shapes)
            kind = (shape, rng.choice(sorted(COLOURS)))
            family = "shape"
            target = target_of[shape]
            scope = [k for k in KINDS if k[0] == shape]
            near = [k for k in KINDS if k[1] == kind[1] and k[0] not in edited_shapes]
        questions = rng.sample(QUESTIONS[family], 1 + n_rephrases + n_train_rephrases)
        question = questions[0]
        unrelated = [rng.choice(KINDS) for _ in range(n_unrelated)]
        image = render(kind, rng, "eval")
        shown = [(kind, image)]  # each image with its kind, in the order the stream draws them
        for _ in range(n_images):
            k = rng.choice(scope)
            shown.append((k, render(k, rng, "eval")))
        locality = []
        for k in rng.sample(near, n_locality):
            locality.append(Sample(render(k, rng, "eval"), question, answer_of(k, family)))
        m_locality = []
        for k in unrelated:
            m_image = render(k, rng, "eval")  # drawn before its question, as always
            m_question = rng.choice(QUESTIONS["colour"])
            m_locality.append(Sample(m_image, m_question, answer_of(k, "colour")))
        # q_locality: each of the edit's images asked another family, one that no edit changes
        # on the image's kind (alternating among those), so that no edit, alone or with the
        # others, should change the answer. It draws from a stream of its own, so that every
        # rendering above stays what it was.
        qrng = random.Random(f"q_locality {seed} {i}")
        others = [f for f in QUESTIONS if f != family]
        q_locality = []
        for j, (k, im) in enumerate(shown):
            safe = [f for f in others if unedited(f, k)]
            f = safe[j % len(safe)]
            q_locality.append(Sample(im, qrng.choice(QUESTIONS[f]), answer_of(k, f)))
        records.append(
            EditRecord(
                id=str(i + 1),
                image=image,
                question=question,
                answer=answer_of(kind, family),
                target=target,
                rephrases=questions[1 : 1 + n_rephrases],
                train_rephrases=questions[1 + n_rephrases :],
                rephrase_images=[im for _, im in shown[1:]],
                q_locality=q_locality,
                locality=locality,
                m_locality=m_locality,
                category="kind" if i % 2 == 0 else "shape",
            )
        )
    return records


# ---------------------------------------------------------------------------
# The tiny OKEDIT sample (assets/okedit_tiny), written by `python data.py make-sample`
# ---------------------------------------------------------------------------

SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "okedit_tiny"
SAMPLE_SEED = 0  # the seed the committed sample was made with


def load_sample(limit: Optional[int] = None) -> list[EditRecord]:
    """The shipped tiny OKEDIT sample, read through the OKEDIT loader."""
    return load_okedit(SAMPLE_DIR, limit=limit)


def make_sample(seed: int, out_dir: Union[str, os.PathLike], n: int = 40) -> list[Path]:
    """Write `make_records(seed, n)` in the OKEDIT layout (byte-identical for the same seed);
    returns the paths written."""
    return write_okedit(make_records(seed, n), out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Data for BalancEdit: make-sample writes the world's "
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cleanup = claim_output(args.out, folder=True)  # by trying, before any work
    except OutputError as e:
        parser.exit(2, f"data.py make-sample: error: {e}\n")
    try:
        written = make_sample(args.seed, args.out, args.n)
    except (ValueError, OSError) as e:
        cleanup()
        parser.exit(2, f"data.py make-sample: error: {e}\n")
    mine = set(written)
    others = [p for p in Path(args.out).rglob("*") if p.is_file() and p not in mine]
    size = sum(p.stat().st_size for p in written)
    message = f"wrote {args.n} records, {len(written)} files, {size} bytes to {args.out}"
    if others:
        message += f" ({len(others)} other files already there were left as they were)"
    print(message)
    return 0


# ---------------------------------------------------------------------------
# Output paths, claimed by trying before any work (root passes os.access, then fails)
# ---------------------------------------------------------------------------


class OutputError(OSError):
    """An output path that cannot be written, in one line that names the option and path."""


def claim_output(path: Union[str, os.PathLike], flag: str = "--out", folder: bool = False):
    """Try, before any work, that a command can write ``path``: a file, or with ``folder`` the
    folder it fills. Makes the missing folders, creates and removes a file in the one that will
    hold the output, and opens an existing output file for appending (which changes nothing).
    Returns ``cleanup()``, which removes the folders made here if still empty: call it when the
    run fails before writing. Raises OutputError, e.g. "--out /proc/x/r.json: cannot write
    there (No such file or directory)"."""
    path = Path(path)
    where = path if folder else path.parent
    made = [p for p in (where, *where.parents) if not p.exists()]  # deepest first

    def cleanup():
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty (or gone): keep it and what holds it
                return

    if path.is_dir() and not folder:
        raise OutputError(f"{flag} {path}: is a folder; give a file's path")
    try:
        where.mkdir(parents=True, exist_ok=True)
        trial = where / f".write-test-{os.getpid()}"
        trial.open("xb").close()  # x: never an existing file
        trial.unlink()
        if path.is_file():
            path.open("ab").close()
    except OSError as e:
        cleanup()
        raise OutputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return cleanup


if __name__ == "__main__":
    sys.exit(main())
