"""balancedit.py's routing half: distances, Eq. 3, the codebook, the values, and the Eq. 1
forward hook (bit-for-bit equivalence out of scope, held routes)."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import models
from balancedit import (
    Codebook,
    LoRAValue,
    Router,
    distance,
    new_value,
    override,
    prompt_key,
    radius,
)
from baselines import GraceRouter, Vector

dists = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
alphas = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- Eq. 3


@given(dists, dists, alphas)
@example(
    1.9276770919476018, 1.9276770919476018, 0.603185627961383
)  # alpha*d + (1-alpha)*d > d in floats
@example(1e-10, 1.0, 0.99999999)  # float32: d_neg + alpha*(d_pos - d_neg) rounds to 0 < d_pos
def test_radius_between_the_two_distances(d_pos, d_neg, alpha):
    eps = radius(d_pos, d_neg, alpha)
    assert min(d_pos, d_neg) <= eps <= max(d_pos, d_neg)
    t_pos, t_neg = torch.tensor([d_pos]), torch.tensor([d_neg])
    t_eps = radius(t_pos, t_neg, alpha)
    assert torch.minimum(t_pos, t_neg) <= t_eps <= torch.maximum(t_pos, t_neg)


@given(dists, dists)
def test_radius_endpoints_exact(d_pos, d_neg):
    assert radius(d_pos, d_neg, 0.0) == d_neg
    assert radius(d_pos, d_neg, 1.0) == d_pos
    t_pos, t_neg = torch.tensor([d_pos]), torch.tensor([d_neg])
    assert torch.equal(radius(t_pos, t_neg, 0.0), t_neg)
    assert torch.equal(radius(t_pos, t_neg, 1.0), t_pos)


@given(dists, dists, alphas, alphas)
@example(
    0.8408483326276716, 1.9762294576490569, 0.34365159365776776, 0.3436515936577678
)  # two-product form fails
def test_radius_shrinks_towards_the_positive_as_alpha_grows(a, b, a1, a2):
    d_pos, d_neg = min(a, b), max(a, b)
    lo, hi = min(a1, a2), max(a1, a2)
    assert radius(d_pos, d_neg, lo) >= radius(d_pos, d_neg, hi)
    t_pos, t_neg = torch.tensor(d_pos), torch.tensor(d_neg)
    assert radius(t_pos, t_neg, lo) >= radius(t_pos, t_neg, hi)


def test_radius_golden_and_convention():
    # Eq. 3 as implemented: eps = alpha * d_pos + (1 - alpha) * d_neg
    assert radius(0.2, 1.0, 0.25) == pytest.approx(0.25 * 0.2 + 0.75 * 1.0)
    assert radius(
        torch.tensor([0.2, 0.4]), torch.tensor([1.0, 0.8]), 0.5
    ).tolist() == pytest.approx([0.6, 0.6])


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan, math.inf])
def test_radius_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        radius(0.1, 0.9, alpha)


# ---------------------------------------------------------------- distances


@FAST
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 6), st.integers(1, 8))
def test_distance_matches_naive_loop(seed, B, N, D):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)
    cos, euc = distance(q, k, "cos"), distance(q, k, "euc")
    assert cos.shape == euc.shape == (B, N) and cos.dtype == euc.dtype == torch.float32
    for b in range(B):
        for n in range(N):
            qb, kn = q[b].tolist(), k[n].tolist()
            dot = sum(x * y for x, y in zip(qb, kn))
            nq, nk = math.sqrt(sum(x * x for x in qb)), math.sqrt(sum(y * y for y in kn))
            assert cos[b, n].item() == pytest.approx(max(0.0, 1 - dot / (nq * nk)), abs=1e-5)
            assert euc[b, n].item() == pytest.approx(math.dist(qb, kn), rel=1e-5, abs=1e-5)


def test_distance_kind_is_checked():
    with pytest.raises(ValueError, match="cos.*euc"):
        distance(torch.zeros(1, 2), torch.zeros(1, 2), "l1")
    with pytest.raises(ValueError, match="cos.*euc"):
        Codebook("manhattan")


# ---------------------------------------------------------------- codebook


def _codebook(keys, radii, kind="euc", layer=None):
    layer = layer if layer is not None else nn.Linear(keys.shape[1], 3)
    cb = Codebook(kind)
    for i, (k, r) in enumerate(zip(keys, radii)):
        assert cb.add(k, new_value(layer), float(r), f"t{i}") == i
    return cb


@FAST
@given(
    st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 7), st.sampled_from(["cos", "euc"])
)
def test_lookup_picks_the_nearest_key(seed, B, N, kind):
    g = torch.Generator().manual_seed(seed)
    keys, q = torch.randn(N, 4, generator=g), torch.randn(B, 4, generator=g)
    radii = torch.rand(N, generator=g) * 2
    cb = _codebook(keys, radii, kind)
    index, dist, hit = cb.lookup(q)
    d = distance(q, keys, kind)  # (B, N)
    assert torch.equal(dist, d.min(dim=1).values)
    assert torch.equal(d[torch.arange(B), index], dist)
    assert torch.equal(hit, dist <= radii[index])


def test_empty_codebook_misses_everything():
    index, dist, hit = Codebook().lookup(torch.randn(3, 5))
    assert (
        index.tolist() == [-1, -1, -1]
        and dist.tolist() == [math.inf] * 3
        and hit.tolist() == [False] * 3
    )


def test_lookup_golden_2d_euclidean():
    cb = _codebook(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), [1.0, 0.5], "euc")
    q = torch.tensor([[0.5, 0.0], [2.8, 0.0], [1.5, 0.0], [3.0, 0.6]])
    index, dist, hit = cb.lookup(q)
    assert index.tolist() == [0, 1, 0, 1]  # (1.5, 0) is a tie at 1.5: the first key wins
    assert dist.tolist() == pytest.approx([0.5, 0.2, 1.5, 0.6], abs=1e-6)
    assert hit.tolist() == [True, True, False, False]


def test_codebook_mutation_and_validation():
    cb = _codebook(torch.eye(3), [0.1, 0.2, 0.3])
    assert len(cb) == 3 and cb.targets == ["t0", "t1", "t2"] and cb.keys.shape == (3, 3)
    cb.remove(1)
    assert len(cb) == len(cb.values) == 2 and cb.targets == ["t0", "t2"]
    assert cb.radii.tolist() == pytest.approx([0.1, 0.3]) and torch.equal(
        cb.keys, torch.eye(3)[[0, 2]]
    )
    with pytest.raises(IndexError):
        cb.remove(2)
    with pytest.raises(ValueError, match="3 numbers"):
        cb.add(torch.zeros(4), nn.Identity(), 0.1, "x")
    for bad_key in (
        torch.zeros(1, 3),
        torch.tensor([0.0, math.nan, 1.0]),
        torch.tensor([0.0, math.inf, 1.0]),
    ):
        with pytest.raises(ValueError, match="finite vector"):
            cb.add(bad_key, nn.Identity(), 0.1, "x")
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="radius"):
            cb.add(torch.zeros(3), nn.Identity(), bad, "x")
    with pytest.raises(ValueError, match="string target"):
        cb.add(torch.zeros(3), nn.Identity(), 0.1, 7)
    assert len(cb) == len(cb.values) == len(cb.targets) == 2  # failed adds left no trace


# ---------------------------------------------------------------- values


def test_full_value_is_a_float32_trainable_copy():
    for dtype in (torch.float32, torch.float16):
        layer = nn.Linear(4, 3).to(dtype).requires_grad_(False)
        v = new_value(layer)
        assert isinstance(v, nn.Linear) and v.weight.dtype == torch.float32
        assert all(p.requires_grad for p in v.parameters()) and not layer.weight.requires_grad
        assert torch.equal(v.weight, layer.weight.float()) and torch.equal(
            v.bias, layer.bias.float()
        )
        with torch.no_grad():
            v.weight.add_(1.0)
        assert not torch.equal(v.weight, layer.weight.float())


def test_lora_value():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    v = new_value(layer, "lora", rank=2)
    assert isinstance(v, LoRAValue)
    assert set(v.state_dict()) == {"A", "B"} and v.A.shape == (2, 6) and v.B.shape == (5, 2)
    assert torch.count_nonzero(v.B) == 0 and torch.count_nonzero(v.A) > 0
    x = torch.randn(4, 7, 6)
    assert torch.equal(v(x), layer(x))  # B = 0: the value starts as the layer, bit for bit
    with torch.no_grad():
        v.B.fill_(0.1)
    assert not torch.allclose(v(x), layer(x))
    v(x).sum().backward()
    assert v.A.grad is not None and layer.weight.grad is None  # the base stays frozen


def test_half_precision_layers_get_float32_values_that_train():
    """fp16 models (BLIP-2 on a GPU): Adam's eps underflows in fp16, so values train in float32;
    the routing hands them float32 inputs and casts their output back."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4).half()
    x = torch.randn(3, 8).half()
    for kind in ("full", "lora"):
        value = new_value(layer, kind, rank=2)
        assert all(p.dtype == torch.float32 for p in value.parameters())
        torch.testing.assert_close(value(x.float()).half(), layer(x), atol=1e-2, rtol=1e-2)
        opt = torch.optim.Adam(value.parameters(), lr=1e-3)
        (value(x.float()) - 1).pow(2).mean().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in value.parameters())


# ---------------------------------------------------------------- the hook (Eq. 1)


class FlatToy(models.Backbone):
    """Like OPT's decoder layer: flattens (B, T, D) to (B*T, D) before ``fc2``; a Backbone, so
    that a call's ``prompt_mask`` reaches the router."""

    def __init__(self, D=4, F=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, F), nn.Linear(F, D)

    def forward(self, x):  # x: (B, T, D)
        shape = x.shape
        h = torch.relu(self.fc1(x.reshape(-1, shape[-1])))  # (B*T, F)
        return self.fc2(h).view(shape) + x  # (B, T, D)


def _fc2_input(model, x):
    return torch.relu(model.fc1(x))  # (B, T, F): what fc2 sees, per sample


def _mean_key(model, x, mask):
    h = _fc2_input(model, x)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, F)


def _perturbed_value(layer, seed):
    v = new_value(layer)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return v


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_sequential_miss_rows_bit_identical_hit_rows_use_value(seed, B):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    x = torch.randn(B, 5)
    plain = model(x)
    h = torch.tanh(model[0](x))  # (B, 8): the input of layer "2"
    cb = Codebook("euc")
    # Entry 0 sits exactly on sample 0 (always a hit); entry 1 is random.
    cb.add(h[0], _perturbed_value(model[2], seed), 0.0, "a")
    cb.add(torch.randn(8), _perturbed_value(model[2], seed + 1), float(torch.rand(())), "b")
    with Router(model, "2", cb) as handle:
        out = model(x)
    index = handle.last_index
    assert index[0].item() == 0
    for b in range(B):
        if index[b] < 0:
            assert torch.equal(out[b], plain[b])
        else:
            want = model[3](cb.values[int(index[b])](h[b : b + 1]))[0]
            torch.testing.assert_close(out[b], want)
            assert not torch.equal(out[b], plain[b])
    assert torch.equal(model(x), plain)  # removed on exit


@FAST
@given(
    st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["cos", "euc"])
)
def test_flattened_layer_mixed_batch(seed, B, T, kind):
    torch.manual_seed(seed)
    model = FlatToy()
    x = torch.randn(B, T, 4)
    mask = torch.rand(B, T) < 0.7
    mask[:, 0] = True  # every sample has a prompt position
    plain = model(x, prompt_mask=mask)
    keys = _mean_key(model, x, mask.float())  # (B, F)
    assume(kind == "euc" or keys[0].norm() > 1e-3)  # cos: a zero vector is at distance 1 from all
    cb = Codebook(kind)
    cb.add(keys[0], _perturbed_value(model.fc2, seed), 1e-4, "a")  # sample 0 hits
    cb.add(torch.randn(6), _perturbed_value(model.fc2, seed + 1), 0.05, "b")
    with Router(model, "fc2", cb) as handle:
        out = model(x, prompt_mask=mask)
    index = handle.last_index
    assert index[0].item() == 0
    torch.testing.assert_close(handle.last_query, keys)
    for b in range(B):
        if index[b] < 0:
            assert torch.equal(out[b], plain[b])
        else:
            fc2_in = _fc2_input(model, x[b : b + 1]).reshape(-1, 6)
            want = cb.values[int(index[b])](fc2_in).view(1, T, 4) + x[b : b + 1]
            torch.testing.assert_close(out[b], want[0])
            assert not torch.equal(out[b], plain[b])


def test_no_hit_returns_the_output_untouched_and_miss_rows_bit_identical():
    torch.manual_seed(0)
    model = FlatToy()
    x, mask = torch.randn(3, 4, 4), torch.ones(3, 4, dtype=torch.bool)
    plain = model(x, prompt_mask=mask)
    cb = Codebook("euc")
    cb.add(torch.full((6,), 100.0), _perturbed_value(model.fc2, 0), 1.0, "far")
    with Router(model, "fc2", cb) as handle:
        assert torch.equal(model(x, prompt_mask=mask), plain)
        assert handle.last_index.tolist() == [-1, -1, -1]


def test_empty_and_emptied_codebook_equal_the_plain_model():
    torch.manual_seed(0)
    model = FlatToy()
    x, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
    plain = model(x, prompt_mask=mask)
    cb = Codebook()
    with Router(model, "fc2", cb):
        assert torch.equal(model(x, prompt_mask=mask), plain)
        keys = _mean_key(model, x, mask.float())
        cb.add(keys[0], _perturbed_value(model.fc2, 1), 0.5, "a")
        cb.add(keys[1], _perturbed_value(model.fc2, 2), 0.5, "b")
        assert not torch.equal(model(x, prompt_mask=mask), plain)  # the edits do act
        cb.remove(1)
        cb.remove(0)
        assert torch.equal(model(x, prompt_mask=mask), plain)


def test_key_independent_of_batch_and_padding():
    torch.manual_seed(0)
    model = FlatToy()
    cb = Codebook("cos")
    cb.add(torch.randn(6), new_value(model.fc2), 0.0, "a")
    x_alone = torch.randn(1, 3, 4)
    with Router(model, "fc2", cb) as handle:
        model(x_alone, prompt_mask=torch.ones(1, 3, dtype=torch.bool))
        q_alone = handle.last_query[0]
        # The same sample, right-padded with garbage to T=6 inside a batch of 3.
        x = torch.randn(3, 6, 4) * 50
        x[1, :3] = x_alone[0]
        mask = torch.zeros(3, 6, dtype=torch.bool)
        mask[0, :5], mask[1, :3], mask[2, :] = True, True, True
        model(x, prompt_mask=mask)
        torch.testing.assert_close(handle.last_query[1], q_alone, rtol=1e-6, atol=1e-6)
        # Without the mask, the padding would count.
        model(x)
        assert not torch.allclose(handle.last_query[1], q_alone)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 7))
def test_last_pool_is_h_at_the_last_prompt_position_whatever_the_rest(seed, B, T):
    """pool="last": each row's key is h at its last prompt position, whatever the padding before it
    and the answer after it; "mean" is the prompt's mean. A row with no prompt position: NaN."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, T + 1, (B,), generator=g)  # padding before, then the prompt,
    stop = start + torch.randint(0, T + 1, (B,), generator=g)  # then the answer from stop on
    t = torch.arange(T)
    prompt = (t >= start[:, None]) & (t < stop.clamp(max=T)[:, None])  # (B, T)
    h = torch.randn(B, T, 3, generator=g)
    key = prompt_key(h, prompt, "last")
    last = prompt & (t[None] == stop.clamp(max=T)[:, None] - 1)  # (B, T): the last prompt position
    h[~last] = (
        torch.randn(int((~last).sum()), 3, generator=g) * 1e3
    )  # padding, answer, the rest of the prompt
    torch.testing.assert_close(
        prompt_key(h, prompt, "last"), key, equal_nan=True
    )  # ... do not count
    for b in range(B):
        if prompt[b].any():
            torch.testing.assert_close(key[b], h[b, int(prompt[b].nonzero().max())])
        else:
            assert key[b].isnan().all()
    torch.testing.assert_close(
        prompt_key(h, prompt, "mean")[prompt.sum(1) == 1], key[prompt.sum(1) == 1]
    )


def test_held_route_during_kv_cache_decoding():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cb = Codebook("euc")
    cb.add(_mean_key(model, x, mask.float())[0], _perturbed_value(model.fc2, 1), 1e-4, "a")
    step = torch.randn(2, 1, 4) * 10  # (B, 1, D): one new token per row
    fc2_in = _fc2_input(model, step).reshape(2, 6)  # (B, F)
    cb.add(
        fc2_in[1], _perturbed_value(model.fc2, 2), 1e-4, "b"
    )  # the step alone routes row 1 to entry 1
    zeros = torch.zeros(2, 1, dtype=torch.bool)
    plain_step = model(step)
    want0 = cb.values[0](fc2_in[:1]) + step[0]
    with Router(model, "fc2", cb) as handle:
        model(x, prompt_mask=mask)  # prefill
        assert handle.last_index.tolist() == [0, -1]
        out = model(step, prompt_mask=zeros)  # decode: the prefill's route is held
        assert handle.last_index.tolist() == [0, -1]
        torch.testing.assert_close(out[0], want0)
        assert torch.equal(out[1], plain_step[1])
        # Without a mask nothing is held: the step routes on its own input.
        model(step)
        assert handle.last_index.tolist() == [-1, 1]
        # A different batch size (or nothing held) is a miss.
        model(x, prompt_mask=mask)
        model(step[:1], prompt_mask=zeros[:1])
        assert handle.last_index.tolist() == [-1]
        model(step, prompt_mask=zeros)
        assert handle.last_index.tolist() == [-1, -1]


def test_layout_mismatch_raises():
    model = FlatToy()
    cb = Codebook()
    cb.add(torch.randn(6), new_value(model.fc2), 0.1, "a")
    with Router(model, "fc2", cb):
        with pytest.raises(ValueError, match="layout"):
            model(torch.randn(2, 3, 4), prompt_mask=torch.ones(2, 4, dtype=torch.bool))


def test_grace_hook_uses_the_last_prompt_position_and_writes_there_only():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(1, 4, 4)
    mask = torch.tensor([[True, True, False, False]])  # prompt = 2 positions, then the answer
    plain, plain_step = model(x, prompt_mask=mask), model(x[:, 1:2])
    h = _fc2_input(model, x)  # (1, 4, 6)
    cb = Codebook("euc")
    cb.add(
        h[0, 1], Vector(model.fc2, torch.ones(4)), 1e-5, "a"
    )  # GRACE's key: the last prompt position
    with GraceRouter(model, "fc2", cb) as router:
        out = model(x, prompt_mask=mask)
        assert router.last_index.tolist() == [0]
        step = model(
            x[:, 1:2], prompt_mask=torch.zeros(1, 1, dtype=torch.bool)
        )  # a decoding step: no key
        assert router.last_index.tolist() == [-1] and torch.equal(step, plain_step)
    assert torch.equal(out[0, 0], plain[0, 0]) and torch.equal(
        out[0, 2:], plain[0, 2:]
    )  # untouched
    torch.testing.assert_close(out[0, 1], torch.ones(4) + x[0, 1])  # the key position: v


def test_override_replaces_every_row_and_passes_gradients():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    plain = model(x)
    v = _perturbed_value(model.fc2, 3)
    with override(model, "fc2", v):
        out = model(x)
        want = v(_fc2_input(model, x)) + x
        torch.testing.assert_close(out, want)
        out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())
    assert torch.equal(model(x), plain)


def test_lookup_never_uses_stale_keys_after_remove_and_add():
    """The unit keys normalised at ``add`` follow every add and remove."""
    torch.manual_seed(0)
    cb = Codebook("cos")
    q = torch.randn(4, 8)
    for _ in range(30):
        k = torch.randn(8)
        cb.add(k, nn.Identity(), 0.5, "t")
        _, dist, _ = cb.lookup(q)
        assert torch.equal(dist, distance(q, k[None], "cos")[:, 0])
        cb.remove(0)
