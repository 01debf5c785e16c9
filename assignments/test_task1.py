"""Task 1 (10 points): Eq. 3, the radius, in the direction of the paper's Appendix D.

eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)

python -m pytest assignments -m task1
"""

import math

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from balancedit import radius

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
SWAPPED = (
    "You weighted the distances the other way round, as the paper's main text prints Eq. 3. "
    "Appendix D (Eq. 10), the authors' code and the paper's own alpha ablation (the ball shrinks "
    "as alpha grows: I-Gen falls, Loc rises) all use alpha on d(Pos, k)."
)


def test_radius_on_a_hand_worked_case():
    got = radius(0.2, 1.0, 0.25)
    want = 0.25 * 0.2 + 0.75 * 1.0
    swapped = 0.75 * 0.2 + 0.25 * 1.0
    hint = ""
    if got == pytest.approx(swapped):
        hint = f" {SWAPPED}"
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
    d_pos = torch.tensor([0.2, 0.4])
    d_neg = torch.tensor([1.0, 0.8])
    eps = radius(d_pos, d_neg, 0.5)
    assert isinstance(eps, torch.Tensor) and eps.tolist() == pytest.approx([0.6, 0.6]), (
        "radius of tensors d_pos=[0.2, 0.4], d_neg=[1.0, 0.8] at alpha 0.5 must be the tensor "
        f"[0.6, 0.6]; got {eps}"
    )
    eps = radius(d_pos, d_neg, 0.25)
    hint = ""
    if eps.tolist() == pytest.approx([0.4, 0.5]):
        hint = f" {SWAPPED}"
    assert eps.tolist() == pytest.approx([0.8, 0.7]), (
        f"{EQ3}; at alpha 0.25 the tensors d_pos=[0.2, 0.4], d_neg=[1.0, 0.8] give "
        f"[0.8, 0.7], got {eps.tolist()}.{hint}"
    )


def test_radius_refuses_alpha_outside_0_1():
    for alpha in (-0.01, 1.01, math.nan):
        try:
            got = radius(0.1, 0.9, alpha)
        except ValueError as e:
            assert "alpha" in str(e), f"the ValueError for alpha = {alpha} mentions alpha; got {e}"
            continue
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
