"""Task 1 (10 points): the distance d(q, k) and the radius of Eq. 3.

python -m pytest assignments -m task1
"""

import math
import re

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from balancedit import distance, radius

pytestmark = pytest.mark.task1
FEW = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
dists = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
alphas = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
EQ3 = (
    "Eq. 3 as Appendix D (Eq. 10) of the paper and the authors' code write it: "
    "eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)"
)


# ---------------------------------------------------------------- distance


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


# ---------------------------------------------------------------- radius (Eq. 3)


def test_radius_on_a_hand_worked_case():
    got = radius(0.2, 1.0, 0.25)
    want = 0.25 * 0.2 + 0.75 * 1.0
    swapped = 0.75 * 0.2 + 0.25 * 1.0
    hint = ""
    if got == pytest.approx(swapped):
        hint = (
            " You weighted the distances the other way round, as the paper's main text prints "
            "Eq. 3. Appendix D (Eq. 10), the authors' code and the paper's own alpha ablation (the "
            "ball shrinks as alpha grows: I-Gen falls, Loc rises) all use alpha on d(Pos, k)."
        )
    assert got == pytest.approx(want), (
        f"{EQ3}; radius(d_pos=0.2, d_neg=1.0, alpha=0.25) must be {want}, got {got}.{hint}"
    )


@given(dists, dists)
@FEW
def test_radius_endpoints(d_pos, d_neg):
    for alpha, want, name in (
        (0.0, d_neg, "d(Neg, k): the widest ball that keeps the negative out"),
        (1.0, d_pos, "d(Pos, k): the smallest ball that holds the positive"),
    ):
        got = radius(d_pos, d_neg, alpha)
        assert got == want, (
            f"{EQ3}, so alpha = {alpha} gives exactly {name}; radius({d_pos}, {d_neg}, {alpha}) "
            f"must be {want}, got {got} (if you swapped the weights, see Appendix D, Eq. 10)"
        )


@given(dists, dists, alphas)
@example(1.9276770919476018, 1.9276770919476018, 0.603185627961383)
@example(1e-10, 1.0, 0.99999999)
@FEW
def test_radius_lies_between_the_two_distances(d_pos, d_neg, alpha):
    for kind, a, b in (
        ("float", d_pos, d_neg),
        ("float32 tensor", torch.tensor([d_pos]), torch.tensor([d_neg])),
    ):
        eps = radius(a, b, alpha)
        assert min(a, b) <= eps <= max(a, b), (
            f"the radius must lie between d(Pos, k) and d(Neg, k); got eps={eps} for d_pos={a}, "
            f"d_neg={b}, alpha={alpha} ({kind}). In floating point the weighted sum can step just "
            "outside: clamp it"
        )


@given(dists, dists, alphas, alphas)
@example(0.8408483326276716, 1.9762294576490569, 0.34365159365776776, 0.3436515936577678)
@FEW
def test_radius_shrinks_as_alpha_grows(a, b, alpha1, alpha2):
    d_pos = min(a, b)  # the positive is nearer the key than the negative
    d_neg = max(a, b)
    lo = min(alpha1, alpha2)
    hi = max(alpha1, alpha2)
    for x, y in ((d_pos, d_neg), (torch.tensor(d_pos), torch.tensor(d_neg))):
        small = float(radius(x, y, lo))  # the radius at the smaller alpha: the larger ball
        large = float(radius(x, y, hi))
        if large - small > 1e-6 * max(1.0, d_neg):
            why = (
                "it grows: the weights are swapped (the paper's main text); see Appendix D (Eq. 10)"
            )
        else:
            why = (
                "alpha * d_pos + (1 - alpha) * d_neg rounds differently for neighbouring alphas; "
                "d_neg + alpha * (d_pos - d_neg) is the same number and monotone in alpha"
            )
        assert small >= large, (
            "as alpha grows the ball must shrink from d(Neg, k) towards d(Pos, k) (paper Fig. 5: "
            f"I-Gen falls, Loc rises); got radius(alpha={lo}) = {small} < radius(alpha={hi}) = "
            f"{large}: {why}"
        )


def test_radius_works_elementwise_on_tensors():
    eps = radius(torch.tensor([0.2, 0.4]), torch.tensor([1.0, 0.8]), 0.5)
    assert isinstance(eps, torch.Tensor) and eps.tolist() == pytest.approx([0.6, 0.6]), (
        "radius of tensors d_pos=[0.2, 0.4], d_neg=[1.0, 0.8] at alpha 0.5 must be the tensor "
        f"[0.6, 0.6]; got {eps}"
    )


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan])
def test_radius_refuses_alpha_outside_0_1(alpha):
    try:
        got = radius(0.1, 0.9, alpha)
    except ValueError as e:
        assert "alpha" in str(e), f"the ValueError for alpha = {alpha} mentions alpha; got {e}"
        return
    nan = ""
    if alpha != alpha:
        nan = (
            ": NaN < 0 and NaN > 1 are both False, so refuse what is not in the range, "
            "`not 0 <= alpha <= 1`"
        )
    pytest.fail(
        f"radius(0.1, 0.9, alpha={alpha}) must raise a ValueError (alpha outside [0, 1], NaN "
        f"included{nan}); got {got}"
    )
