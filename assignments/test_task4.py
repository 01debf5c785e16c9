"""Task 4 (15 points): Eq. 2 trains the edit's value, on cached activations or through the whole
model.

    v* = argmin_v L(f_new(i, t), y^n)     (Adam on v only; the model's weights never change)

    python -m pytest assignments -m task4
"""

import pytest
import torch

from balancedit import new_value, override, train_value

pytestmark = pytest.mark.task4


def edit_batch(model, record):
    """The Eq. 2 batch of one record: image + question, the target as the answer (labels -100
    elsewhere)."""
    return model.encode([record.image], [record.question], [record.target])


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tail_of(model, batch, cache):
    """train_value's ``tail``: the batch's cached activations (``cache``), else None (the plain
    loop)."""
    return model.tail(batch, model.target_layer) if cache else None


def loop(cache) -> str:
    """How train_value was called, for the messages."""
    return "tail=backbone.tail(batch, layer_path)" if cache else "tail=None"


# ---------------------------------------------------------------- train_value (Eq. 2)


@pytest.mark.parametrize("cache", [True, False])
def test_training_lowers_the_loss_on_the_target(tiny, records, cache):
    layer = tiny.get_submodule(tiny.target_layer)
    value = new_value(layer)
    batch = edit_batch(tiny, records[0])
    tail = tail_of(tiny, batch, cache)
    losses = train_value(tiny, tiny.target_layer, value, batch, steps=20, lr=1e-2, tail=tail)
    floats = isinstance(losses, list) and all(isinstance(x, float) for x in losses)
    assert floats and len(losses) == 20, (
        "train_value returns the loss of every step as a list of 20 Python floats; "
        f"got {losses!r:.200}"
    )
    assert losses[-1] < 0.95 * losses[0], (
        "20 Adam steps at lr 1e-2 must lower the loss on the target by 5% at least (a random "
        f"model: a trained one falls much further); got {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({loop(cache)})"
    )


@pytest.mark.parametrize("cache", [True, False])
def test_the_first_loss_is_the_models_own_loss_on_the_target_tokens(tiny, records, cache):
    batch = edit_batch(tiny, records[0])
    with torch.no_grad():
        # The cross-entropy on the answer tokens only (labels -100 elsewhere).
        own = tiny(**batch).loss.item()
    value = new_value(tiny.get_submodule(tiny.target_layer))
    tail = tail_of(tiny, batch, cache)
    losses = train_value(tiny, tiny.target_layer, value, batch, 1, 1e-2, tail)
    assert losses[0] == pytest.approx(own, rel=1e-4), (
        "a new value starts as layer l, so the loss of step 1 (taken before the update) is the "
        f"model's own loss on the target tokens, {own:.5f}; got {losses[0]:.5f} ({loop(cache)}). "
        "The loss is the LM cross-entropy on the target tokens only: batch['labels'] is -100 on "
        "the image, the prompt and the padding"
    )


def test_no_gradient_reaches_the_model(tiny, records):
    before = state(tiny)
    value = new_value(tiny.get_submodule(tiny.target_layer))
    batch = edit_batch(tiny, records[1])
    for cache in (True, False):
        tail = tail_of(tiny, batch, cache)
        train_value(tiny, tiny.target_layer, value, batch, steps=3, lr=1e-2, tail=tail)
        with_grad = [n for n, p in tiny.named_parameters() if p.grad is not None]
        assert not with_grad, (
            "Eq. 2 trains v only: no gradient may reach the model's weights, yet "
            f"{with_grad[:3]} got a .grad ({loop(cache)}). loss.backward() fills every "
            "parameter's .grad; compute the value's gradients only, e.g. "
            "torch.autograd.grad(loss, value_parameters)"
        )
        same = all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
        assert same, (
            f"the model's weights and buffers must not change while a value trains ({loop(cache)})"
        )
    assert all(p.grad is None for p in value.parameters()), (
        "a trained value is stored in the codebook: leave it without gradients (.grad None)"
    )


def test_adam_moves_each_weight_by_about_lr_at_the_first_step(tiny, records):
    value = new_value(tiny.get_submodule(tiny.target_layer))
    start = [p.detach().clone() for p in value.parameters()]
    lr = 3e-3  # not Adam's default (1e-3)
    batch = edit_batch(tiny, records[0])
    tail = tail_of(tiny, batch, True)
    train_value(tiny, tiny.target_layer, value, batch, steps=1, lr=lr, tail=tail)
    changes = [(p.detach() - s).abs().flatten() for p, s in zip(value.parameters(), start)]
    change = torch.cat(changes)
    moved = change[change > 0]
    assert len(moved) > 0, (
        "one step of train_value left the value unchanged: does the optimizer hold its parameters?"
    )
    hint = " Plain SGD moves each weight by lr * |gradient| instead."
    if 0.9e-3 <= moved.median() and moved.max() <= 1.01e-3:
        hint = (
            " That is Adam's default lr, 1e-3: was the optimizer made without lr "
            "(torch.optim.Adam(params, lr=lr))?"
        )
    assert 0.9 * lr <= moved.median() and moved.max() <= 1.01 * lr, (
        "Eq. 2 is trained with torch.optim.Adam on the value's parameters at the given lr: "
        f"Adam's first step moves every weight that has a gradient by about lr = {lr}, whatever "
        f"the gradient's size; the weights that moved moved by {moved.median():.3g} (median) to "
        f"{moved.max():.3g} (largest).{hint}"
    )


def adam_by_hand(model, path, value, batch, steps, lr, accumulate=False):
    """Eq. 2 by hand: Adam's update (Kingma and Ba; torch's defaults, betas 0.9 and 0.999, eps
    1e-8) at ``lr`` on the value's weights, the whole model per step with layer l replaced by
    the value, each step on its own gradients (or, ``accumulate``, on their running sum: the
    mistake of never resetting them). Returns the trained weights."""
    weights = list(value.parameters())
    m = [torch.zeros_like(w) for w in weights]  # Adam's first moments
    v = [torch.zeros_like(w) for w in weights]  # and second moments
    total = [torch.zeros_like(w) for w in weights]
    for t in range(1, steps + 1):
        with override(model, path, value):  # the hook's handle removes it at the block's end
            grads = torch.autograd.grad(model(**batch).loss, weights)
        with torch.no_grad():
            for i, w in enumerate(weights):
                total[i] += grads[i]
                g = total[i] if accumulate else grads[i]
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                m_hat = m[i] / (1 - 0.9**t)
                v_hat = v[i] / (1 - 0.999**t)
                w -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    return [w.detach().clone() for w in weights]


@pytest.mark.parametrize("cache", [True, False])
def test_train_value_is_adam_at_the_given_lr_with_fresh_gradients(tiny, records, cache):
    layer = tiny.get_submodule(tiny.target_layer)
    batch = edit_batch(tiny, records[0])
    lr = 5e-2  # not Adam's default (1e-3)
    value = new_value(layer)
    tail = tail_of(tiny, batch, cache)
    train_value(tiny, tiny.target_layer, value, batch, steps=3, lr=lr, tail=tail)
    got = [p.detach() for p in value.parameters()]
    wrong = {
        "Adam at its default lr, 1e-3: the optimizer was made without lr": dict(lr=1e-3),
        "the gradients accumulate over the steps: they are never reset (or set) per step": dict(
            lr=lr, accumulate=True
        ),
    }
    for mistake, how in wrong.items():
        theirs = adam_by_hand(tiny, tiny.target_layer, new_value(layer), batch, 3, **how)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, theirs))
        assert not same, (
            f"train_value(steps=3, lr={lr}, {loop(cache)}) trained the value of this mistake: "
            f"{mistake}. Eq. 2 is torch.optim.Adam(value_parameters, lr=lr), and each step "
            "uses that step's gradients only"
        )
    want = adam_by_hand(tiny, tiny.target_layer, new_value(layer), batch, 3, lr)
    gap = max((a - b).abs().max().item() for a, b in zip(got, want))
    assert gap <= 1e-5, (
        f"train_value(steps=3, lr={lr}, {loop(cache)}) must train the value that 3 steps of "
        "torch.optim.Adam(value_parameters, lr=lr) give, each on that step's gradients of the LM "
        f"loss on the target tokens; the weights differ by up to {gap:.3g}"
    )


def forward_hooks(model) -> int:
    """How many forward hooks and forward pre-hooks the model's modules hold."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("cache", [True, False])
def test_train_value_leaves_no_hook_on_the_model(tiny, records, cache):
    hooks = forward_hooks(tiny)
    value = new_value(tiny.get_submodule(tiny.target_layer))
    batch = edit_batch(tiny, records[0])
    tail = tail_of(tiny, batch, cache)
    train_value(tiny, tiny.target_layer, value, batch, steps=2, lr=1e-2, tail=tail)
    left = forward_hooks(tiny) - hooks
    assert left == 0, (
        f"train_value({loop(cache)}) left {left} forward hook(s) on the model: every later call "
        "of the model would still go through the value. Remove each hook you add, also if a step "
        "fails: balancedit.override returns the hook's handle, and `with override(...):` removes "
        "it at the block's end (or call handle.remove() in a `finally:`)"
    )


@pytest.mark.parametrize("form", ["full", "lora"])
def test_cached_activations_train_the_same_value(tiny, records, form):
    weights = {}
    batch = edit_batch(tiny, records[0])
    for cache in (True, False):
        torch.manual_seed(0)
        value = new_value(tiny.get_submodule(tiny.target_layer), form, rank=4)
        tail = tail_of(tiny, batch, cache)
        train_value(tiny, tiny.target_layer, value, batch, steps=5, lr=1e-2, tail=tail)
        weights[cache] = [p.detach().clone() for p in value.parameters()]
    for a, b in zip(weights[True], weights[False]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (
            "training on cached activations (tail=backbone.tail(batch, layer_path): h^(l-1) "
            "recorded once, then only the network after l per step) must give the same "
            f"{form} value as the plain loop (tail=None: the whole model per step, layer l "
            "replaced by the value with balancedit.override); they differ"
        )


def test_training_on_a_tail_runs_the_whole_model_once(tiny, records):
    calls = []
    counter = tiny.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        value = new_value(tiny.get_submodule(tiny.target_layer))
        batch = edit_batch(tiny, records[0])
        tail = tiny.tail(batch, tiny.target_layer)  # the one forward that records the tail
        train_value(tiny, tiny.target_layer, value, batch, steps=10, lr=1e-2, tail=tail)
        cached = len(calls)
        calls.clear()
        train_value(tiny, tiny.target_layer, value, batch, steps=10, lr=1e-2, tail=None)
        plain = len(calls)
    finally:
        counter.remove()
    assert cached <= 1, (
        "given a tail (recorded once by backbone.tail(batch, layer_path)) the layers below l "
        "never run again: each step runs only the network after l, "
        "F.cross_entropy(tail.rest(value(tail.h)), tail.targets); with the tail's own recording "
        f"the whole model ran {cached} times in 10 steps"
    )
    assert plain == 10, (
        f"with tail=None each of the 10 steps runs the whole model once; it ran {plain} times"
    )
