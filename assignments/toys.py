"""Hand-built models and Eq. 1's decision worked out by hand, for the Task 3 graders
(test_task3.py and test_task3_hold.py): a layer that sees (B*T, D) as OPT's fc2 does, values that
differ from it, and the route each row must take, computed from the codebook's keys and radii
in float64 (never read from a router).
"""

from typing import NamedTuple

import torch
import torch.nn as nn

import models
from balancedit import Codebook, Router, new_value


class FlatToy(models.Backbone):
    """Like OPT's decoder layer: flattens (B, T, D) to (B*T, D) before ``fc2`` (the edited
    layer). A models.Backbone, so that a call's ``prompt_mask`` reaches the router."""

    def __init__(self, D=4, F=6):
        super().__init__()
        self.fc1 = nn.Linear(D, F)
        self.fc2 = nn.Linear(F, D)

    def forward(self, x):
        """x: (B, T, D); a call's prompt_mask (B, T) never gets here: Backbone keeps it as
        self.prompt_mask, where the router reads it."""
        h = torch.relu(self.fc1(x.reshape(-1, x.shape[-1])))  # (B*T, F)
        return self.fc2(h).view(x.shape) + x


def fc2_input(model, x):
    return torch.relu(model.fc1(x))  # (B, T, F), what fc2 sees, per sample


def changed_copy(layer, seed):
    """A value: a copy of ``layer`` with random changes (its output differs from the layer's)."""
    v = new_value(layer)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return v


def query_of(model, x, mask):
    """The query the router computed for each row (read from an empty codebook's router)."""
    with Router(model, "fc2", Codebook()) as router:
        model(x, prompt_mask=mask)
    assert router.last_query is not None, (
        "route must set router.last_query after every call of the layer, even with an empty "
        "codebook (see Router)"
    )
    return router.last_query


class Decision(NamedTuple):
    """Eq. 1's decision for each row, each (B,)."""

    route: torch.Tensor  # the entry it goes to, or -1
    j: torch.Tensor  # its nearest entry
    dist: torch.Tensor  # d(q, k_j)
    radius: torch.Tensor  # eps_j


def decide(queries, cb) -> Decision:
    """Eq. 1's decision for each row, computed here in float64 from the codebook's keys and
    radii (never read from the router)."""
    q = queries.detach().double()
    k = cb.keys.double()
    if cb.metric == "cos":
        cos = (q @ k.T) / (q.norm(dim=1)[:, None] * k.norm(dim=1)[None])
        d = (1 - cos).clamp(min=0)  # (B, N)
    else:
        d = (q[:, None] - k[None]).norm(dim=-1)  # (B, N)
    dist, j = d.min(dim=1)
    radius = cb.radii.double()[j]
    return Decision(torch.where(dist <= radius, j, -1), j, dist, radius)


def clear_cut(queries, cb) -> bool:
    """No row sits within round-off of its nearest ball's edge (a row exactly on a key is
    clear)."""
    d = decide(queries, cb)
    return bool(((d.dist == 0) | ((d.dist - d.radius).abs() > 1e-5 * (1 + d.radius))).all())


def route_message(want, got, queries, cb) -> str:
    """Says which row was routed wrongly and why it should not have been."""
    d = decide(queries, cb)
    for b, (w, g) in enumerate(zip(want, got)):
        if w == g:
            continue
        where = (
            f"d = {d.dist[b]:.4g} from its nearest key, entry {int(d.j[b])} "
            f"(radius {d.radius[b]:.4g})"
        )
        if w < 0:
            why = f"row {b} should miss: its query is at {where}, outside that ball"
        else:
            why = f"row {b} should hit entry {w}: its query is at {where}, inside that ball"
        whole = ""
        if len(got) > 1 and len(set(got)) == 1:
            whole = " Every row got row 0's route: is the whole batch routed by row 0's decision?"
        return (
            f"want last_index {want}, got {got}: {why}; it went to {g}. Route each row on its "
            f"own query (prompt_key of its own positions).{whole}"
        )
    return ""


def keys_by_hand(model, x, mask):
    """Each row's key, computed here: the mean of fc2's input over the row's prompt positions
    (NaN for a row without one), (B, F)."""
    h = fc2_input(model, x).detach()  # (B, T, F)
    return torch.stack([h[b][mask[b]].mean(dim=0) for b in range(len(h))])
