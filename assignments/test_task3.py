"""Task 3 (25 points): the key (the mean over the prompt, or its last position) and the routing
hooks of Eq. 1. The rules for holding a route while a model decodes are graded in
test_task3_hold.py.

f^l(h) = v_j(h)  if d(q, k_j) <= eps_j, j = argmin_k d(q, k);   else l(h), bit for bit

python -m pytest assignments -m task3
"""

import re

import pytest
import torch
import torch.nn as nn
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from toys import FlatToy, changed_copy, clear_cut, decide, fc2_input, query_of, route_message

from balancedit import Codebook, Router, new_value, prompt_key
from baselines import GraceRouter, Vector

pytestmark = pytest.mark.task3
FEW = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)  # seeds: nothing to shrink


# ---------------------------------------------------------------- the key


def test_prompt_key_on_a_hand_worked_case():
    h = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [1e6, 1e6]],  # row 0: the last position is padding
            [[1e6, -1e6], [2.0, 0.0], [4.0, 2.0]],  # row 1: the first position is padding
        ]
    )
    mask = torch.tensor([[True, True, False], [False, True, True]])
    q = prompt_key(h, mask)
    assert isinstance(q, torch.Tensor) and q.shape == (2, 2), (
        f"one key per row: (B, D) = (2, 2); got {getattr(q, 'shape', q)}"
    )
    assert q.flatten().tolist() == pytest.approx([2.0, 3.0, 3.0, 1.0]), (
        "the key is the mean of h over each row's PROMPT positions only (never padding or the "
        f"answer); want [[2, 3], [3, 1]], got {q.tolist()}"
    )


def test_prompt_key_is_float32_for_half_precision_inputs():
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)).half()
    mask = torch.ones(2, 5, dtype=torch.bool)
    q = prompt_key(h, mask)
    assert q.dtype == torch.float32, (
        f"keys are float32 whatever the model's dtype (fp16 sums lose digits); got {q.dtype}"
    )
    torch.testing.assert_close(
        q, h.float().mean(dim=1), msg="the mean over 5 prompt positions of an fp16 h"
    )


def test_a_row_without_prompt_positions_has_a_nan_key():
    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    q = prompt_key(h, mask)
    assert torch.equal(q[0], h[0, 0]) and torch.isnan(q[1]).all(), (
        "a row with no prompt position (a KV-cache decoding step) has no key: 0 / 0 = NaN, which "
        f"never hits (task 2) and must not raise; got {q.tolist()}"
    )


def test_prompt_key_last_is_h_at_each_rows_last_prompt_position():
    h = torch.arange(30.0).view(3, 5, 2).half()  # fp16 in, float32 out
    mask = torch.tensor(
        [
            [False, True, True, False, False],  # row 0: padding, the prompt, then the answer
            [False, False, True, True, True],  # row 1: padding, then the prompt
            [False, False, False, False, False],  # row 2: a decoding step, no prompt position
        ]
    )
    q = prompt_key(h, mask, pool="last")
    assert isinstance(q, torch.Tensor) and q.shape == (3, 2) and q.dtype == torch.float32, (
        "pool='last' still gives one float32 key per row, (B, D) = (3, 2); "
        f"got {getattr(q, 'shape', q)}"
    )
    want = h[[0, 1], [2, 4]].float()  # row 0: position 2, row 1: position 4
    mistakes = {
        "h at position -1, the last non-padding position (here the answer)": h[0, -1],
        "the mean over the prompt (pool ignored)": h[0, 1:3].float().mean(dim=0),
        "the FIRST prompt position": h[0, 1],
    }
    seen = ""
    for name, wrong in mistakes.items():
        if torch.equal(q[0], wrong.float()):
            seen = f"; your row 0 is {name}"
    assert torch.equal(q[:2], want), (
        "pool='last': the key is h at each row's LAST PROMPT position (one position: never the "
        f"padding on its left nor the answer after it); want {want.tolist()}, "
        f"got {q[:2].tolist()}{seen}"
    )
    assert torch.isnan(q[2]).all(), (
        "a row with no prompt position has no key with pool='last' either: NaN (never hits), "
        f"got {q[2].tolist()}"
    )


def test_an_unknown_pool_is_an_error():
    h = torch.randn(1, 3, 2)
    mask = torch.ones(1, 3, dtype=torch.bool)
    try:
        got = prompt_key(h, mask, pool="max")
    except ValueError as e:
        assert re.search("mean.*last", str(e)), (
            "the ValueError for an unknown pool names the allowed ones, 'mean' then 'last'; "
            f"got {e}"
        )
        return
    pytest.fail(
        "prompt_key(h, prompt, pool='max'): an unknown pool is a ValueError naming 'mean' and "
        f"'last' (a silent mean would hide a typo such as 'Last'); got {got}"
    )


# ---------------------------------------------------------------- the routing hook


def layer_error(e: RuntimeError, D_in: int, D_out: int) -> str:
    return (
        f"the routed model raised {e!r}. A shape error here often means the value was called on "
        f"the wrong tensor: v_j takes layer l's INPUT h = args[0] (width {D_in} here), not its "
        f"output out (width {D_out}). A dtype error: the values are float32 (see new_value); call "
        "v_j(h.float()) and cast the result back to out.dtype"
    )


@FEW
@given(
    st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["cos", "euc"])
)
def test_each_sample_is_routed_on_its_own_key(seed, B, T, metric):
    torch.manual_seed(seed)
    model = FlatToy()
    x = torch.randn(B, T, 4)
    mask = torch.rand(B, T) < 0.7
    mask[:, 0] = True  # every row has a prompt position
    plain = model(x, prompt_mask=mask)
    h = fc2_input(model, x)
    # (B, F): the mean over each row's prompt
    keys = torch.stack([h[b][mask[b]].mean(dim=0) for b in range(B)])
    assume(metric == "euc" or keys[0].norm() > 1e-3)
    cb = Codebook(metric)
    cb.add(keys[0], changed_copy(model.fc2, seed), 1e-4, "a")  # row 0 hits entry 0
    cb.add(torch.randn(6), changed_copy(model.fc2, seed + 1), 0.05, "b")
    assume(clear_cut(keys, cb))
    want = decide(keys, cb)[0].tolist()  # row 0: entry 0; the others as their keys fall
    with Router(model, "fc2", cb) as router:
        try:
            out = model(x, prompt_mask=mask)
        except NotImplementedError:
            raise  # a stub: the task is not done yet
        except RuntimeError as e:
            pytest.fail(layer_error(e, 6, 4))
    assert router.last_query is not None and router.last_query.shape == (B, 6), (
        "route must set router.last_query, the (B, D) query of each row"
    )
    torch.testing.assert_close(
        router.last_query,
        keys,
        msg=lambda m: (
            "router.last_query must be prompt_key of the layer's input over each row's prompt, "
            f"per row (the layer sees (B*T, D)): {m}"
        ),
    )
    got = None if router.last_index is None else router.last_index.tolist()
    assert got == want, route_message(want, got, keys, cb) if got else "set router.last_index"
    index = router.last_index
    for b in range(B):
        if index[b] < 0:
            assert torch.equal(out[b], plain[b]), (
                f"row {b} is out of scope (last_index -1): its output must be the unedited "
                "model's, bit for bit (do not send it through a value, do not recompute it)"
            )
        else:
            value = cb.values[int(index[b])]
            want = value(h[b].reshape(-1, 6)).view(T, 4) + x[b]  # (T, D)
            torch.testing.assert_close(
                out[b],
                want,
                msg=lambda m: (
                    f"row {b} hits entry {int(index[b])}: layer l's output must be v_j(h) for "
                    f"that row, at every position: {m}"
                ),
            )


@FEW
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_a_layer_that_sees_one_row_per_sample(seed, B):
    """Without a prompt mask, each row of a 2-D input is one sample (no mean over positions)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    x = torch.randn(B, 5)
    plain = model(x)
    h = torch.tanh(model[0](x))  # (B, 8): the input of layer "2"
    cb = Codebook("euc")
    cb.add(h[0], changed_copy(model[2], seed), 0.0, "a")  # sits exactly on row 0's key
    cb.add(torch.randn(8), changed_copy(model[2], seed + 1), float(torch.rand(())), "b")
    assume(clear_cut(h, cb))
    want = decide(h, cb)[0].tolist()  # row 0: entry 0; the others as their inputs fall
    with Router(model, "2", cb) as router:
        out = model(x)
    got = None if router.last_index is None else router.last_index.tolist()
    assert got == want, route_message(want, got, h, cb) if got else "set router.last_index"
    with torch.no_grad():
        for b, j in enumerate(want):
            if j < 0:
                assert torch.equal(out[b], plain[b]), (
                    f"row {b} misses: its output must be the plain model's, bit for bit"
                )
                continue
            value = cb.values[j]
            on_output = model[3](value(model[2](h[b])))
            hint = ""
            if torch.allclose(out[b], on_output):
                hint = (
                    ": you applied v_j to the layer's OUTPUT l(h); Eq. 1 replaces l(h) by v_j(h), "
                    "so the value takes the layer's INPUT, args[0]"
                )
            assert torch.allclose(out[b], model[3](value(h[b])), atol=1e-6), (
                f"row {b} hits entry {j}: layer l's output must be v_j(h) for that row{hint}"
            )
    assert torch.equal(model(x), plain), "leaving the `with Router(...)` block must remove the hook"


def test_a_hit_replaces_the_layer_by_the_value_of_its_input():
    torch.manual_seed(0)
    model = FlatToy(D=4, F=4)  # fc2 maps 4 -> 4: its input and output have the same width
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    h = fc2_input(model, x)  # (B, T, F)
    cb = Codebook("euc")
    cb.add(h[0].mean(dim=0), changed_copy(model.fc2, 1), 1e-4, "row 0's edit")
    with Router(model, "fc2", cb):
        out = model(x, prompt_mask=mask)
    value = cb.values[0]
    with torch.no_grad():
        want = value(h[0]) + x[0]  # Eq. 1: v_j(h) in place of l(h)
        on_output = value(model.fc2(h[0])) + x[0]
    hint = ""
    if torch.allclose(out[0], on_output):
        hint = (
            ": you applied v_j to the layer's OUTPUT l(h); Eq. 1 replaces l(h) by v_j(h), so the "
            "value takes the layer's INPUT h = args[0], the same h as the key"
        )
    assert torch.allclose(out[0], want, atol=1e-6), (
        f"row 0 hits entry 0: layer l's output must be v_0(h) at every position{hint}"
    )


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_model_routes_through_float32_values(half):
    torch.manual_seed(0)
    model = FlatToy().to(half)  # BLIP-2 runs in fp16 or bf16 on a GPU
    x = torch.randn(2, 3, 4).to(half)
    mask = torch.ones(2, 3, dtype=torch.bool)
    plain = model(x, prompt_mask=mask)
    cb = Codebook("cos")
    cb.add(query_of(model, x, mask)[0], changed_copy(model.fc2, 1), 1e-4, "row 0's edit")
    value = cb.values[0]  # float32, as new_value makes every value (Adam needs it)
    with Router(model, "fc2", cb) as router:
        try:
            out = model(x, prompt_mask=mask)
        except NotImplementedError:
            raise  # a stub: the task is not done yet
        except RuntimeError as e:
            pytest.fail(
                f"a {half} model with a float32 value raised {e!r}: the hook gets h in the model's "
                "dtype, the values are float32 (new_value). Call v_j(h.float()) and cast its "
                "output back to out.dtype"
            )
    assert router.last_index.tolist() == [0, -1], (
        f"row 0 sits on entry 0's key; want last_index [0, -1], got {router.last_index.tolist()}"
    )
    with torch.no_grad():
        h = fc2_input(model, x[0]).float()  # (T, F)
        want = value(h).to(half) + x[0]
    assert out.dtype == half and torch.equal(out[1], plain[1]), (
        f"the model's output stays {half} (got {out.dtype}), and row 1, which misses, keeps it "
        "bit for bit"
    )
    torch.testing.assert_close(
        out[0],
        want,
        msg=lambda m: (
            f"row 0 hits: its output is v_0(h) computed in float32 (h.float()), then cast back to "
            f"{half}: {m}"
        ),
    )


def test_with_no_hit_the_output_is_untouched():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(3, 4, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    plain = model(x, prompt_mask=mask)
    cb = Codebook("euc")
    cb.add(torch.full((6,), 100.0), changed_copy(model.fc2, 0), 1.0, "far away")
    with Router(model, "fc2", cb) as router:
        assert torch.equal(model(x, prompt_mask=mask), plain), (
            "no row hits: the model's output must not change at all"
        )
        assert router.last_index.tolist() == [-1, -1, -1], (
            "router.last_index is -1 for a row that uses layer l itself; "
            f"got {router.last_index.tolist()}"
        )


def test_an_empty_or_emptied_codebook_is_the_plain_model():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    plain = model(x, prompt_mask=mask)
    cb = Codebook()
    with Router(model, "fc2", cb):
        assert torch.equal(model(x, prompt_mask=mask), plain), (
            "an empty codebook must leave the model as it is"
        )
        keys = query_of(model, x, mask)
        cb.add(keys[0], changed_copy(model.fc2, 1), 0.5, "a")
        cb.add(keys[1], changed_copy(model.fc2, 2), 0.5, "b")
        assert not torch.equal(model(x, prompt_mask=mask), plain), (
            "both rows sit on an entry's key: the edits must act"
        )
        cb.remove(1)
        cb.remove(0)
        assert torch.equal(model(x, prompt_mask=mask), plain), (
            "with every edit removed the model must be as before"
        )


def test_the_key_ignores_padding_and_batch_mates():
    torch.manual_seed(0)
    model = FlatToy()
    alone = torch.randn(1, 3, 4)
    q_alone = query_of(model, alone, torch.ones(1, 3, dtype=torch.bool))[0]
    x = torch.randn(3, 6, 4) * 50  # the same sample as row 1, padded to 6 positions with garbage
    x[1, :3] = alone[0]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :3] = True
    mask[2, :] = True
    q = query_of(model, x, mask)
    torch.testing.assert_close(
        q[1],
        q_alone,
        rtol=1e-6,
        atol=1e-6,
        msg=lambda m: (
            "a sample's key must be the same alone and padded inside a batch: average over its "
            f"prompt positions only (the prompt mask), row by row: {m}"
        ),
    )


def test_router_with_pool_last_routes_on_the_last_prompt_position():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(3, 5, 4)
    mask = torch.tensor(
        [
            [False, True, True, False, False],  # padding, the prompt, then the answer
            [True, True, True, True, False],
            [False, False, True, True, True],
        ]
    )
    plain = model(x, prompt_mask=mask)
    h = fc2_input(model, x)  # (3, 5, 6)
    keys = h[[0, 1, 2], [2, 3, 4]]  # (3, 6): each row's last prompt position
    step = torch.randn(3, 1, 4) * 10  # a decoding step (prompt_mask all False)
    cb = Codebook("euc")
    cb.add(keys[0], changed_copy(model.fc2, 1), 1e-4, "a")  # row 0 hits entry 0
    cb.add(h[1, -1], changed_copy(model.fc2, 2), 1e-4, "row 1's answer position: a wrong query")
    step_in = fc2_input(model, step)[2, 0]
    cb.add(step_in, changed_copy(model.fc2, 3), 1e-4, "row 2's step alone: no query")
    with Router(model, "fc2", cb, pool="last") as router:
        out = model(x, prompt_mask=mask)
        assert router.last_query is not None and router.last_query.shape == (3, 6), (
            "route must set router.last_query, the (B, D) query of each row"
        )
        torch.testing.assert_close(
            router.last_query,
            keys,
            msg=lambda m: (
                "with Router(..., pool='last') the query is the layer's input at each row's last "
                "prompt position (not position -1: rows 0 and 1 end with an answer); the mean "
                f"instead? pass self.pool on to prompt_key: {m}"
            ),
        )
        assert router.last_index.tolist() == [0, -1, -1], (
            "pool='last': row 0's last prompt position is entry 0's key, and no row's is another "
            "entry's (entry 1 sits on row 1's answer position, position -1); want last_index "
            f"[0, -1, -1], got {router.last_index.tolist()}"
        )
        torch.testing.assert_close(out[0], cb.values[0](h[0]) + x[0])
        assert torch.equal(out[1:], plain[1:]), (
            "rows 1 and 2 miss: their output must be the plain model's, bit for bit"
        )
        model(step, prompt_mask=torch.zeros(3, 1, dtype=torch.bool))
        assert router.last_index.tolist() == [0, -1, -1], (
            "a decoding step holds the route its prompt chose with pool='last' too: the new token "
            f"is no prompt position (its query is NaN); want [0, -1, -1], "
            f"got {router.last_index.tolist()}"
        )


def test_a_mask_that_does_not_fit_the_layer_input_is_an_error():
    model = FlatToy()
    cb = Codebook()
    cb.add(torch.randn(6), new_value(model.fc2), 0.1, "a")
    with Router(model, "fc2", cb):
        try:
            model(torch.randn(2, 3, 4), prompt_mask=torch.ones(2, 4, dtype=torch.bool))
        except ValueError as e:
            assert "layout" in str(e), (
                f"the ValueError for a mask that does not fit says 'layout'; got {e}"
            )
            return
        except NotImplementedError:
            raise  # a stub: the task is not done yet
        except Exception as e:
            pytest.fail(
                f"a (2, 4) prompt mask for a (2, 3) batch (the layer sees 6 rows, the mask has 8 "
                f"positions) must be a ValueError mentioning the layout; got {e!r}"
            )
    pytest.fail(
        "a (2, 4) prompt mask for a (2, 3) batch does not fit the layer's 6 rows: raise a "
        "ValueError mentioning the layout (routing on it would mix up the samples)"
    )


# ---------------------------------------------------------------- GRACE's hook (baselines)


def test_grace_keys_on_the_last_prompt_position_and_writes_there_only():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 4, 4)
    # The prompt, then the answer.
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    plain = model(x, prompt_mask=mask)
    h = fc2_input(model, x)  # (2, 4, 6)
    cb = Codebook("euc")
    # GRACE's key: row 0's last prompt position.
    cb.add(h[0, 1], Vector(model.fc2, torch.ones(4)), 1e-5, "a")
    with GraceRouter(model, "fc2", cb) as router:
        out = model(x, prompt_mask=mask)
        assert router.last_index.tolist() == [0, -1], (
            "GRACE's query is layer l's input at each row's LAST prompt position (not a mean); "
            "row 0's is entry 0's key, row 1's is not: want last_index [0, -1], "
            f"got {router.last_index.tolist()}"
        )
    torch.testing.assert_close(
        out[0, 1],
        torch.ones(4) + x[0, 1],
        msg=lambda m: (
            "a hit replaces layer l's output at the key position by the entry's vector v "
            f"(cb.values[j].v): {m}"
        ),
    )
    assert torch.equal(out[0, [0, 2, 3]], plain[0, [0, 2, 3]]), (
        "GRACE writes at the key position only: the other positions of a hit row keep layer l's "
        "output"
    )
    assert torch.equal(out[1], plain[1]), "a row that misses keeps layer l's output, bit for bit"


def test_grace_leaves_decoding_steps_alone():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(1, 3, 4)
    cb = Codebook("euc")
    cb.add(fc2_input(model, x)[0, 2], Vector(model.fc2, torch.ones(4)), 1e-5, "a")
    plain_step = model(x[:, 2:3])
    with GraceRouter(model, "fc2", cb) as router:
        model(x, prompt_mask=torch.ones(1, 3, dtype=torch.bool))
        assert router.last_index.tolist() == [0], (
            f"the prompt's last position is entry 0's key; got {router.last_index}"
        )
        step = model(x[:, 2:3], prompt_mask=torch.zeros(1, 1, dtype=torch.bool))
        assert router.last_index.tolist() == [-1] and torch.equal(step, plain_step), (
            "a decoding step has no prompt position, so GRACE has no query there: no edit, the "
            "layer's own output (GRACE edits the answer's first token only)"
        )
