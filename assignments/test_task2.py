"""Task 2 (10 points): the distance d(q, k) (paper Table 6) and the codebook's lookup, Eq. 1's
decision for each query.

d(q, k) = 1 - cos(q, k)  or  ||q - k||_2
j = argmin_k d(q, k),   dist = d(q, k_j),   hit = dist <= eps_j

python -m pytest assignments -m task2
"""

import math
import re

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
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
SEEDS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)  # seeds: nothing to shrink


# ---------------------------------------------------------------- distance (Table 6)


def test_cosine_distance_on_hand_worked_vectors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    d = distance(q, k, "cos")
    assert isinstance(d, torch.Tensor) and d.shape == (3, 2), (
        "distance returns one number per (query, key) pair, shape (B, N) = (3, 2); "
        f"got {getattr(d, 'shape', d)}"
    )
    s = 1 / math.sqrt(2)
    want = [[0.0, 1 - s], [1.0, 1 - s], [2.0, 1 + s]]
    assert d.flatten().tolist() == pytest.approx(sum(want, []), abs=1e-6), (
        "'cos' is 1 - cos(q, k), from 0 (same direction) to 2 (opposite); "
        f"want {want}, got {d.tolist()}"
    )


def test_euclidean_distance_on_hand_worked_vectors():
    q = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    k = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    d = distance(q, k, "euc")
    assert d.flatten().tolist() == pytest.approx([0.0, 3.0, 5.0, 4.0], abs=1e-6), (
        f"'euc' is ||q - k||_2 (paper Table 6); want [[0, 3], [5, 4]], got {d.tolist()}"
    )


def test_euclidean_distance_of_a_key_to_itself_is_exactly_zero():
    keys = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * 100
    diag = distance(keys, keys, "euc").diagonal()
    assert torch.all(diag == 0), (
        "d(k, k) must be exactly 0, or a query equal to a key misses a radius-0 entry; "
        f"got up to {diag.max():.3g}. torch.cdist's fast matrix-product form rounds for more "
        "than 25 vectors: ask for the exact one (compute_mode='donot_use_mm_for_euclid_dist') "
        "or compute the differences yourself"
    )


@FEW
@given(
    st.integers(0, 10_000),
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(1, 8),
    st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_distance_matches_its_definition(seed, B, N, D, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(dtype)
    k = torch.randn(N, D, generator=g).to(dtype)
    for metric in ("cos", "euc"):
        d = distance(q, k, metric)
        assert d.shape == (B, N) and d.dtype == torch.float32, (
            f"distance({metric!r}) must return (B, N) = {(B, N)} float32 for {dtype} inputs; "
            f"got {tuple(d.shape)} {d.dtype}"
        )
        for b in range(B):
            for n in range(N):
                qb = q[b].double().tolist()
                kn = k[n].double().tolist()
                if metric == "cos":
                    dot = sum(x * y for x, y in zip(qb, kn))
                    want = max(0.0, 1 - dot / (math.hypot(*qb) * math.hypot(*kn)))
                else:
                    want = math.dist(qb, kn)
                got = d[b, n].item()
                hint = ""
                if dtype == torch.float16:
                    hint = " (float16 inputs: compute in float32, cast with .float() first)"
                assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (
                    f"distance({metric!r}) of query {b} and key {n} ({dtype}): want {want:.6f}, "
                    f"got {got:.6f}{hint}"
                )


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_are_compared_in_float32(half):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(6, 64, generator=g).to(half)
    k = torch.randn(5, 64, generator=g).to(half)
    for metric in ("cos", "euc"):
        for keys, kind in ((k, f"{half} keys"), (k.float(), "float32 keys")):
            try:
                d = distance(q, keys, metric)
            except NotImplementedError:
                raise  # a stub: the task is not done yet
            except RuntimeError as e:
                pytest.fail(
                    f"distance({metric!r}) of {half} queries and {kind} raised {e!r}. A model in "
                    "half precision (BLIP-2 on a GPU) hands you its own dtype, while the "
                    "codebook's keys are float32: cast both to float32 before computing"
                )
            want = distance(q.float(), k.float(), metric)  # the same numbers, in float32
            gap = (d.float() - want).abs().max().item()
            assert d.dtype == torch.float32 and gap <= 1e-5, (
                f"distance({metric!r}) of {half} queries and {kind} must be computed in float32 "
                f"(cast with .float() first), as for float32 inputs: {half} keeps only 3 or 2 "
                f"decimal digits, so 1 - cos and the norms round off; got {d.dtype}, off by up "
                f"to {gap:.2g} from the float32 result"
            )


def test_cosine_distance_is_never_negative():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 3
    d = distance(x, x, "cos")
    assert d.min() >= 0, (
        f"1 - cos(q, q) rounds to a tiny negative number in float32 (got {d.min().item():.3g}); "
        "a distance is never negative: clamp it at 0"
    )


def test_a_zero_vector_is_at_cosine_distance_one_from_everything():
    keys = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    d = distance(torch.zeros(1, 3), keys, "cos")
    assert torch.isfinite(d).all() and d.flatten().tolist() == pytest.approx([1.0, 1.0]), (
        "a zero vector has no direction; normalising it must not divide by 0 (F.normalize has "
        f"an eps): its cosine distance to anything is 1; got {d.tolist()}"
    )


def test_unknown_distance_is_an_error():
    try:
        distance(torch.zeros(1, 2), torch.zeros(1, 2), "l1")
    except ValueError as e:
        assert re.search("cos.*euc", str(e)), (
            "the ValueError for an unknown metric names the allowed ones, 'cos' then 'euc'; "
            f"got {e}"
        )
    else:
        pytest.fail("distance(q, k, 'l1'): an unknown metric is a ValueError")


# ---------------------------------------------------------------- lookup (Eq. 1)


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


@SEEDS
@given(
    st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 7), st.sampled_from(["cos", "euc"])
)
def test_lookup_agrees_with_distance(seed, B, N, metric):
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
