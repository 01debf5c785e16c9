"""Task 3 (25 points, with test_task3.py): the route held while a model decodes with a KV cache.

Each decoding step is a call whose prompt mask is all False: the new token alone is no key (its
query is NaN), so each row keeps the route its own prompt chose. The handout's four rules, one
grader each: the hold is row by row; a call without a mask holds nothing; a new batch size starts
a new hold; a removed entry drops what was held. Every route expected here is computed from the
codebook's keys and radii (toys.decide on keys worked out by hand), never read from the router.

python -m pytest assignments -m task3
"""

import pytest
import torch
from toys import FlatToy, changed_copy, decide, fc2_input, keys_by_hand, query_of, route_message

from balancedit import Codebook, Router

pytestmark = pytest.mark.task3


def routes(router) -> list[int] | None:
    """The route each row took in the router's last call (None: route set no last_index)."""
    return None if router.last_index is None else router.last_index.tolist()


def test_the_route_is_held_during_kv_cache_decoding():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cb = Codebook("euc")
    row0 = query_of(model, x, mask)[0]
    cb.add(row0, changed_copy(model.fc2, 1), 1e-4, "a")  # row 0's prompt hits entry 0
    # One new token per row, as in greedy decoding with a KV cache.
    step = torch.randn(2, 1, 4) * 10
    step_in = fc2_input(model, step).reshape(2, 6)
    cb.add(step_in[1], changed_copy(model.fc2, 2), 1e-4, "b")  # row 1's step alone would hit
    plain_step = model(step)
    no_prompt = torch.zeros(2, 1, dtype=torch.bool)
    queries = query_of(model, x, mask)
    want = decide(queries, cb)[0].tolist()
    assert want == [0, -1], "the test's own set-up: row 0 sits on entry 0, row 1 on no key"
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=mask)  # the prompt (prefill)
        got = router.last_index.tolist()
        assert got == want, f"prefill: {route_message(want, got, queries, cb)}"
        out = model(step, prompt_mask=no_prompt)  # a decoding step: prompt_mask all False
        got = router.last_index.tolist()
        per_batch = ""
        if got == [0, 0]:
            per_batch = (
                " Row 1 took row 0's route: the hold is per row (each row keeps its own prompt's "
                "route), not one route for the batch"
            )
        assert got == [0, -1], (
            "during KV-cache decoding (prompt_mask all False) each row keeps the route its "
            "prompt chose: the new token alone is no key (its query is NaN); want [0, -1], "
            f"got {got}.{per_batch}"
        )
        torch.testing.assert_close(out[0], cb.values[0](step_in[:1]) + step[0])
        assert torch.equal(out[1], plain_step[1]), (
            "row 1's prompt missed: its decoding steps use layer l itself"
        )
        model(step[:1], prompt_mask=no_prompt[:1])  # another batch size: nothing to hold
        assert router.last_index.tolist() == [-1], (
            "a decoding step of another batch size has no held route: a miss; "
            f"got {router.last_index.tolist()}"
        )


def test_a_new_prompt_replaces_the_held_route_even_when_no_row_hits():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cb = Codebook("euc")
    cb.add(query_of(model, x, mask)[0], changed_copy(model.fc2, 1), 1e-4, "a")  # row 0 hits
    other = torch.randn(2, 3, 4) * 3  # a second prompt, of the same batch size, far from entry 0
    step = torch.randn(2, 1, 4)
    no_prompt = torch.zeros(2, 1, dtype=torch.bool)
    plain_step = model(step)
    assert decide(query_of(model, other, mask), cb)[0].tolist() == [-1, -1], "the test's set-up"
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=mask)  # prompt 1: row 0 hits entry 0
        model(step, prompt_mask=no_prompt)  # its decoding step: row 0 held on entry 0
        model(other, prompt_mask=mask)  # prompt 2: no row hits
        assert router.last_index.tolist() == [-1, -1], (
            f"prompt 2 is far from every key: want last_index [-1, -1], got "
            f"{router.last_index.tolist()}"
        )
        out = model(step, prompt_mask=no_prompt)  # prompt 2's decoding step
        got = router.last_index.tolist()
    assert got == [-1, -1] and torch.equal(out, plain_step), (
        "a decoding step holds the route of ITS prompt: prompt 2 missed everywhere, so its steps "
        f"use layer l itself; got last_index {got}, the route of the earlier prompt. Store the "
        "routes on every call that has prompt positions, also when no row hits (before "
        "returning None)"
    )


def test_the_route_is_held_while_a_vlm_generates(tiny, records):
    images = [r.image for r in records[:3]]
    questions = [r.question for r in records[:3]]
    batch = tiny.encode(images, questions)
    batch.pop("labels")
    cb = Codebook("cos")
    with Router(tiny, tiny.target_layer, cb) as router:
        tiny(**batch)
        assert router.last_query is not None, (
            "route must set router.last_query, even with an empty codebook"
        )
        keys = router.last_query.clone()
    layer = tiny.get_submodule(tiny.target_layer)
    calls = []  # one per call of the layer: the prefill, then each step
    counter = layer.register_forward_hook(lambda *_: calls.append(1))
    cb.add(keys[0], changed_copy(layer, 0), 1e-6, "row 0's edit")
    plain = tiny(**batch).logits
    with Router(tiny, tiny.target_layer, cb) as router:
        edited = tiny(**batch).logits
        assert router.last_index.tolist() == [0, -1, -1], (
            f"only row 0 sits on entry 0's key; got last_index {router.last_index.tolist()}"
        )
        calls.clear()
        tiny.generate(images, questions)  # prefill, then decoding steps with prompt_mask all False
        counter.remove()
        assert len(calls) > 1, "generate made no decoding step"
        assert router.last_index.tolist() == [0, -1, -1], (
            "after generate, the last decoding step must still route row 0 to entry 0 (the route "
            f"its prompt chose, held through the KV-cache steps); got {router.last_index.tolist()}"
        )
    assert not torch.equal(edited[0], plain[0]), "row 0 hits: its logits must change"
    assert torch.equal(edited[1:], plain[1:]), (
        "rows 1 and 2 miss: their logits must be bit-identical to the plain model's"
    )


# ---------------------------------------------------------------- the four rules, one each


def test_a_call_without_a_mask_holds_nothing():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    every = torch.ones(2, 3, dtype=torch.bool)
    step = torch.randn(2, 1, 4) * 10  # one new token per row
    no_prompt = torch.zeros(2, 1, dtype=torch.bool)
    own = fc2_input(model, step).reshape(2, 6).detach()  # without a mask each row is a sample
    cb = Codebook("euc")
    cb.add(keys_by_hand(model, x, every)[0], changed_copy(model.fc2, 1), 1e-4, "a")
    cb.add(own[1], changed_copy(model.fc2, 2), 1e-4, "b")
    prompt_route = decide(keys_by_hand(model, x, every), cb)[0].tolist()
    unmasked_route = decide(own, cb)[0].tolist()
    assert prompt_route == [0, -1] and unmasked_route == [-1, 1], "the test's own set-up"
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=every)  # a prompt: row 0 hits entry 0
        model(step)  # a call without a mask
        got = routes(router)
        assert got == unmasked_route, (
            "a call without a mask routes each row on its own input (here each row of fc2's 2-D "
            f"input is one sample), whatever was held: want last_index {unmasked_route}, "
            f"got {got}"
        )
        model(step, prompt_mask=no_prompt)  # a decoding step after it, with no prompt of its own
        got = routes(router)
    hint = ""
    if got == prompt_route:
        hint = (
            " That is the route of the prompt before the call without a mask: that call must "
            "clear the hold (self.held = None), not leave the old prompt's routes in place"
        )
    elif got == unmasked_route:
        hint = " That is the unmasked call's own route: it holds nothing, so do not store it"
    assert got == [-1, -1], (
        "a call without a mask holds nothing: a decoding step after it has no prompt whose route "
        f"it could keep, so its rows miss; want last_index [-1, -1], got {got}.{hint}"
    )


def test_a_new_prompt_replaces_the_held_routes_row_by_row():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(3, 3, 4)
    every = torch.ones(3, 3, dtype=torch.bool)
    new = torch.randn(3, 3, 4) * 3  # new prompts, for some rows only
    row_1 = torch.zeros(3, 3, dtype=torch.bool)
    row_1[1] = True  # a call in which row 1 alone has prompt positions
    row_0 = torch.zeros(3, 3, dtype=torch.bool)
    row_0[0] = True  # one in which row 0 alone has
    keys = keys_by_hand(model, x, every)
    cb = Codebook("euc")
    cb.add(keys[0], changed_copy(model.fc2, 1), 1e-4, "a")  # row 0's first prompt: entry 0
    cb.add(keys[1], changed_copy(model.fc2, 2), 1e-4, "b")  # row 1's: entry 1
    cb.add(keys_by_hand(model, new, row_1)[1], changed_copy(model.fc2, 3), 1e-4, "c")
    first = decide(keys, cb)[0].tolist()
    second = decide(keys_by_hand(model, new, row_1)[1:2], cb)[0].tolist()
    third = decide(keys_by_hand(model, new, row_0)[0:1], cb)[0].tolist()
    assert (first, second, third) == ([0, 1, -1], [2], [-1]), "the test's own set-up"
    step = torch.randn(3, 1, 4) * 10
    no_prompt = torch.zeros(3, 1, dtype=torch.bool)
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=every)
        got = routes(router)
        assert got == first, f"the first prompt: want last_index {first}, got {got}"
        model(new, prompt_mask=row_1)  # row 1's new prompt hits entry 2
        got = routes(router)
        hint = ""
        if got == [-1, 2, -1]:
            hint = (
                " The new prompt replaced every row's route: rows 0 and 2 had no prompt position "
                "in this call, so they keep their held routes"
            )
        assert got == [0, 2, -1], (
            "a call with prompt positions replaces the held route of each row that has prompt "
            "positions in it, and keeps the held route of each row that has none: row 1's new "
            f"prompt hits entry 2, row 0 keeps entry 0; want last_index [0, 2, -1], got {got}."
            f"{hint}"
        )
        model(new, prompt_mask=row_0)  # row 0's new prompt misses
        got = routes(router)
        assert got == [-1, 2, -1], (
            "row 0's new prompt misses every ball: its held route is replaced by the miss (a "
            "new prompt replaces its row's route also when it misses), rows 1 and 2 keep theirs; "
            f"want last_index [-1, 2, -1], got {got}"
        )
        model(step, prompt_mask=no_prompt)
        got = routes(router)
    assert got == [-1, 2, -1], (
        "a decoding step keeps each row's latest prompt route; want last_index [-1, 2, -1], "
        f"got {got}"
    )


def test_a_new_batch_size_starts_a_new_hold():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    every = torch.ones(2, 3, dtype=torch.bool)
    cb = Codebook("euc")
    cb.add(keys_by_hand(model, x, every)[0], changed_copy(model.fc2, 1), 1e-4, "a")
    assert decide(keys_by_hand(model, x, every), cb)[0].tolist() == [0, -1], "the set-up"
    step = torch.randn(2, 1, 4) * 10
    no_prompt = torch.zeros(2, 1, dtype=torch.bool)
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=every)  # a prompt of 2 rows: row 0 hits entry 0
        model(step[:1], prompt_mask=no_prompt[:1])  # a decoding step of 1 row
        got = routes(router)
        assert got == [-1], (
            "a call of another batch size than the held routes' has nothing to hold from: its "
            f"rows without prompt positions miss; want last_index [-1], got {got}"
        )
        model(step, prompt_mask=no_prompt)  # 2 rows again, still no prompt
        got = routes(router)
    hint = ""
    if got == [0, -1]:
        hint = (
            " That is the hold of the 2-row prompt from before the 1-row call: a new batch size "
            "starts a new hold, and the old one is gone, not kept for later"
        )
    assert got == [-1, -1], (
        "a call of a new batch size starts a new hold (its own routes replace what was held), so "
        "a later step of 2 rows has no 2-row prompt to follow: its rows miss; want last_index "
        f"[-1, -1], got {got}.{hint}"
    )


def test_a_removed_entry_drops_the_held_routes():
    torch.manual_seed(0)
    model = FlatToy()
    x = torch.randn(2, 3, 4)
    every = torch.ones(2, 3, dtype=torch.bool)
    keys = keys_by_hand(model, x, every)
    cb = Codebook("euc")
    cb.add(torch.full((6,), 50.0), changed_copy(model.fc2, 1), 1e-4, "far from both rows")
    cb.add(keys[0], changed_copy(model.fc2, 2), 1e-4, "row 0's")  # entry 1
    cb.add(keys[1], changed_copy(model.fc2, 3), 1e-4, "row 1's")  # entry 2
    assert decide(keys, cb)[0].tolist() == [1, 2], "the test's own set-up"
    step = torch.randn(2, 1, 4) * 10
    no_prompt = torch.zeros(2, 1, dtype=torch.bool)
    with Router(model, "fc2", cb) as router:
        model(x, prompt_mask=every)  # row 0 holds entry 1, row 1 entry 2
        cb.remove(0)  # a lower entry: entries 1 and 2 move down to 0 and 1
        try:
            model(step, prompt_mask=no_prompt)
        except IndexError as e:
            pytest.fail(
                f"a decoding step after a removal raised IndexError ({e}): a held index ran past "
                "the codebook's end. An entry removed since the routes were held "
                "(self.codebook.removals has changed) drops what was held: the rows without "
                "prompt positions miss"
            )
        got = routes(router)
        now = [f"row {b} went to index {g}, now what was entry {g + 1}" for b, g in enumerate(got)]
        assert got == [-1, -1], (
            "entry 0 was removed after the prompt (self.codebook.removals grew): the entries after "
            "it moved down one index, so a held index may now name another entry, or none; what "
            "was held is dropped, and the rows without prompt positions miss; want last_index "
            f"[-1, -1], got {got}: " + ", ".join(n for n, g in zip(now, got) if g >= 0)
        )
        model(x, prompt_mask=every)  # a new prompt holds again
        want = decide(keys, cb)[0].tolist()
        assert want == [0, 1], "the test's own set-up"
        cb.add(torch.full((6,), -50.0), changed_copy(model.fc2, 4), 1e-4, "added")
        model(step, prompt_mask=no_prompt)
        got = routes(router)
    assert got == want, (
        "after a removal a new prompt's routes are held again (compare self.codebook.removals "
        "with its count when you held), and an entry added since changes nothing (it goes at the "
        f"end: the held indices keep their meaning); want last_index {want}, got {got}"
    )
