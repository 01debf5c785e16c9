"""Task 6 (10 points): the metrics of the paper's Appendix C.

token accuracy = mean over samples of (matching tokens / the sample's tokens), in %
HM = 3 / (1 / T-Gen + 1 / I-Gen + 1 / Loc)

python -m pytest assignments -m task6
"""

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from evaluate import hm, summarize, token_accuracy

pytestmark = pytest.mark.task6
FEW = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)
scores = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)


# ---------------------------------------------------------------- token accuracy


def test_token_accuracy_averages_over_samples_not_tokens():
    got = token_accuracy([[1, 2, 3, 4], [5]], [[1, 2, 3, 4], [6]])
    hint = ""
    if got == pytest.approx(80.0):
        hint = " (that is 4 of 5 tokens: pooled over tokens)"
    assert got == pytest.approx(50.0), (
        "token accuracy is the mean over SAMPLES of each sample's fraction of right tokens "
        "(Appendix C): a 4-token answer all right (1.0) and a 1-token answer wrong (0.0) give "
        f"50%; got {got}{hint}"
    )


def test_token_accuracy_is_in_percent():
    assert token_accuracy([[7, 8]], [[7, 8]]) == pytest.approx(100.0), (
        "all tokens right is 100 (percent, not 1.0)"
    )
    assert token_accuracy([[7, 8]], [[8, 7]]) == pytest.approx(0.0), (
        "tokens compare position by position"
    )
    assert token_accuracy([[1, 2, 3]], [[1, 0, 3]]) == pytest.approx(200 / 3), (
        "2 of 3 tokens right is 66.67%"
    )


def test_token_accuracy_of_no_samples_is_none():
    assert token_accuracy([], []) is None, (
        "no samples: nothing was measured, return None (not 0, not an error)"
    )


@pytest.mark.parametrize(
    "predicted, reference, what",
    [
        ([[1, 2]], [[1]], "a sample whose predicted and reference tokens differ in length"),
        ([[1]], [[1], [2]], "lists of different numbers of samples"),
        ([[]], [[]], "a sample with no token"),
    ],
    ids=["lengths", "samples", "empty"],
)
def test_token_accuracy_refuses_what_cannot_be_compared(predicted, reference, what):
    try:
        got = token_accuracy(predicted, reference)
    except AssertionError:
        return
    except NotImplementedError:
        raise  # a stub: the task is not done yet
    except Exception as e:
        got = e
    pytest.fail(
        f"token_accuracy({predicted}, {reference}): {what} is a bug in the caller, not a score; "
        f"check with assert, so that it raises AssertionError (got {got!r})"
    )


@FEW
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    )
)
def test_token_accuracy_matches_its_definition(samples):
    predicted = [[p for p, _ in s] for s in samples]
    reference = [[r for _, r in s] for s in samples]
    fractions = [sum(p == r for p, r in s) / len(s) for s in samples]
    want = 100 * sum(fractions) / len(fractions)
    assert token_accuracy(predicted, reference) == pytest.approx(want), (
        f"token_accuracy({predicted}, {reference}): the mean of the per-sample fractions "
        f"{fractions}, in %, is {want}"
    )


# ---------------------------------------------------------------- the harmonic mean


def test_hm_on_a_hand_worked_case():
    got = hm(100.0, 50.0, 25.0)
    want = 3 / (1 / 100 + 1 / 50 + 1 / 25)
    hint = ""
    if got == pytest.approx(175 / 3):
        hint = " (that is the arithmetic mean, which hides a weak metric behind two strong ones)"
    assert got == pytest.approx(want), (
        "HM is the harmonic mean 3 / (1/T-Gen + 1/I-Gen + 1/Loc): "
        f"hm(100, 50, 25) = {want:.4f}; got {got}{hint}"
    )


def test_hm_of_a_zero_is_zero_and_of_a_missing_score_is_none():
    try:
        got = hm(100.0, 0.0, 80.0)
    except ZeroDivisionError:
        got = "a ZeroDivisionError"
    assert got == 0.0, (
        "a metric at 0 makes HM 0 (the formula's limit: 1/0 is infinite), so check for a 0 "
        f"before dividing; hm(100, 0, 80) gave {got}"
    )
    assert hm(None, 50.0, 80.0) is None and hm(50.0, 80.0, None) is None, (
        "a metric that was not measured (None) gives HM None"
    )


@FEW
@given(scores, scores, scores)
def test_hm_lies_between_the_smallest_score_and_the_arithmetic_mean(a, b, c):
    got = hm(a, b, c)
    assert min(a, b, c) * (1 - 1e-9) <= got <= (a + b + c) / 3 * (1 + 1e-9), (
        f"the harmonic mean lies between min and the arithmetic mean: hm({a}, {b}, {c}) = {got}"
    )
    assert hm(a, a, a) == pytest.approx(a), (
        f"the mean of three equal scores is that score: hm({a}, {a}, {a})"
    )


def test_a_method_result_is_the_hm_of_the_averaged_metrics():
    rows = [
        dict(acc=100.0, t_gen=100.0, i_gen=100.0, loc=20.0, m_loc=100.0),
        dict(acc=100.0, t_gen=100.0, i_gen=0.0, loc=100.0, m_loc=100.0),
    ]
    got = summarize(rows, None)["hm"]
    assert got == pytest.approx(hm(100.0, 50.0, 60.0)), (
        "the table's HM is the HM of the averaged T-Gen, I-Gen and Loc (100, 50, 60), as in the "
        f"paper; got {got}"
    )
