"""What every editor provides, so that the protocols of evaluate.py run them alike.

BalancEdit (balancedit.py) and the editors it is compared with (baselines.py, mend.py, ike.py)
each implement ``Editor``: ``edit`` makes one edit and reports it, ``attached()`` is the edited
model inside a ``with`` block, ``remove(j)`` undoes edit j (each editor says what that undoes),
``len()`` counts the edits it holds, and ``prefix(record)`` is the text before the record's
probes (empty but for IKE, whose edit is that text).
"""

import contextlib
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class EditReport:  # what one edit did
    index: int  # the entry of this edit
    action: str  # what the editor did, in its own words ("new", "tune", "split", ...)
    removed: list[str]  # the entries a conflict removed, as "question -> target"
    d_pos: float  # d(Pos, k) of Eq. 3 (NaN for an editor without a radius)
    d_neg: float  # d(Neg, k)
    radius: float  # eps of the entry
    losses: list[float] = field(default_factory=list)  # the training loss at each step
    seconds: float = 0.0  # wall time of the edit


class Editor(Protocol):
    """An editor of one backbone: the protocols need nothing else of it."""

    def edit(self, record) -> EditReport: ...  # make the edit of an EditRecord

    def attached(self) -> contextlib.AbstractContextManager: ...  # ``with``: the edited model

    def remove(self, j: int) -> None: ...  # undo edit j

    def __len__(self) -> int: ...  # the edits it holds

    def prefix(self, record) -> str:
        """Text to put before each of the record's probes: none for an editor of the weights
        (IKE's edit is this text)."""
        return ""
