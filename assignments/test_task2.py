"""Task 2 (15 points): the codebook's lookup, Eq. 1's decision for each query.

j = argmin_k d(q, k),   dist = d(q, k_j),   hit = dist <= eps_j

python -m pytest assignments -m task2
"""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from balancedit import Codebook, distance

pytestmark = pytest.mark.task2
FEW = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)  # seeds: nothing to shrink


def codebook(keys, radii, metric="euc"):
    """A codebook with one entry per key; the values are stand-ins (lookup never calls them)."""
    cb = Codebook(metric)
    for i, (k, r) in enumerate(zip(torch.as_tensor(keys, dtype=torch.float32), radii)):
        cb.add(k, nn.Identity(), float(r), f"target {i}")
    return cb


def test_lookup_on_a_hand_worked_2d_case():
    # key 0 at (0, 0) with radius 1, key 1 at (3, 0) with radius 0.5 (Euclidean)
    cb = codebook([[0.0, 0.0], [3.0, 0.0]], [1.0, 0.5])
    q = torch.tensor([[0.5, 0.0], [2.8, 0.0], [1.4, 0.0], [3.0, 0.6]])
    index, dist, hit = cb.lookup(q)
    hint = ""
    if index.tolist() == [1, 0, 1, 0]:
        hint = " (that is the farthest key: argmax instead of argmin?)"
    assert index.tolist() == [0, 1, 0, 1], (
        "j = argmin_k d(q, k): each query goes to its NEAREST key; want [0, 1, 0, 1], "
        f"got {index.tolist()}{hint}"
    )
    assert dist.tolist() == pytest.approx([0.5, 0.2, 1.4, 0.6], abs=1e-6), (
        "dist is d(q, k_j), the distance to the chosen key; want [0.5, 0.2, 1.4, 0.6], "
        f"got {dist.tolist()}"
    )
    assert hit.tolist() == [True, True, False, False], (
        "hit is d(q, k_j) <= eps_j with eps = [1.0, 0.5]; want [True, True, False, False], "
        f"got {hit.tolist()}"
    )


def test_lookup_returns_tensors_of_one_number_per_query():
    cb = codebook([[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1])
    index, dist, hit = cb.lookup(torch.randn(5, 2))
    for name, t, dtype in (
        ("index", index, torch.int64),
        ("dist", dist, torch.float32),
        ("hit", hit, torch.bool),
    ):
        got = f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}"
        assert isinstance(t, torch.Tensor) and t.shape == (5,) and t.dtype == dtype, (
            f"lookup returns {name} as a (B,) = (5,) {dtype} tensor; got {got}"
        )


def test_a_query_on_the_edge_of_a_ball_is_inside():
    cb = codebook([[0.0, 0.0], [10.0, 0.0]], [0.5, 0.0])
    index, dist, hit = cb.lookup(torch.tensor([[0.5, 0.0], [10.0, 0.0]]))
    assert dist.tolist() == [0.5, 0.0], f"want the exact distances [0.5, 0.0], got {dist.tolist()}"
    assert hit.tolist() == [True, True], (
        "Eq. 1 tests d(q, k_j) <= eps_j: a query exactly on the edge of a ball is inside, and a "
        f"query equal to the key of a radius-0 entry hits it; got hit = {hit.tolist()} "
        "(< instead of <=?)"
    )


def test_only_the_nearest_entrys_radius_counts():
    # key 0 is nearest to the query but its ball is small; key 1's large ball holds the query
    cb = codebook([[0.0, 0.0], [1.0, 0.0]], [0.1, 5.0])
    index, dist, hit = cb.lookup(torch.tensor([[0.3, 0.0]]))
    assert index.tolist() == [0] and hit.tolist() == [False], (
        "Eq. 1 first picks the nearest key j, then asks whether the query lies in ITS ball: "
        "(0.3, 0) is nearest to key 0 (radius 0.1), so it misses, although key 1's ball "
        f"(radius 5) holds it; got index {index.tolist()}, hit {hit.tolist()}"
    )


def test_a_tie_goes_to_the_first_key():
    cb = codebook([[0.0, 0.0], [3.0, 0.0]], [1.0, 0.5])
    index, dist, hit = cb.lookup(torch.tensor([[1.5, 0.0], [1.5, 1.0]]))
    assert index.tolist() == [0, 0] and hit.tolist() == [False, False], (
        "(1.5, 0) and (1.5, 1) are as far from key 0 as from key 1: a tie goes to the first "
        "(lowest-index) key, as torch.argmin and Tensor.min do, and both miss its ball (radius "
        f"1); got index {index.tolist()}, hit {hit.tolist()}"
    )


def test_an_empty_codebook_misses_everything():
    index, dist, hit = Codebook().lookup(torch.randn(3, 5))
    got = (index.tolist(), dist.tolist(), hit.tolist())
    assert got == ([-1] * 3, [math.inf] * 3, [False] * 3), (
        "with no entry there is no nearest key: index -1, dist inf, hit False for every query; "
        f"got {got}"
    )


def test_a_nan_query_never_hits():
    # A KV-cache decoding step has no prompt position, so its query is NaN (task 3): no hit.
    cb = codebook([[0.0, 0.0], [1.0, 0.0]], [100.0, 100.0], metric="cos")
    index, dist, hit = cb.lookup(torch.tensor([[math.nan, math.nan], [1.0, 0.1]]))
    assert hit.tolist() == [False, True], (
        "a NaN query (a decoding step, no prompt position) must never hit, and the other rows "
        f"are decided on their own; got hit = {hit.tolist()} (NaN <= eps is False; NaN > eps is "
        "False too)"
    )


@FEW
@given(
    st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 7), st.sampled_from(["cos", "euc"])
)
def test_lookup_agrees_with_the_distances_of_task_1(seed, B, N, metric):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, 4, generator=g)
    q = torch.randn(B, 4, generator=g)
    radii = torch.rand(N, generator=g)
    index, dist, hit = codebook(keys, radii.tolist(), metric).lookup(q)
    d = distance(q, keys, metric)  # (B, N)
    for b in range(B):
        j = int(index[b])
        assert 0 <= j < N and d[b, j] <= d[b].min() + 1e-6, (
            f"query {b}: the nearest key ({metric}) is {int(d[b].argmin())} at "
            f"{d[b].min():.5f}; got entry {j}"
        )
        assert dist[b].item() == d[b, j].item(), (
            f"query {b}: dist must be d(q, k_j) exactly as distance(queries, self.keys, "
            f"self.metric) gives it, {d[b, j]:.8f}; got {dist[b]:.8f} (take it from the same "
            "distance matrix as the argmin)"
        )
        assert bool(hit[b]) == bool(dist[b] <= radii[j]), (
            f"query {b}: hit must be dist <= eps_j ({dist[b]:.5f} <= {radii[j]:.5f}); "
            f"got {bool(hit[b])}"
        )


def test_half_precision_queries():
    cb = codebook([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], metric="cos")
    q = torch.tensor([[1.0, 0.1], [0.1, 1.0]], dtype=torch.float16)
    index, dist, hit = cb.lookup(q)
    right = index.tolist() == [0, 1] and hit.tolist() == [True, True]
    assert right and dist.dtype == torch.float32, (
        "fp16 queries (BLIP-2 on a GPU) are compared in float32 to the float32 keys; "
        f"got {index}, {dist}, {hit}"
    )
