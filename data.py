"""The data that edits are made and scored on: edit records, the paper's two dataset
loaders and writers, anchor images, and the shipped sample.

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
paper's Table 7 ablation. `load_sample` reads the shipped tiny OKEDIT sample, which
world.py generates.

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
loaders skip (an empty target), and they are counted. writers.py writes records back in
these layouts.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# expected type name -> (check, description for "should be {description}")
_EXPECTED = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "id": (lambda v: isinstance(v, str) or is_int(v), "an int or a string"),
    "int": (is_int, "an int"),
    "str_list": (_is_str_list, "a list of strings"),
    "str_or_str_list": (
        lambda v: isinstance(v, str) or _is_str_list(v),
        "a string or a list of strings",
    ),
    "dict_list": (
        lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        "a list of objects",
    ),
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
    image = _coco_image(files.coco, image_id, rid)
    rephrase_images = _rephrase_images(files, rid)
    return EditRecord(
        id=rid,
        image=image,
        question=question,
        answer=answer,
        target=target,
        rephrases=list(rephrases),
        train_rephrases=list(train_rephrases),
        rephrase_images=rephrase_images,
        locality=_okedit_locality(ann, rid, question, loc_answer, files),
        m_locality=_okedit_m_loc(ann, rid, files),
        category=category,
        q_locality=_okedit_q_loc(ann, rid, [image, *rephrase_images], path),
        negative_answer=negative,
    )


def _coco_image(coco: Path, image_id: int, rid: str) -> ImageFile:
    """The edit image: COCO's name, .jpg as COCO ships it, or lossless .png."""
    stem = coco / "val2014" / f"COCO_val2014_{image_id:012d}"
    jpg = stem.with_suffix(".jpg")
    png = stem.with_suffix(".png")
    if not jpg.is_file() and not png.is_file():
        raise DataError(f"{jpg} or {png.name}: record {rid}: field 'image': file not found")
    return ImageFile(jpg if jpg.is_file() else png, rid, "image")


def _rephrase_images(files: _Okedit, rid: str) -> list[ImageFile]:
    """Every file of {rephrase root}/{qid}/, sorted by name."""
    rdir = _inside(files.rephrase, rid, files.annotations, rid, "question_id")
    if not rdir.is_dir():
        raise DataError(f"{rdir}: record {rid}: field 'rephrase_images': folder not found")
    names = sorted(p.name for p in rdir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{rdir}: record {rid}: field 'rephrase_images': folder holds no images")
    return [ImageFile(rdir / n, rid, "rephrase_images") for n in names]


def _okedit_locality(
    ann: dict, rid: str, question: str, loc_answer: Union[str, list[str]], files: _Okedit
) -> list[Sample]:
    """{locality root}/{qid}/0.png asked the edit's question (of the authors' ten DALL-E images
    only 0.png is asked). Our extension: lists of answers and questions for 0.png, 1.png, ...;
    other files of the folder are not read."""
    path = files.annotations
    loc_answers = [loc_answer] if isinstance(loc_answer, str) else loc_answer
    loc_questions = _field(
        ann, "locality_questions", "str_list", path, rid, default=[question] * len(loc_answers)
    )
    if len(loc_questions) != len(loc_answers):
        problem = f"has {len(loc_questions)} items but 'locality_answer' has {len(loc_answers)}"
        raise _err(path, rid, "locality_questions", problem)
    ldir = _inside(files.locality, rid, path, rid, "question_id")
    locality = []
    for k, (lq, la) in enumerate(zip(loc_questions, loc_answers)):
        locality.append(Sample(_image_file(ldir / f"{k}.png", rid, "locality"), lq, la))
    return locality


def _okedit_m_loc(ann: dict, rid: str, files: _Okedit) -> list[Sample]:
    """m_loc (our extension): unrelated samples, images relative to the data folder."""
    path = files.annotations
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
    return m_locality


def _okedit_q_loc(ann: dict, rid: str, own: list[ImageFile], path: Path) -> list[Sample]:
    """q_locality (our extension): the record's own images asked other questions;
    image_index 0 is the edit image, k the k-th rephrase image."""
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
    return q_locality


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


# -----------------------------------------------------------------------------
# The tiny OKEDIT sample (assets/okedit_tiny, written by `python world.py make-sample`)

SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "okedit_tiny"


def load_sample(limit: Optional[int] = None) -> list[EditRecord]:
    """The shipped tiny OKEDIT sample, read through the OKEDIT loader."""
    return load_okedit(SAMPLE_DIR, limit=limit)
