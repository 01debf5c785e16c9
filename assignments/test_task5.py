"""Task 5 (15 points): Eq. 3's probes. An edit finds its key k and the distances d(Pos, k) and
d(Neg, k) in one batched forward of three rows: the edit (i, t), the positive (i, R(t)), and the
negative (the config's anchor image, black by default, with the same question t). A key is
computed as the routing hook computes it, and the positive is a rephrasing that T-Gen never
scores.

    eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)

Every key that a grader here expects is worked out from layer l's input on the sample alone
(``key_of``), never read from the editor.

    python -m pytest assignments -m task5
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from balancedit import BalancEditConfig, BalancEditor, Codebook, Probe, Router
from data import ANCHORS, anchor_image

pytestmark = pytest.mark.task5


def key_of(model, image, question, pool="mean"):
    """The key of one (image, question), worked out here in float64: layer l's input on the
    sample alone, its mean over the prompt positions or (pool "last") its last one."""
    batch = model.encode([image], [question])
    h = model.layer_input(batch, model.target_layer)[0].double()  # (T, D)
    prompt = batch["prompt_mask"][0]  # (T,)
    if pool == "last":
        return h[int(prompt.nonzero().max())]
    return h[prompt].mean(dim=0)


def dist(metric, q, k) -> float:
    """d(q, k) of two float64 keys: 1 - cos, or the Euclidean distance."""
    if metric == "cos":
        return float(1 - q @ k / (q.norm() * k.norm()))
    return float((q - k).norm())


def near(got, want) -> bool:
    """Equal up to the round-off between a key from a batch of three and one from a batch of
    one (padding changes the order of the sums)."""
    return abs(got - want) <= 2e-5 + 1e-4 * abs(want)


def by_hand(model, record, negative="black", pool="mean", metric="cos") -> dict:
    """What the probe of ``record`` must find: the key ``k``, ``d_pos`` and ``d_neg``; and what
    the usual mistakes find instead: d(Neg, k) with another anchor image (``anchors``), and with
    the rephrased question on the anchor image (``neg_rephrased``)."""
    image = record.image
    positive = record.train_rephrases[0]
    assert positive not in record.rephrases, "the test's own set-up: an unscored positive"
    k = key_of(model, image, record.question, pool)
    pos = key_of(model, image, positive, pool)
    anchors = {}
    for a in ANCHORS:
        key = key_of(model, anchor_image(a, image.size, seed=0), record.question, pool)
        anchors[a] = dist(metric, key, k)
    neg = anchor_image(negative, image.size, seed=0)
    rephrased = dist(metric, key_of(model, neg, positive, pool), k)
    d_pos = dist(metric, pos, k)
    d_neg = anchors.pop(negative)
    if pool == "mean":  # the distances' graders: every mistake must give distances of its own
        found = [0.0, d_pos, d_neg, *anchors.values(), rephrased]
        gap = min(abs(a - b) for i, a in enumerate(found) for b in found[i + 1 :])
        assert gap > 1e-3, f"the test's own set-up: record {record.id}'s probes are too close"
    return dict(k=k, pos=pos, d_pos=d_pos, d_neg=d_neg, anchors=anchors, neg_rephrased=rephrased)


def mistake(d_pos, d_neg, want, negative="black") -> str:
    """The usual mistake that gives these two distances, in words ("" if none does)."""
    if near(d_pos, want["d_neg"]) and near(d_neg, want["d_pos"]):
        return (
            " d_pos and d_neg are swapped: d(Pos, k) is the distance of the positive, the SAME "
            "image with a rephrased question; d(Neg, k) that of the negative, the anchor image "
            "with the same question"
        )
    said = ""
    if abs(d_pos) <= 2e-5:
        said += (
            " d(Pos, k) is 0: the positive repeats the edit's own question, so its key is k "
            "itself; Pos asks R(t), self.positive_question(record)."
        )
    for anchor, d in want["anchors"].items():
        if near(d_neg, d):
            said += (
                f" d(Neg, k) is the distance of a {anchor} image, where config.negative is "
                f"{negative!r}: make Neg's image with anchor_image(self.config.negative, "
                "image.size, seed=self.config.seed)."
            )
    if near(d_neg, want["neg_rephrased"]):
        said += (
            " Neg asks the rephrased question: the negative is the SAME question t on the anchor "
            "image (only the image changes)."
        )
    return said


def forwards(model, work) -> list[int]:
    """Run ``work()`` and return the batch size of each call of the whole model it made."""
    sizes = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sizes.append(None if ids is None else len(ids))

    counter = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        work()
    finally:
        counter.remove()
    return sizes


# ---------------------------------------------------------------- the key and the positive


def test_keys_are_the_queries_of_the_routing_hook(tiny, records):
    images = [records[0].image, records[1].image]
    questions = [records[0].question, "what colour is this?"]
    batch = tiny.encode(images, questions)
    with Router(tiny, tiny.target_layer, Codebook()) as router:
        with torch.no_grad():
            tiny(**batch)
    editor = BalancEditor(tiny, BalancEditConfig(steps=1))
    hooks = len(editor.layer._forward_hooks)
    keys = editor.keys_of(images, questions)
    D = editor.layer.in_features
    is_tensor = isinstance(keys, torch.Tensor)
    assert is_tensor and keys.shape == (2, D) and keys.dtype == torch.float32, (
        f"keys_of returns (B, D) float32 with D = {D}, layer l's input width; "
        f"got {getattr(keys, 'shape', keys)}"
    )
    torch.testing.assert_close(
        keys,
        router.last_query,
        msg=lambda m: (
            "an entry's key must be exactly the query the routing hook computes for the same "
            "(image, question): the mean of layer l's input over the prompt positions, row by "
            f"row (the layer sees (B*T, D)): {m}"
        ),
    )
    assert len(editor.layer._forward_hooks) == hooks, (
        "keys_of must remove any hook it puts on layer l"
    )
    alone = editor.keys_of(images[1:], questions[1:])
    torch.testing.assert_close(
        alone[0],
        keys[1],
        rtol=1e-5,
        atol=1e-6,
        msg=lambda m: f"a key must not depend on the other samples of the batch (padding): {m}",
    )


def test_keys_with_pool_last_are_the_layer_input_at_the_last_prompt_position(tiny, records):
    images = [records[0].image, records[1].image]
    questions = [records[0].question, "what colour is this?"]
    # The prompt, then the answer.
    answered = tiny.encode(images, questions, [r.target for r in records[:2]])
    h = tiny.layer_input(answered, tiny.target_layer)  # (B, T, D)
    mask = answered["prompt_mask"]  # (B, T): padding on the left, the answer after the prompt
    last = [int(row.nonzero().max()) for row in mask]
    assert last[0] < mask.shape[1] - 1, "the test needs an answer after the prompt"
    want = h[[0, 1], last].float()  # (2, D)
    editor = BalancEditor(tiny, BalancEditConfig(steps=1, pool="last"))
    keys = editor.keys_of(images, questions)
    assert isinstance(keys, torch.Tensor) and keys.shape == want.shape, (
        f"keys_of returns (B, D) = {tuple(want.shape)}"
    )
    torch.testing.assert_close(
        keys,
        want,
        rtol=1e-5,
        atol=1e-6,
        msg=lambda m: (
            "with BalancEditConfig(pool='last') a key is layer l's input at the sample's last "
            "prompt position (the template's final ':'), as the routing hook computes it: pass "
            f"self.config.pool on (the default pools the mean over the prompt): {m}"
        ),
    )


def test_the_positive_is_a_training_rephrasing_never_a_scored_one(tiny, records, monkeypatch):
    editor = BalancEditor(tiny, BalancEditConfig(steps=1))
    record = records[0]
    got = editor.positive_question(record)
    assert got == record.train_rephrases[0], (
        "Pos's question R(t) is the record's first training rephrasing "
        f"{record.train_rephrases[0]!r}; got {got!r}"
    )
    scored = copy.copy(record)
    scored.rephrases = [record.train_rephrases[0], *record.rephrases]
    assert len(record.train_rephrases) > 1, "the test's own set-up: two training rephrasings"
    got = editor.positive_question(scored)
    hint = ""
    if got == record.train_rephrases[0]:
        hint = " That one scores T-Gen here (it is in record.rephrases): skip it"
    assert got == record.train_rephrases[1], (
        "Pos's question is the first training rephrasing that T-Gen does not score (not in "
        f"record.rephrases): want {record.train_rephrases[1]!r}, got {got!r}.{hint}"
    )
    bare = copy.copy(record)
    bare.train_rephrases = []
    fresh = "what is the name of the thing here?"
    offered = [*record.rephrases[:2], fresh, record.rephrases[2]]
    monkeypatch.setattr(tiny, "rephrase", lambda question: offered)
    got = editor.positive_question(bare)
    assert got == fresh, (
        "with no training rephrasing, take the first of backbone.rephrase(question) that T-Gen "
        "does not score (not in record.rephrases), or T-Gen would be measured on the edit's own "
        f"positive: want {fresh!r}, got {got!r}"
    )
    every_one_scored = copy.copy(scored)
    every_one_scored.rephrases = [*record.train_rephrases, *record.rephrases]
    got = editor.positive_question(every_one_scored)
    assert got == fresh, (
        "when T-Gen scores every training rephrasing, the positive is the first of "
        f"backbone.rephrase(question) that it does not score: want {fresh!r}, got {got!r}"
    )
    monkeypatch.setattr(tiny, "rephrase", lambda question: list(record.rephrases))
    try:
        got = editor.positive_question(bare)
    except ValueError:
        return
    pytest.fail(
        "every rephrasing the backbone offers is scored by T-Gen: there is no positive, raise a "
        f"ValueError (got {got!r})"
    )


# ---------------------------------------------------------------- the probe (Eq. 3's inputs)


def test_the_probe_is_one_batched_forward_of_three_rows(shipped, records):
    record = records[0]
    editor = BalancEditor(shipped, BalancEditConfig(steps=1))
    found = []
    sizes = forwards(shipped, lambda: found.append(editor.probe(record, record.image)))
    assert isinstance(found[0], Probe), f"probe returns a balancedit.Probe; got {found[0]!r:.200}"
    assert sizes == [3], (
        "probe runs the model once, on one batch of three rows (the edit, Pos, Neg): "
        "backbone.layer_input_and_tail(batch, self.layer_path, per_position=True) gives layer "
        "l's input and the tail of Eq. 2 from that one forward; the model ran "
        f"{len(sizes)} time(s), on batches of {sizes} rows"
    )


def test_the_key_is_the_edits_own_row(shipped, records):
    record = records[0]
    for pool in ("mean", "last"):
        editor = BalancEditor(shipped, BalancEditConfig(steps=1, pool=pool))
        p = editor.probe(record, record.image)
        want = by_hand(shipped, record, pool=pool)
        D = editor.layer.in_features
        k = p.k
        is_key = isinstance(k, torch.Tensor) and k.shape == (D,) and k.dtype == torch.float32
        assert is_key, f"Probe.k is the edit's key, a ({D},) float32 tensor; got {k!r:.200}"
        hint = ""
        if torch.allclose(k.double(), want["pos"], rtol=1e-4, atol=1e-5):
            hint = " That is Pos's key: k is the row of the edit itself, (i, t)"
        mean = key_of(shipped, record.image, record.question)
        if pool == "last" and torch.allclose(k.double(), mean, rtol=1e-4, atol=1e-5):
            hint = " That is the mean over the prompt: pool the keys with self.config.pool"
        assert torch.allclose(k.double(), want["k"], rtol=1e-4, atol=1e-5), (
            f"Probe.k is the key of the edit's own row (i, t), as the routing hook computes it "
            f"(pool={pool!r}); it differs from that key by up to "
            f"{(k.double() - want['k']).abs().max():.3g}.{hint}"
        )


def test_d_pos_is_the_same_image_with_a_rephrased_question(shipped, records):
    record = records[0]
    for metric in ("cos", "euc"):
        editor = BalancEditor(shipped, BalancEditConfig(steps=1, distance=metric))
        p = editor.probe(record, record.image)
        want = by_hand(shipped, record, metric=metric)
        assert isinstance(p.d_pos, float) and isinstance(p.d_neg, float), (
            f"Probe.d_pos and Probe.d_neg are Python floats; got {p.d_pos!r}, {p.d_neg!r}"
        )
        assert near(p.d_pos, want["d_pos"]), (
            f"d(Pos, k) ({metric}) is the distance from k of the positive, the same image with "
            f"the question R(t) = positive_question(record): want {want['d_pos']:.6f}, got "
            f"{p.d_pos:.6f}.{mistake(p.d_pos, p.d_neg, want)}"
        )


def test_d_neg_is_the_configs_anchor_image_with_the_same_question(shipped, records):
    record = records[4]  # its probes lie apart on every anchor image, so each mistake shows
    for negative in ANCHORS:
        editor = BalancEditor(shipped, BalancEditConfig(steps=1, negative=negative))
        p = editor.probe(record, record.image)
        want = by_hand(shipped, record, negative=negative)
        assert near(p.d_neg, want["d_neg"]), (
            f"d(Neg, k) is the distance from k of the negative, the same question on the image "
            f"that config.negative names ({negative!r}, anchor_image(config.negative, "
            f"image.size, seed=config.seed)): want {want['d_neg']:.6f}, got {p.d_neg:.6f}."
            f"{mistake(p.d_pos, p.d_neg, want, negative)}"
        )


@pytest.mark.parametrize("cache", [True, False])
def test_only_the_edits_row_trains(shipped, records, cache):
    record = records[0]
    editor = BalancEditor(shipped, BalancEditConfig(steps=1, cache=cache))
    p = editor.probe(record, record.image)
    alone = shipped.encode([record.image], [record.question], [record.target])
    with torch.no_grad():
        own = shipped(**alone).loss.item()
    rows = {name: len(x) for name, x in p.batch.items()}
    assert "labels" in rows and "prompt_mask" in rows and set(rows.values()) == {1}, (
        "Probe.batch is the edit's row of the probe's batch, every tensor of it with one row "
        f"(Eq. 2's batch); got rows {rows}"
    )
    with torch.no_grad():
        got = shipped(**p.batch).loss.item()
    assert got == pytest.approx(own, rel=1e-4), (
        "Probe.batch is the edit's row (i, t) with its target as the answer, so the model's "
        f"loss on it is the loss of the edit alone, {own:.5f}; got {got:.5f}"
    )
    if not cache:
        assert p.tail is None, (
            "with BalancEditConfig(cache=False) Probe.tail is None: Eq. 2 then runs the plain "
            f"loop; got {p.tail!r:.200}"
        )
        return
    assert p.tail is not None, "with the default config (cache=True) Probe.tail is the forward's"
    with torch.no_grad():
        logits = p.tail.rest(editor.layer(p.tail.h))  # the layer itself: no edit yet
        loss = F.cross_entropy(logits, p.tail.targets).item()
    answer = len(shipped.answer_ids(record.target))
    hint = ""
    if len(p.tail.targets) > answer:
        hint = (
            f" The tail predicts {len(p.tail.targets)} tokens, where the edit's answer has "
            f"{answer}: set the labels of the Pos and Neg rows to -100 before the forward"
        )
    assert loss == pytest.approx(own, rel=1e-4), (
        "Eq. 2 learns the edit's row only: the tail's loss with layer l itself is the loss of "
        f"the edit alone, {own:.5f}; got {loss:.5f}.{hint}"
    )


def test_an_edits_radius_lies_between_its_own_two_distances(shipped, records):
    record = records[0]
    alpha = 0.7
    editor = BalancEditor(shipped, BalancEditConfig(steps=1, alpha=alpha))
    want = by_hand(shipped, record)
    report = editor.edit(record)
    d_pos = want["d_pos"]
    d_neg = want["d_neg"]
    right = near(report.d_pos, d_pos) and near(report.d_neg, d_neg)
    said = mistake(report.d_pos, report.d_neg, want)
    assert right, (
        f"the edit at hand has d(Pos, k) = {d_pos:.6f} and d(Neg, k) = {d_neg:.6f}; its report "
        f"says {report.d_pos:.6f} and {report.d_neg:.6f}.{said}"
    )
    eps = alpha * d_pos + (1 - alpha) * d_neg  # Eq. 3
    inside = min(d_pos, d_neg) - 2e-5 <= report.radius <= max(d_pos, d_neg) + 2e-5
    assert inside and near(report.radius, eps), (
        f"the radius of the edit lies between its own two distances, eps = {alpha} * "
        f"{d_pos:.6f} + {1 - alpha:.1f} * {d_neg:.6f} = {eps:.6f}; got {report.radius:.6f}"
    )
    key = editor.codebook.keys[report.index].double()
    assert torch.allclose(key, want["k"], rtol=1e-4, atol=1e-5), (
        "the entry's key is k, the key of the edit's own row (i, t)"
    )


# ---------------------------------------------------------------- one edit of the trained TinyVLM


def test_an_edit_of_the_shipped_tinyvlm(shipped, records):
    record = records[0]

    def ask():
        return shipped.generate([record.image], [record.question])

    before = ask()
    editor = BalancEditor(shipped)  # the default config: alpha 0.7, cos, black negative, 100 steps
    report = editor.edit(record)
    d_pos = report.d_pos
    d_neg = report.d_neg
    assert min(d_pos, d_neg) <= report.radius <= max(d_pos, d_neg), (
        f"the radius must lie between d(Pos, k) = {d_pos:.4f} and d(Neg, k) = {d_neg:.4f}; "
        f"got {report.radius:.4f}"
    )
    assert d_pos < d_neg, (
        "the positive (same image, rephrased) must be nearer the key than the negative (black "
        f"image); got {report}"
    )
    with editor.attached():
        after = ask()
    assert after == [record.target], (
        f"after the edit the model must answer {record.target!r} to {record.question!r}; it "
        f"answers {after} (before: {before})"
    )
    editor.remove(report.index)
    assert ask() == before, "with the edit removed the model must answer as before"
