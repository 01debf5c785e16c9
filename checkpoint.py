"""A checkpoint is a folder of two files: ``{name}.safetensors`` (the tensors) and
``{name}.json`` (everything else, with a header that names its format and version).

Users hand these files in, so reading one checks it before anything is built from it: a
missing, truncated or tampered file is one ``ValueError`` that names the file and the fault.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def save(path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``path/{name}.safetensors`` and ``path/{name}.json``; ``path`` becomes a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder; cannot save a {name} there")
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: t.cpu().contiguous() for k, t in tensors.items()}, str(path / f"{name}.safetensors")
    )
    (path / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def load(path, name: str, header: dict, fields: set[str]) -> tuple[dict, dict]:
    """Read what ``save`` wrote: the JSON (its ``header`` items equal, its keys exactly
    ``fields``) and the tensors."""
    meta_file = Path(path, f"{name}.json")
    tensor_file = Path(path, f"{name}.safetensors")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_file}: cannot load a {name}: {e}") from e
    if not isinstance(meta, dict) or set(meta) != fields | set(header) or meta | header != meta:
        want = f"{header} and the fields {sorted(fields)}"
        raise ValueError(f"{meta_file}: cannot load a {name}: want {want}")
    try:
        return meta, load_file(str(tensor_file))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{tensor_file}: cannot load a {name}: {e}") from e
