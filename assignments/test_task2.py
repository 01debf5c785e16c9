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


def codebook(keys, radii, kind="euc"):
    """A codebook with one entry per key; the values are stand-ins (lookup never calls them)."""
    cb = Codebook(kind)
    for i, (k, r) in enumerate(zip(torch.as_tensor(keys, dtype=torch.float32), radii)):
        cb.add(k, nn.Identity(), float(r), f"target {i}")
    return cb


def test_lookup_on_a_hand_worked_2d_case():
    # key 0 at (0, 0) with radius 1, key 1 at (3, 0) with radius 0.5 (Euclidean)
    cb = codebook([[0.0, 0.0], [3.0, 0.0]], [1.0, 0.5])
    q = torch.tensor([[0.5, 0.0], [2.8, 0.0], [1.4, 0.0], [3.0, 0.6]])
    index, dist, hit = cb.lookup(q)
    assert index.tolist() == [0, 1, 0, 1], (
        f"j = argmin_k d(q, k): each query goes to its NEAREST key; want [0, 1, 0, 1], got {index.tolist()}"
        + (
            " (that is the farthest key: argmax instead of argmin?)"
            if index.tolist() == [1, 0, 1, 0]
            else ""
        )
    )
    assert dist.tolist() == pytest.approx([0.5, 0.2, 1.4, 0.6], abs=1e-6), (
        f"dist is d(q, k_j), the distance to the chosen key; want [0.5, 0.2, 1.4, 0.6], got {dist.tolist()}"
    )
    assert hit.tolist() == [True, True, False, False], (
        f"hit is d(q, k_j) <= eps_j with eps = [1.0, 0.5]; want [True, True, False, False], got {hit.tolist()}"
    )


def test_lookup_returns_tensors_of_one_number_per_query():
    index, dist, hit = codebook([[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1]).lookup(torch.randn(5, 2))
    for name, t, dtype in (
        ("index", index, torch.int64),
        ("dist", dist, torch.float32),
        ("hit", hit, torch.bool),
    ):
        assert isinstance(t, torch.Tensor) and t.shape == (5,) and t.dtype == dtype, (
            f"lookup returns {name} as a (B,) = (5,) {dtype} tensor; got {getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}"
        )


def test_a_query_on_the_edge_of_a_ball_is_inside():
    cb = codebook([[0.0, 0.0], [10.0, 0.0]], [0.5, 0.0])
    index, dist, hit = cb.lookup(torch.tensor([[0.5, 0.0], [10.0, 0.0]]))
    assert dist.tolist() == [0.5, 0.0], f"want the exact distances [0.5, 0.0], got {dist.tolist()}"
    assert hit.tolist() == [True, True], (
        "Eq. 1 tests d(q, k_j) <= eps_j: a query exactly on the edge of a ball is inside, and a query equal to "
        f"the key of a radius-0 entry hits it; got hit = {hit.tolist()} (< instead of <=?)"
    )


def test_only_the_nearest_entrys_radius_counts():
    # key 0 is nearest to the query but its ball is small; key 1's large ball holds the query
    cb = codebook([[0.0, 0.0], [1.0, 0.0]], [0.1, 5.0])
    index, dist, hit = cb.lookup(torch.tensor([[0.3, 0.0]]))
    assert index.tolist() == [0] and hit.tolist() == [False], (
        "Eq. 1 first picks the nearest key j, then asks whether the query lies in ITS ball: (0.3, 0) is nearest "
        f"to key 0 (radius 0.1), so it misses, although key 1's ball (radius 5) holds it; got index "
        f"{index.tolist()}, hit {hit.tolist()}"
    )


def test_an_empty_codebook_misses_everything():
    index, dist, hit = Codebook().lookup(torch.randn(3, 5))
    assert (
        index.tolist() == [-1, -1, -1]
        and dist.tolist() == [math.inf] * 3
        and hit.tolist() == [False] * 3
    ), (
        "with no entry there is no nearest key: index -1, dist inf, hit False for every query; "
        f"got {index.tolist()}, {dist.tolist()}, {hit.tolist()}"
    )


def test_a_nan_query_never_hits():
    # A KV-cache decoding step has no prompt position, so its query is NaN (task 3): it must not hit.
    cb = codebook([[0.0, 0.0], [1.0, 0.0]], [100.0, 100.0], kind="cos")
    index, dist, hit = cb.lookup(torch.tensor([[math.nan, math.nan], [1.0, 0.1]]))
    assert hit.tolist() == [False, True], (
        "a NaN query (a decoding step, no prompt position) must never hit, and the other rows are decided on "
        f"their own; got hit = {hit.tolist()} (NaN <= eps is False; NaN > eps is False too)"
    )


@FEW
@given(
    st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 7), st.sampled_from(["cos", "euc"])
)
def test_lookup_agrees_with_the_distances_of_task_1(seed, B, N, kind):
    g = torch.Generator().manual_seed(seed)
    keys, q, radii = (
        torch.randn(N, 4, generator=g),
        torch.randn(B, 4, generator=g),
        torch.rand(N, generator=g),
    )
    index, dist, hit = codebook(keys, radii.tolist(), kind).lookup(q)
    d = distance(q, keys, kind)  # (B, N)
    for b in range(B):
        j = int(index[b])
        assert 0 <= j < N and d[b, j] <= d[b].min() + 1e-6, (
            f"query {b}: the nearest key ({kind}) is {int(d[b].argmin())} at {d[b].min():.5f}; got entry {j}"
        )
        assert dist[b].item() == pytest.approx(d[b, j].item(), abs=1e-5), (
            f"query {b}: dist must be d(q, k_j) = {d[b, j]:.5f}; got {dist[b]:.5f}"
        )
        assert bool(hit[b]) == bool(dist[b] <= radii[j]), (
            f"query {b}: hit must be dist <= eps_j ({dist[b]:.5f} <= {radii[j]:.5f}); got {bool(hit[b])}"
        )


def test_half_precision_queries():
    cb = codebook([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], kind="cos")
    index, dist, hit = cb.lookup(torch.tensor([[1.0, 0.1], [0.1, 1.0]], dtype=torch.float16))
    assert (
        index.tolist() == [0, 1] and hit.tolist() == [True, True] and dist.dtype == torch.float32
    ), (
        f"fp16 queries (BLIP-2 on a GPU) are compared in float32 to the float32 keys; got {index}, {dist}, {hit}"
    )
