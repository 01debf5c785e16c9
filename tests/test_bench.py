"""The pieces of `python bench.py`, fast: the bytes-per-entry arithmetic (golden numbers for
OPT-2.7B's fc2), the alternating timer, routing with thousands of far entries (out-of-scope rows
bit-identical), the naive-vs-cached edit figure, the edit's cost in forwards three ways, and the
command line (the output claimed before any work). The whole bench is too slow for tests, and
``--real-size`` never runs here.

Already covered elsewhere, not repeated here: cached == naive training for full and LoRA values
(test_editor.test_cached_training_matches_the_naive_loop), LoRA values routing and saving/loading
like full ones (test_editor.test_save_load_round_trip_and_mismatch, test_routing.test_lora_value).
"""

import json

import pytest
import torch

import balancedit as be
import bench
import blip2
import evaluate
import models


def test_bytes_per_entry_golden_for_opt_2_7b_fc2():
    sizes = bench.bytes_per_entry()  # nn.Linear(10240, 2560) in fp16, on the meta device
    key_and_radius = 10240 * 4 + 4  # float32 key (D = 10240) and float32 radius
    full = 2560 * 10240 * 4 + 2560 * 4  # weight + bias, trained and kept in float32 (Float32)
    assert sizes["full"]["value_bytes"] == full == 104_867_840
    assert sizes["full"]["entry_bytes"] == full + key_and_radius
    for r in (4, 8, 16):
        # A (r, in) + B (out, r)
        assert sizes[f"lora{r}"]["value_bytes"] == (r * 10240 + 2560 * r) * 4
        assert sizes[f"lora{r}"]["entry_bytes"] == (r * 10240 + 2560 * r) * 4 + key_and_radius
    assert sizes["lora8"]["entry_bytes"] == 450_564
    assert sizes["lora8"]["ratio_to_full"] == pytest.approx(450_564 / 104_908_804)
    assert sizes["lora8"]["ratio_to_full"] <= 1 / 50
    assert sizes["full"]["ratio_to_full"] == 1.0


def test_alternate_takes_turns_and_returns_medians():
    calls = []
    fake = {"a": [9.0, 1.0, 2.0, 3.0], "b": [9.0, 5.0, 7.0, 6.0]}  # the first turn is the warm-up

    def timer(name):
        def run():
            calls.append(name)
            return fake[name][sum(c == name for c in calls) - 1]

        return run

    medians = bench.alternate({"a": timer("a"), "b": timer("b")}, repeats=3, warmup=1)
    assert medians == {"a": 2.0, "b": 6.0}
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # A B, B A, ...


def test_many_far_entries_leave_out_of_scope_rows_bit_identical(tiny, records):
    batch = tiny.encode(
        [r.image for r in records], [r.question for r in records], [r.target for r in records]
    )
    with torch.no_grad():
        plain = tiny(**batch).logits
    editor = be.BalancEditor(tiny, be.BalancEditConfig())
    real = editor.keys_of([r.image for r in records], [r.question for r in records])  # (B, D)
    layer = tiny.get_submodule(tiny.target_layer)
    cb = be.Codebook("cos")
    shared = be.new_value(layer, "lora", rank=1)
    for key in bench.far_keys(real, 2000, seed=1):
        cb.add(key, shared, 0.0, "far")
    assert float(be.distance(real, cb.keys, "cos").min()) >= 1.0  # far: ReLU inputs vs negated keys
    with torch.no_grad(), be.Router(tiny, tiny.target_layer, cb) as handle:
        assert torch.equal(tiny(**batch).logits, plain)
        assert handle.last_index.tolist() == [-1] * len(records)
        # One entry on sample 0's own key: only row 0 changes, the others stay bit-identical.
        value = be.new_value(layer)
        value.bias.requires_grad_(False).add_(1.0)
        cb.add(real[0], value, 1e-3, "hit")
        routed = tiny(**batch).logits
        assert handle.last_index.tolist() == [2000] + [-1] * (len(records) - 1)
    assert not torch.equal(routed[0], plain[0])
    assert torch.equal(routed[1:], plain[1:])


def test_hook_overhead_bench_runs_and_checks(tiny, records):
    out = bench.bench_hook_overhead(
        tiny, records, be.BalancEditConfig(), sizes=(1, 50), repeats=1, batch_size=8, progress=False
    )
    assert set(out) == {1, 50}
    assert all(r["plain_s"] > 0 and r["hooked_s"] > 0 and r["ratio"] > 0 for r in out.values())


def test_edit_speed_bench_compares_the_same_training(tiny, records):
    r = bench.bench_edit_speed(tiny, records[0], be.BalancEditConfig(steps=3, lr=1e-2), repeats=1)
    assert r["naive_s"] > 0 and r["cached_s"] > 0 and r["speedup"] == r["naive_s"] / r["cached_s"]
    assert r["weights_max_rel_diff"] < 1e-5


def test_entry_bytes_count_left_over_gradients():
    layer = torch.nn.Linear(8, 4)
    value = be.new_value(layer)
    clean = bench.entry_bytes(value, 8)
    assert clean == (8 * 4 + 4) * 4 + 8 * 4 + 4
    value(torch.randn(2, 8)).sum().backward()
    # a gradient doubles the value's bytes
    assert bench.entry_bytes(value, 8) == clean + (8 * 4 + 4) * 4


def test_edit_cost_bench_times_three_ways_that_train_the_same_value(records):
    backbone = blip2.random_blip2(n_query=4)
    cfg = be.BalancEditConfig(steps=3, lr=1e-2)
    r = bench.bench_edit_cost(backbone, records[0], cfg, repeats=1, forwards=1)
    batch = backbone.encode([records[0].image], [records[0].question], [records[0].target])
    assert r["positions"] == batch["input_ids"].shape[1] and r["steps"] == 3
    for way in ("plain", "previous", "new"):
        assert r[f"{way}_forwards"] == r[f"{way}_s"] / r["forward_s"] > 0
        assert r[f"{way}_weights_max_rel_diff"] < 1e-5
    assert r["new_vs_plain"] == r["plain_s"] / r["new_s"]
    assert r["steps_floor_forwards"] == 2 * 3 * r["head_read_s"] / r["forward_s"] > 0


def test_the_previous_path_runs_two_forwards_and_every_position(tiny, records, monkeypatch):
    """previous_edit: keys_of's forward, then the tail of the edit's own batch."""
    tails = []
    original = tiny.tail
    calls = []

    def spy(batch, layer_path, per_position=False):
        tail = original(batch, layer_path, per_position)
        tails.append(tail)
        return tail

    monkeypatch.setattr(tiny, "tail", spy)
    with tiny.register_forward_pre_hook(lambda *_: calls.append(1)):
        bench.previous_edit(tiny, records[0], be.BalancEditConfig(steps=2))
    assert len(calls) == 2 and len(tails) == 1
    assert tails[0].h.shape[:2] == tails[0].inputs.shape[:2]  # (1, T, F): every position


def test_the_output_is_claimed_before_any_work_and_released_if_the_run_fails(
    tmp_path, monkeypatch, capsys
):
    ran = []
    monkeypatch.setattr(bench, "run", lambda quick, progress: ran.append(1) or {"x": 1})
    (tmp_path / "plain").write_text("")
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", str(tmp_path / "plain" / "b.json")])  # under a file: refused
    assert e.value.code == 2 and "cannot write there" in capsys.readouterr().err and not ran
    out = tmp_path / "new" / "folder" / "b.json"
    assert bench.main(["--json", str(out), "--quick"]) == 0 and ran == [1]
    assert json.loads(out.read_text()) == {"x": 1}

    def fails(quick, progress):
        raise RuntimeError("the run fails before writing")

    monkeypatch.setattr(bench, "run", fails)
    with pytest.raises(RuntimeError):
        bench.main(["--json", str(tmp_path / "made" / "here" / "b.json")])
    assert not (tmp_path / "made").exists()  # the folders it made are gone again


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cpu"], "--device and --dtype go with --real-size"),
        (["--quick", "--real-size"], "not allowed with"),
        (["--real-size", "--device", "cuda:7"], "not a device of this machine"),
        (["--real-size", "--device", "tpu-ish"], "not a device of this machine"),
    ],
)
def test_command_line_mistakes_are_one_line_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--json", str(tmp_path / "b.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_alternate_says_when_the_repeats_spread_like_a_busy_machine(capsys):
    steady = iter([1.0] * 4)
    jumpy = iter([1.0, 1.0, 3.0, 1.0])
    bench.alternate({"steady": lambda: next(steady), "jumpy": lambda: next(jumpy)}, repeats=3)
    err = capsys.readouterr().err
    assert "jumpy's repeats spread 200%" in err and "steady" not in err
    assert bench.SPREADS["steady"] == 0.0


def test_the_editors_section_times_every_editor_and_leaves_the_model_plain(records):
    """Each editor of the comparison edits the shipped TinyVLM in turns, and MEND's training
    time comes from its shipped editor; no editor writes the model."""
    shipped = models.TinyVLM.from_pretrained()
    plain = shipped(**shipped.encode([records[0].image], [records[0].question])).logits
    figures, details = bench.section_editors(shipped, records[0], be.BalancEditConfig(steps=2), 1)
    assert set(details["editors_s_per_edit"]) == set(evaluate.METHODS) - {"base"}
    assert all(s > 0 for s in details["editors_s_per_edit"].values())
    assert figures["mend_edit_vs_balancedit"] > 0 and details["mend_training"]["seconds"] > 0
    after = shipped(**shipped.encode([records[0].image], [records[0].question])).logits
    assert torch.equal(after, plain)
