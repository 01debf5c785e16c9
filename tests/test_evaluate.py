"""Tests for evaluate.py: the metrics (golden HM, hand-made predictions), teacher-forced
token predictions, the protocols' model-unchanged check, and the command line."""

import contextlib
import copy
import json
import types

import pytest
import torch
from conftest import TINY

import cli
import data
import evaluate
import models
import world
import writers
from baselines import Grace, GraceConfig
from editor import Editor
from evaluate import Observation, exact_match, hm, score, token_accuracy


@pytest.fixture(scope="module")
def records():  # three records (the protocol tests count them)
    return data.load_sample(limit=3)


# ---------------------------------------------------------------- metrics


def test_hm_golden_values_from_the_paper():
    assert round(hm(99.90, 98.91, 71.74), 2) == 88.08  # Table 3
    assert round(hm(95.88, 96.20, 3.20), 2) == 9.00
    assert hm(100.0, 100.0, 100.0) == pytest.approx(100.0)


@pytest.mark.parametrize("zero_at", range(3))
def test_hm_is_zero_if_any_is_zero(zero_at):
    xs = [50.0, 80.0, 90.0]
    xs[zero_at] = 0.0
    assert hm(*xs) == 0.0


def test_token_accuracy_is_the_mean_over_samples_of_per_sample_fractions():
    # sample 1: 2 of 3 right; sample 2: 2 of 2 right -> (2/3 + 1) / 2, not 4/5 over tokens
    assert token_accuracy([[1, 2, 3], [4, 5]], [[1, 2, 0], [4, 5]]) == pytest.approx(
        100 * (2 / 3 + 1) / 2
    )
    assert token_accuracy([[7]], [[8]]) == 0.0
    assert token_accuracy([], []) is None
    with pytest.raises(AssertionError):
        token_accuracy([[1, 2]], [[1]])


def test_exact_match():
    assert exact_match(["a b", "c", "d"], ["a b", "x", "d"]) == pytest.approx(200 / 3)
    assert exact_match([], []) is None


def test_score_on_hand_made_observations():
    pre = Observation(
        tokens={
            "acc": [([1], [9])],
            "t_gen": [],
            "i_gen": [],
            "loc": [([4, 5], [4, 6]), ([7], [7])],
            "m_loc": [([3], [3])],
            "q_loc": [([5], [5]), ([6], [6])],
        },
        texts={
            "acc": ["old"],
            "t_gen": [],
            "i_gen": [],
            "loc": ["p", "q"],
            "q_loc": ["red", "circle"],
        },
    )
    post = Observation(
        tokens={
            "acc": [([9, 2], [9, 3])],  # 1 of 2
            "t_gen": [([9], [9]), ([1], [9])],  # 1 of 2 samples
            "i_gen": [([9, 3], [9, 3])],  # all right
            "loc": [([4, 6], [4, 6]), ([7], [7])],  # vs pre: 1/2 and 1/1
            "m_loc": [([2], [3])],  # vs pre: 0
            "q_loc": [([5], [5]), ([9], [6])],
        },  # vs pre: 1 of 2 samples
        texts={
            "acc": ["new"],
            "t_gen": ["new", "old"],
            "i_gen": ["other"],
            "loc": ["p", "z"],
            "q_loc": ["red", "new"],
        },
    )
    m = score(post, pre, "new")
    assert m["acc"] == 50.0 and m["t_gen"] == 50.0 and m["i_gen"] == 100.0
    assert m["loc"] == pytest.approx(75.0)  # Loc compares with the PRE-edit argmax, not the labels
    assert m["m_loc"] == 0.0
    assert m["gen_acc"] == 100.0 and m["gen_t_gen"] == 50.0 and m["gen_i_gen"] == 0.0
    assert m["gen_loc"] == 50.0
    assert m["q_loc"] == 50.0 and m["gen_q_loc"] == 50.0  # the edit's image asked another question
    s = evaluate.summarize([m, {**m, "acc": 100.0}], [1.0, 3.0])
    assert s["acc"] == 75.0 and s["seconds_per_edit"] == 2.0 and s["n_records"] == 2
    assert s["hm"] == pytest.approx(hm(50.0, 100.0, 75.0))


# ---------------------------------------------------------------- predictions on a backbone


class _Oracle(torch.nn.Module):
    """A fake backbone whose logits at t are one-hot on the input token at t+1: with the
    right shift (t-1 predicts t) every answer token is predicted correctly."""

    eos_token_id = 2

    def encode(self, images, questions, answers=None):
        rows = [
            [10 + len(q), 11, 12] + [20 + len(w) for w in a.split()] + [self.eos_token_id]
            for q, a in zip(questions, answers)
        ]
        return models.left_pad(rows, [3] * len(rows), pad_id=0)

    def to_device(self, batch):
        return batch

    def forward(self, input_ids, **_):
        nxt = torch.roll(input_ids, -1, dims=1)  # (B, T)
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, 64).float())


def test_token_predictions_shift_and_eos():
    samples = [data.Sample(None, "q", "a bb ccc"), data.Sample(None, "qq", "dddd")]
    out = evaluate.token_predictions(_Oracle(), samples)
    assert [gold for _, gold in out] == [[21, 22, 23], [24]]  # answer tokens, EOS not counted
    assert all(pred == gold for pred, gold in out)


def test_token_predictions_batched_like_one_by_one(tiny, records):
    r = records[0]
    samples = [data.Sample(r.image, q, r.target) for q in [r.question] + r.rephrases] + r.m_locality
    together = evaluate.token_predictions(tiny, samples)
    alone = [evaluate.token_predictions(tiny, [s])[0] for s in samples]
    assert [g for _, g in together] == [g for _, g in alone]
    words = [len(s.answer.split()) for s in samples]
    assert [
        len(g) for _, g in together
    ] == words  # word-level tokenizer: one token per word, no EOS
    agree = sum(p1 == p2 for (p1, _), (p2, _) in zip(together, alone))
    assert agree >= len(samples) - 1  # padding may flip a float tie, not more


def test_base_has_loc_100(tiny, records):
    out = evaluate.run_base(tiny, records, progress=False)
    assert out["loc"] == 100.0 and out["m_loc"] == 100.0 and out["gen_loc"] == 100.0
    assert out["n_records"] == 3 and out["seconds_per_edit"] is None


def test_grace_reads_the_layer_at_the_last_prompt_position_bit_for_bit(tiny, records):
    """Grace.at_key: layer l's input and output at the last prompt position, as a forward with a
    hook on the layer records them."""
    r = records[0]
    grace = Grace(tiny, GraceConfig(steps=2))
    h, y, batch, write = grace.at_key([r.image], [r.question], [r.target])
    seen = []
    layer = tiny.get_submodule(tiny.target_layer)
    with torch.no_grad(), layer.register_forward_hook(lambda m, a, o: seen.append((a[0], o))):
        tiny(**batch)
    T = batch["prompt_mask"].shape[1]
    last = int(batch["prompt_mask"][0].nonzero().max())
    assert write.tolist() == [[t == last for t in range(T)]]
    assert torch.equal(h, seen[0][0].reshape(T, -1)[last].float())
    assert torch.equal(y, seen[0][1].reshape(T, -1)[last].float())


# ---------------------------------------------------------------- protocols: the model unchanged


class HookEditor(Editor):
    """A fake editor with the method surface: each edit registers a forward hook on the
    target layer that really changes the output; remove/reset take it away (unless told not to)."""

    def __init__(self, backbone, forget_remove=False, in_place=False):
        self.backbone = backbone
        self.forget_remove = forget_remove
        self.in_place = in_place
        self.handles = {}  # edit index -> its hook's handle
        self.next = 0  # the next edit's index
        self.layer = backbone.get_submodule(backbone.target_layer)

    def edit(self, record):
        shift = (
            torch.randn(self.layer.out_features, generator=torch.Generator().manual_seed(self.next))
            * 5
        )
        if self.in_place:
            with torch.no_grad():
                self.layer.bias.add_(shift)
        else:
            self.handles[self.next] = self.layer.register_forward_hook(lambda m, a, o: o + shift)
        self.next += 1
        return types.SimpleNamespace(index=self.next - 1, action="new", seconds=0.5)

    @contextlib.contextmanager
    def attached(self):
        yield self

    def remove(self, i):
        handle = self.handles.pop(i, None)  # in-place edits have none: the weight stays changed
        if handle is not None and not self.forget_remove:
            handle.remove()

    def reset(self):
        for i in list(self.handles):
            self.remove(i)

    def __len__(self):
        return len(self.handles)


@pytest.mark.parametrize("run", [evaluate.run_single, evaluate.run_sequential])
def test_protocol_passes_when_the_edit_is_undone(tiny, records, run):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    out = run(HookEditor(tiny), tiny, records, progress=False)
    assert out["n_records"] == 3 and out["seconds_per_edit"] == 0.5
    assert out["loc"] < 100.0  # the scoring really saw the edit
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("run", [evaluate.run_single, evaluate.run_sequential])
@pytest.mark.parametrize("kind", ["forget_remove", "in_place"])
def test_protocol_raises_when_the_model_is_left_changed(records, run, kind):
    torch.manual_seed(0)
    # Its own copy: this test damages it.
    backbone = models.TinyVLM(TINY, models.build_tokenizer(world.vocabulary())).eval()
    with pytest.raises(evaluate.ModelChanged):
        run(HookEditor(backbone, **{kind: True}), backbone, records[:2], progress=False)


def test_check_sees_a_parameter_change_that_leaves_the_outputs_alone(tiny, records):
    before = evaluate.snapshot(tiny, records[0])
    pos = tiny.lm.model.decoder.embed_positions.weight  # the last position is never used here
    with torch.no_grad():
        pos[-1] += 1.0
    try:
        assert torch.equal(evaluate.snapshot(tiny, records[0]).logits, before.logits)
        with pytest.raises(evaluate.ModelChanged, match="embed_positions"):
            evaluate.check_unchanged(tiny, before)
    finally:
        with torch.no_grad():
            pos[-1] -= 1.0
    evaluate.check_unchanged(tiny, evaluate.snapshot(tiny, records[0]))


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("tinyvlm")
    tiny.save_pretrained(path)
    return path


def test_cli_run_writes_the_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        cli.main(
            [
                "--model",
                str(checkpoint),
                "--limit",
                "3",
                "--steps",
                "2",
                "--no-progress",
                "--methods",
                "base,balancedit",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "| Method | Acc | T-Gen | I-Gen | Loc | q_loc | HM | gen Acc | gen T-Gen | gen I-Gen "
        "| gen Loc | gen q_loc | s/edit |" in printed
    )
    assert str(out) in printed
    result = json.loads(out.read_text())
    assert {"backbone", "data", "protocol", "config", "methods"} <= result.keys()
    assert (
        result["backbone"] == "tiny"
        and result["protocol"] == "single"
        and result["config"]["steps"] == 2
    )
    assert list(result["methods"]) == ["base", "balancedit"]
    for name, m in result["methods"].items():
        for key in (
            "acc",
            "t_gen",
            "i_gen",
            "loc",
            "q_loc",
            "m_loc",
            "hm",
            "seconds_per_edit",
            "gen_acc",
            "gen_t_gen",
            "gen_i_gen",
            "gen_loc",
            "gen_q_loc",
        ):
            assert key in m, (name, key)
        assert m["n_records"] == 3
    assert result["methods"]["balancedit"]["seconds_per_edit"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "base,rome"],
        ["--data", "/no/such/dir"],
        ["--alpha", "2.0"],
        ["sweep-alpha", "--alpha", "0.5"],
        ["--limit", "0"],
        ["--device", "cuda:7"],
        ["--device", "bogus"],
        ["--backbone", "blip2"],
        ["--backbone", "blip2", "--model", "/no/such/model"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and "error" in err, err


@pytest.mark.parametrize("out", ["dir", "x.png", "file/x.json"])
def test_cli_refuses_a_bad_out_before_any_work(out, tmp_path, capsys, monkeypatch):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a directory")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(
        cli, "load_records", lambda args: pytest.fail("work started before --out was checked")
    )
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep-alpha", "--out", str(tmp_path / out), "--no-progress"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_each_variant_has_its_own_default_output():
    """Only the main job writes results/main.json; a run with other options is named after them."""

    def out(*argv):
        return cli.default_out(cli.parse_args(argv))

    assert out() == out("--no-progress", "--device", "cpu") == "results/main.json"
    assert out("--methods", ",".join(evaluate.METHODS)) == "results/main.json"  # the default
    assert out("--protocol", "sequential") == "results/main_sequential.json"
    grace = "results/main_methods-grace_grace-eps0-4.0.json"
    assert out("--methods", "grace", "--grace-eps0", "4") == grace
    assert out("--model", "/x/y/tiny2", "--value-form", "lora") == (
        "results/main_model-tiny2_value-form-lora.json"
    )
    assert out("sweep-alpha") == "results/sweep_alpha.json"
    assert out("show-edit", "--record", "1", "--pool", "last") == (
        "results/show_edit_pool-last_record-1.json"
    )


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("target", "zzyzx", "'zzyzx'"),  # not in TinyVLM's vocabulary: it would be edited as <unk>
        (
            "question",
            " ".join(["what"] * 200) + "?",
            "positions",
        ),  # longer than TinyVLM's 192 positions
        ("question", " ".join(["what"] * 120) + "?", "IKE"),  # fits alone, not after IKE's text
    ],
)
def test_cli_refuses_a_record_the_backbone_cannot_encode(field, value, says, tmp_path, capsys):
    record = copy.copy(data.load_sample(limit=1)[0])
    setattr(record, field, value)
    writers.write_okedit([record], tmp_path / "d")
    with pytest.raises(SystemExit) as e:
        cli.main(
            ["--data", str(tmp_path / "d"), "--no-progress", "--out", str(tmp_path / "r.json")]
        )
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and f"record {record.id}" in err
        and says in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "r.json").exists()


def test_show_edit_and_show_codebook_draw_and_report(checkpoint, tmp_path, capsys):
    common = ["--model", str(checkpoint), "--limit", "3", "--steps", "2", "--no-progress"]
    assert (
        cli.main(["show-edit", "--record", "1", "--out", str(tmp_path / "edit.png"), *common]) == 0
    )
    edit = json.loads((tmp_path / "edit.json").read_text())
    assert (tmp_path / "edit.png").stat().st_size > 0 and edit["record"] == 1  # an index
    assert edit["record_id"] == data.load_sample(limit=3)[1].id
    assert min(edit["d_pos"], edit["d_neg"]) <= edit["radius"] <= max(edit["d_pos"], edit["d_neg"])
    assert {"rephrasings (T-Gen)", "other images (I-Gen)", "near misses (Loc)"} <= set(
        edit["probes"]
    )
    assert all(
        d >= 0 and isinstance(changed, bool)
        for points in edit["probes"].values()
        for d, changed in points
    )
    assert cli.main(["show-codebook", "--out", str(tmp_path / "cb.png"), *common]) == 0
    codebook = json.loads((tmp_path / "cb.json").read_text())
    assert (tmp_path / "cb.png").stat().st_size > 0 and len(codebook["xy"]) == len(
        codebook["targets"]
    ) == 3
    for argv in (["show-edit", "--record", "3"], ["show-edit", "--out", str(tmp_path / "x.json")]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv + common)
        assert e.value.code == 2


# ---------------------------------------------------------------- GRACE's radius rules at a tie


def _same_target_pair(records):
    """Two records with the same target, in order."""
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            if a.target == b.target:
                return a, b
    pytest.fail("no two records with the same target")


def test_grace_keeps_a_covered_key_inside_its_ball_and_splits_as_grace_does(tiny):
    """A ball grown to cover a key holds it TIE inside, so a query off the key by float noise
    (here 1e-6 farther) still hits; at a split the old ball stops TIE short of half the
    distance, as in GRACE's code."""
    a, b = _same_target_pair(data.load_sample(limit=6))
    g = Grace(tiny, GraceConfig(steps=1))
    k_b = g.at_key([b.image], [b.question])[0]  # (D,)
    d = float(torch.linalg.vector_norm(k_b - g.at_key([a.image], [a.question])[0]))
    g.eps0 = 0.75 * d  # b's key is outside a's first ball, within reach of growing it
    g.edit(a)
    assert g.edit(b).action == "expand"
    cb = g.codebook
    assert cb.radii[0] == pytest.approx(d + 1e-5, abs=1e-7)
    away = (k_b - cb.keys[0]) / d  # (D,): the unit vector from the key to k_b
    _, dist, hit = cb.lookup((k_b + 1e-6 * away)[None])
    assert dist[0] > d and hit.tolist() == [True]

    other = copy.copy(b)
    other.target = next(t for t in ("daben", "fesak") if t != b.target)
    assert g.edit(other).action == "split"
    old, new = cb.radii.tolist()
    assert new == pytest.approx(d / 2, abs=1e-6) and old == pytest.approx(d / 2 - 1e-5, abs=1e-6)


# ---------------------------------------------------------------- outputs claimed by trying


@pytest.mark.parametrize("out", ["/proc/x/r.json", "/sys/x.json"])
def test_an_out_that_only_trying_refuses_fails_at_once(out, capsys, monkeypatch):
    """Root passes os.access on /proc and /sys; only creating the folder and a file tells."""
    monkeypatch.setattr(cli, "load_records", lambda args: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", out, "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"--out {out}: cannot" in err


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(SystemExit):
        cli.main(["--out", str(out), "--data", str(tmp_path / "none"), "--no-progress"])
    assert "--data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the folders made for --out are gone


def test_claim_output_makes_the_folders_keeps_a_file_and_cleans_up(tmp_path):
    kept = tmp_path / "old.json"
    kept.write_text("results")
    cli.claim_output(kept)()  # an existing file: opened for appending, left as it was
    assert kept.read_text() == "results"
    cleanup = cli.claim_output(tmp_path / "a" / "b" / "r.json")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "a" / "note").write_text("someone else's")
    cleanup()  # b was empty: removed; a holds a file now: kept
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "note").exists()
    folder = cli.claim_output(tmp_path / "sample", flag="--out", folder=True)
    assert (tmp_path / "sample").is_dir()
    folder()
    assert not (tmp_path / "sample").exists()
    with pytest.raises(cli.OutputError, match="--json .*: is a folder"):
        cli.claim_output(tmp_path, flag="--json")


# ---------------------------------------------------------------- small things users notice


@pytest.mark.parametrize("device", ["meta", "foo", "cuda:7"])
def test_a_device_to_refuse_says_which_ones_there_are(device, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", device, "--no-progress"])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--device {device}: not a device to run on" in err
    assert "cpu" in err and "CUDA GPUs" not in err and "xla" not in err  # not torch's list


def test_a_tiny_edit_image_is_refused_naming_its_record(monkeypatch, capsys, tmp_path):
    records = data.load_sample(limit=2)
    records[1].image = records[1].image.resize((1, 1))
    monkeypatch.setattr(cli, "load_records", lambda args: (records, "two records"))
    monkeypatch.setattr(cli, "load_backbone", lambda args: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "never.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"record {records[1].id}: its edit image is 1x1 pixels" in err


def test_threads_is_an_option_that_sets_torch_and_names_no_output(monkeypatch):
    args = cli.parse_args(["--threads", "3"])
    assert args.threads == 3 and cli.parse_args([]).threads == 1
    assert cli.default_out(args) == "results/main.json"
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(cli, "setup", lambda args: pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        cli.main(["--threads", "3"])
    assert calls == [3]
