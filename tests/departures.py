"""Not a test: measures each departure of balancedit.py from the authors' code on TinyVLM, by
switching it back alone (a monkeypatch), and prints the README's table. About 75 s on 2 cores:

    python tests/departures.py
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balancedit as be  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import models  # noqa: E402
import study  # noqa: E402

backbone = models.TinyVLM.from_pretrained()
records = data.load_sample()
refs = evaluate.references(backbone, records, progress=False)


def measure(protocol: str, *patches) -> dict:
    """BalancEdit under ``protocol`` with each ``(object, name, replacement)`` patched in, then
    restored."""
    old = [(o, n, getattr(o, n)) for o, n, _ in patches]
    for o, n, v in patches:
        setattr(o, n, v)
    try:
        return evaluate.run_method(
            "balancedit", backbone, records, be.BalancEditConfig(), protocol, refs, False
        )
    finally:
        for o, n, v in old:
            setattr(o, n, v)


# The authors' key: the mean over every position, the teacher-forced answer included.
every_position = [(evaluate, "BalancEditor", study.EveryPosition)]

# The authors' loss target has no EOS: labels without it, from the batch an edit is made of
# (scoring leaves EOS out anyway, and keys read the prompt only).
encode = backbone.encode


def encode_without_eos(images, questions, answers=None, **kwargs):
    batch = encode(images, questions, answers, **kwargs)
    if "labels" in batch:
        eos = batch["labels"] == backbone.eos_token_id
        batch["labels"] = batch["labels"].masked_fill(eos, -100)
    return batch


# The authors' entries share one value; their values start cold; every radius becomes the
# latest edit's.
new_value = be.new_value
shared = {}  # the one value


def one_shared_value(layer, form="full", rank=8):
    return shared.setdefault("v", new_value(layer, form, rank))


def cold_value(layer, form="full", rank=8):
    value = new_value(layer, form, rank)
    value.load_state_dict = lambda *args, **kwargs: None  # the overlap warm start does nothing
    return value


add = be.Codebook.add


def add_overwriting_radii(self, key, value, radius, *rest):
    j = add(self, key, value, radius, *rest)
    self.radii[:] = float(radius)
    return j


rows = [
    ("keys over the prompt, not over every position", "single", every_position),
    ("keys over the prompt, not over every position", "sequential", every_position),
    ("EOS in the Eq. 2 loss", "single", [(backbone, "encode", encode_without_eos)]),
    (
        "Adam eps 1e-8, not 1e-4",
        "single",
        [(torch.optim, "Adam", functools.partial(torch.optim.Adam, eps=1e-4))],
    ),
    (
        "one value per entry, not one shared by all",
        "sequential",
        [(be, "new_value", one_shared_value)],
    ),
    ("overlap warm-starts from a same-target entry", "sequential", [(be, "new_value", cold_value)]),
    (
        "shrink only the balls that hold a key of another target",
        "sequential",
        [(be.Codebook, "add", add_overwriting_radii)],
    ),
]
ours = {p: measure(p) for p in ("single", "sequential")}
print("| departure | protocol | HM ours / authors' | gen Acc ours / authors' |\n|---|---|---|---|")
for name, protocol, patches in rows:
    r = measure(protocol, *patches)
    print(
        f"| {name} | {protocol} | {ours[protocol]['hm']:.2f} / {r['hm']:.2f} | "
        f"{ours[protocol]['gen_acc']:.1f} / {r['gen_acc']:.1f} |",
        flush=True,
    )
