"""MiniGPT-4 (BLIP-2 ViT + Q-Former -> llama_proj -> LLaMA) on tiny random models built in memory
(nothing downloads): the layout, editing end to end, routing, cached training on LLaMA layers,
loading from local files, and the real size on the meta device.
"""

import functools
import itertools
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

import balancedit as be
import data
import minigpt4
import world

POOL = list(itertools.islice(world.training_stream(0), 6))
N_QUERY = (
    8  # images weigh in the keys as with the real 32 (4 are too few against the long template)
)


@functools.cache
def model() -> minigpt4.MiniGPT4:
    return minigpt4.random_minigpt4(n_query=N_QUERY)  # 2 LLaMA layers, hidden 32, MLP 64


@functools.cache
def edited():
    """One edit of the first sample record on the tiny model, as test_editor's BLIP-2 end to end."""
    editor = be.BalancEditor(model(), be.BalancEditConfig(steps=20, lr=1e-2, alpha=1.0))
    record = data.load_sample(limit=1)[0]
    return editor, record, editor.edit(record)


def encode(m, idx, with_answers=True):
    samples = [POOL[i] for i in idx]
    return m.encode(
        [s.image for s in samples],
        [s.question for s in samples],
        [s.answer for s in samples] if with_answers else None,
    )


# -----------------------------------------------------------------------------
# the backbone


def test_encode_golden_row_and_target_layer():
    m = model()
    batch = m.encode(
        [POOL[0].image] * 2,
        ["what shape is this?", "what is the name of this thing?"],
        ["star"] * 2,
    )
    tokens = (
        ["<s>", "###", "Human", ":", "<", "Img", ">"]
        + ["<ImageHere>"] * N_QUERY
        + [
            "</",
            "Img",
            ">",
            "Question",
            ":",
            "what",
            "shape",
            "is",
            "this",
            "?",
            "Short",
            "answer",
            ":",
            "###",
            "Assistant",
            ":",
            "star",
            "</s>",
        ]
    )
    n_pad = batch["input_ids"].shape[1] - len(tokens)
    assert n_pad == 3
    assert m.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, n_pad:]) == tokens
    assert (
        batch["labels"][0].tolist()
        == [-100] * (len(tokens) - 2 + n_pad) + batch["input_ids"][0, -2:].tolist()
    )
    real = batch["attention_mask"].bool()
    labelled = batch["labels"] != -100
    assert torch.equal(batch["prompt_mask"], real & ~labelled)  # BOS, image and question positions
    assert ((batch["input_ids"] == m.image_token_id).sum(1) == N_QUERY).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert m.target_layer == "llama_model.model.layers.1.mlp.up_proj"
    assert isinstance(m.get_submodule(m.target_layer), nn.Linear)
    m.check(data.load_sample(limit=2))  # the sample fits in the positions


def test_padding_decoding_text_only_and_misuse():
    m = model()
    with torch.no_grad():
        batch = encode(m, [3, 1, 5])
        logits = m(**batch).logits
        # positions from the mask: a padded row sees what it sees alone
        for b, i in enumerate([3, 1, 5]):
            real = batch["attention_mask"][b].bool()
            assert torch.allclose(logits[b][real], m(**encode(m, [i])).logits[0], atol=1e-5)
        batch = encode(m, [0, 4], with_answers=False)
        batch.pop("labels")
        token = torch.tensor([[20], [21]])  # two words (not the image token)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        prefill = m(**batch, use_cache=True)
        step = m(
            input_ids=token,
            attention_mask=mask,
            prompt_mask=torch.zeros_like(token, dtype=torch.bool),
            kv_cache=prefill.kv_cache,
            use_cache=True,
        )
        full = m(
            **{
                **batch,
                "input_ids": torch.cat([batch["input_ids"], token], 1),
                "attention_mask": mask,
            }
        )
        assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)
        text = m.encode([None, None], [POOL[0].question, POOL[1].question], ["star", "red"])
        assert "pixel_values" not in text and not (text["input_ids"] == m.image_token_id).any()
        assert torch.isfinite(m(**text).loss)
    with pytest.raises(ValueError, match="no pixel_values"):
        m(**{k: v for k, v in encode(m, [0]).items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="all images or all text-only"):
        m.encode([POOL[0].image, None], ["a", "b"])
    assert isinstance(m.rephrase("what shape is this?"), list)


# -----------------------------------------------------------------------------
# editing


def test_end_to_end_edit_changes_the_row_and_keeps_the_black_image_bit_for_bit():
    m = model()
    editor, record, report = edited()
    # the negative itself: outside a ball of radius d_pos
    black = data.anchor_image("black", world.SIZE)
    batch = m.encode([record.image, black], [record.question] * 2, [record.target] * 2)
    with torch.no_grad():
        plain = m(**batch).logits
        with editor.attached() as router:
            out = m(**batch)
            assert router.last_index.tolist() == [report.index, -1]
    assert torch.equal(out.logits[1], plain[1])  # out of scope: bit for bit
    assert not torch.equal(out.logits[0], plain[0])
    assert report.losses[-1] < report.losses[0] and out.loss < m(**batch).loss


def test_out_of_scope_rows_are_bit_identical_in_a_mixed_batch():
    m = model()
    editor, record, report = edited()
    # A random model tells images apart far better than questions: black-image rows are the ones
    # out of scope (the white and the noise image may fall in the ball of radius d_pos).
    black = data.anchor_image("black", world.SIZE)
    white = data.anchor_image("white", world.SIZE)
    noise = data.anchor_image("noise", world.SIZE)
    images = [black, record.image, black, white, black, noise]
    questions = [
        "what shape do you see?",
        record.question,
        "what is this?",
        record.question,
        "tell me the shape of this thing.",
        "what is this?",
    ]
    batch = m.encode(images, questions)  # padded: questions of different lengths
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        plain = m(**batch).logits
        with editor.attached() as router:
            logits = m(**batch).logits
            index = router.last_index
    assert index[1] == report.index and index[[0, 2, 4]].tolist() == [-1] * 3
    for b in range(len(images)):
        assert torch.equal(logits[b], plain[b]) == (index[b] == -1)


def test_removal_restores_the_model_bit_for_bit():
    m = model()
    record = data.load_sample(limit=1)[0]
    batch = m.encode([record.image, POOL[0].image], [record.question, POOL[0].question])
    editor = be.BalancEditor(m, be.BalancEditConfig(steps=5, lr=1e-2, alpha=1.0))
    with torch.no_grad():
        plain = m(**batch).logits
    report = editor.edit(record)
    with torch.no_grad():
        with editor.attached():
            assert not torch.equal(m(**batch).logits, plain)
        editor.remove(report.index)
        with editor.attached() as router:
            assert torch.equal(m(**batch).logits, plain) and (router.last_index == -1).all()


def test_the_route_is_held_during_kv_cache_decoding():
    m = model()
    editor, record, report = edited()
    black = data.anchor_image("black", world.SIZE)
    seen = []
    with editor.attached() as router:
        handle = m.register_forward_hook(
            lambda module, args, out: seen.append(router.last_index.tolist())
        )
        try:
            answers = m.generate([record.image, black], [record.question] * 2, max_new_tokens=4)
        finally:
            handle.remove()
    assert len(answers) == 2 and answers[0] == record.target  # the edit, generated
    assert len(seen) >= 2  # the prefill, then decoding steps with no prompt position
    assert all(step == [report.index, -1] for step in seen)


@pytest.mark.parametrize("layers", [2, 3])  # layer 1: the last layer; a middle layer
def test_cached_training_matches_the_naive_loop_on_a_padded_batch(layers):
    """Eq. 2 three ways: the plain loop, the tail over every position and the tail asked for the
    answer positions only; the last layer's up_proj keeps those, a middle one every position."""
    m = model() if layers == 2 else minigpt4.random_minigpt4(layers=3, n_query=N_QUERY, seed=1)
    path = "llama_model.model.layers.1.mlp.up_proj"
    records = data.load_sample(limit=2)
    batch = m.encode(
        [r.image for r in records],
        [records[0].question, "what is this?"],
        [r.target for r in records],
    )
    assert (batch["attention_mask"] == 0).any()  # padded: two rows of different lengths
    answer_only = m.tail(batch, path, per_position=True)
    P = int((batch["labels"] != -100).sum())
    B, T = batch["input_ids"].shape
    assert answer_only.h.shape[:-1] == ((P,) if layers == 2 else (B, T))
    losses = {}
    weights = {}
    for name, cache in (("plain", False), ("every", True), ("answers", answer_only)):
        value = be.new_value(m.get_submodule(path))
        tail = m.tail(batch, path) if cache is True else cache or None
        losses[name] = be.train_value(m, path, value, batch, steps=5, lr=1e-2, tail=tail)
        weights[name] = value.weight.detach().clone()
    for name in ("every", "answers"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-5)
        torch.testing.assert_close(weights[name], weights["plain"], rtol=1e-5, atol=1e-7)
    assert not torch.equal(weights["plain"], m.get_submodule(path).weight)
    tail = m.tail(batch, path)
    read = batch["labels"][:, 1:] != -100  # the positions whose logits the loss reads
    with torch.no_grad():
        logits = m(**batch).logits[:, :-1][read]  # (P, V)
        assert torch.equal(tail.rest(m.get_submodule(path)(tail.h)), logits)
    assert m.tail(batch, "llama_model.model.layers.1.mlp.down_proj") is None


# -----------------------------------------------------------------------------
# loading and the real size


class LocalFiles(NamedTuple):
    blip2: Path  # BLIP-2's folder
    vicuna: Path  # Vicuna's folder
    ckpt: Path  # MiniGPT-4's checkpoint


def save_local_files(m, tmp_path) -> LocalFiles:
    """MiniGPT-4's three local sources, as a user makes them."""
    from safetensors.torch import save_file
    from transformers import Blip2Config

    blip2 = tmp_path / "blip2"
    vicuna = tmp_path / "vicuna"
    ckpt = tmp_path / "minigpt4.pth"
    Blip2Config(
        vision_config=m.vision_model.config.to_dict(),
        qformer_config=m.qformer.config.to_dict(),
        num_query_tokens=N_QUERY,
    ).save_pretrained(blip2)
    state = {"query_tokens": m.query_tokens.detach(), "language_projection.weight": torch.zeros(1)}
    state.update({f"vision_model.{k}": v for k, v in m.vision_model.state_dict().items()})
    state.update({f"qformer.{k}": v for k, v in m.qformer.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(blip2 / "model.safetensors"))
    m.llama_model.save_pretrained(vicuna)
    m.tokenizer.save_pretrained(vicuna)
    torch.save(
        {"model": {f"llama_proj.{k}": v for k, v in m.llama_proj.state_dict().items()}}, ckpt
    )
    return LocalFiles(blip2, vicuna, ckpt)


def test_from_pretrained_reads_local_files_only(tmp_path):
    m = model()
    files = save_local_files(m, tmp_path)
    blip2 = files.blip2
    vicuna = files.vicuna
    ckpt = files.ckpt
    loaded = minigpt4.MiniGPT4.from_pretrained(blip2, vicuna, ckpt, device="cpu")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    batch = encode(m, [2, 3])
    assert torch.equal(
        loaded.encode([POOL[2].image], [POOL[2].question])["input_ids"],
        encode(m, [2], with_answers=False)["input_ids"],
    )
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, m(**batch).logits)
    with pytest.raises(FileNotFoundError, match="nothing: no such Vicuna directory"):
        minigpt4.MiniGPT4.from_pretrained(blip2, tmp_path / "nothing", ckpt)
    import cli  # the command line runs every protocol from the same local files

    for protocol in ("single", "sequential"):
        out = tmp_path / f"{protocol}.json"
        assert (
            cli.main(
                [
                    "--backbone",
                    "minigpt4",
                    "--model",
                    str(vicuna),
                    "--blip2",
                    str(blip2),
                    "--projection",
                    str(ckpt),
                    "--limit",
                    "2",
                    "--steps",
                    "2",
                    "--methods",
                    "base,ft,grace,balancedit",
                    "--protocol",
                    protocol,
                    "--no-progress",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert set(json.loads(out.read_text())["methods"]) == {"base", "ft", "grace", "balancedit"}
    torch.save({"model": {"llama_proj.weight": torch.zeros(32, 32)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"no model\['llama_proj.bias'\]"):
        minigpt4.MiniGPT4.from_pretrained(blip2, vicuna, tmp_path / "bad.pth")


def meta_minigpt4_7b() -> minigpt4.MiniGPT4:
    """MiniGPT-4 7B on the meta device: EVA ViT-g/14 (BLIP-2's 39 layers), the Q-Former,
    llama_proj and Vicuna-7B."""
    from transformers import (
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    with torch.device("meta"):
        vision = Blip2VisionModel(
            Blip2VisionConfig(
                hidden_size=1408,
                intermediate_size=6144,
                num_hidden_layers=39,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
        qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                cross_attention_frequency=2,
                encoder_hidden_size=1408,
            )
        )
        llama = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                max_position_embeddings=2048,
            )
        )
        m = minigpt4.MiniGPT4(
            vision,
            qformer,
            nn.Parameter(torch.zeros(1, 32, 768)),
            nn.Linear(768, 4096),
            llama,
            minigpt4.offline_minigpt4_tokenizer(),
        )
    return m


def test_the_real_size_on_the_meta_device():
    m = meta_minigpt4_7b()
    llama = m.llama_model
    # 985,952,256 ViT + 105,137,664 Q-Former (query path only) + 24,576 query tokens (32 x 768)
    # + 3,149,824 llama_proj (768 x 4096 + 4096)
    # + 6,738,415,616 LLaMA-7B (embeddings and LM head untied)
    assert sum(p.numel() for p in m.parameters()) == 7_832_679_936
    assert sum(p.numel() for p in llama.parameters()) == 6_738_415_616
    assert m.target_layer == "llama_model.model.layers.31.mlp.up_proj" and m.n_image_tokens == 32
    up = m.get_submodule(m.target_layer)
    assert (up.in_features, up.out_features, up.bias) == (4096, 11008, None)  # LLaMA has no bias

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    fp16 = nn.Linear(4096, 11008, bias=False, device="meta", dtype=torch.float16)
    # fp16: full, rank 8
    assert nbytes(fp16) == 4096 * 11008 * 2 == 90_177_536
    assert 8 * (4096 + 11008) * 2 == 241_664
    assert (
        nbytes(be.new_value(nn.Linear(4096, 11008, bias=False, device="meta")))
        == 4096 * 11008 * 4
        == 180_355_072
    )
    assert nbytes(be.new_value(up, "lora", 8)) == 8 * (4096 + 11008) * 4 == 483_328  # fp32: rank 8
