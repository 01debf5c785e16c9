"""The vision-language backbones that BalancEdit edits, each behind one small interface.

Every backbone is an ``nn.Module`` with one small interface, so that nothing
outside this file needs to know which one it holds:

- ``target_layer``: the default dotted path (from the backbone itself) of the
  layer ``l`` that BalancEdit wraps; the authors use the last decoder layer's
  ``fc2`` of BLIP-2 OPT, and we do the same on both backbones;
- ``encode(images, questions, answers=None)`` -> a dict batch of tensors, all
  laid out on the decoder's positions ``(B, T)``: ``input_ids`` (image
  positions hold an image placeholder token), ``pixel_values``,
  ``attention_mask``, ``labels`` (-100 outside the answer tokens) and
  ``prompt_mask`` (image + question positions: what a key averages over);
- ``forward(**batch)`` -> ``LMOutput(logits, loss, kv_cache)``;
  ``prompt_mask`` is not used by the network: it is an argument so that a
  routing hook attached to the backbone can read it (balancedit.Router reads
  it; balancedit.attach installs the hook);
- ``generate(images, questions)`` -> answer strings (greedy, KV cache: the
  prompt is one forward call, then one call per new token with an all-False
  prompt mask, so a routing hook holds the route it chose on the prompt);
- ``rephrase(question)`` -> other phrasings of the question;
- ``tail(batch, layer_path, per_position=False)`` -> a ``Tail`` for cached
  training (one forward; the value and the network after the layer then run
  where the loss needs them), or None; ``layer_input(batch, layer_path)`` ->
  the layer's input ``(B, T, D)``.

Three backbones:

- ``TinyVLM``, the embedded default: an open_clip vision transformer (patch
  tokens out) -> a linear projector -> an OPT decoder
  (``transformers.OPTForCausalLM``), with a word-level tokenizer over the
  world's vocabulary and BLIP-2's prompt ``Question: {q} Short answer:``. It is
  a miniature of BLIP-2 OPT, trained on the world of data.py by
  ``python models.py train-tiny`` and shipped in ``assets/tinyvlm``.
- ``Blip2OPT``: ``transformers.Blip2ForConditionalGeneration`` (default
  ``Salesforce/blip2-opt-2.7b``, loaded only when the user asks for it).
- ``MiniGPT4``: BLIP-2's ViT and Q-Former, MiniGPT-4's projection and a LLaMA
  (Vicuna-7B), assembled from local files by ``MiniGPT4.from_pretrained``; its target
  layer is the last LLaMA layer's ``mlp.up_proj``. ``random_minigpt4`` builds a tiny one.

This file does not import balancedit.py (data flows data -> models -> balancedit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_DIR = ASSETS / "tinyvlm"
PROMPT = "Question: {} Short answer:"  # BLIP-2's VQA prompt
# The text-only prompt that asks the language model for a paraphrase (Backbone.rephrase).
REPHRASE = "Rewrite the question in other words.\nQuestion: {}\nRewritten question:"
# The authors' backbone: loaded only when a user asks for it.
BLIP2_OPT = "Salesforce/blip2-opt-2.7b"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over the answer tokens
    kv_cache: Any = None  # the decoder's KV cache (a transformers Cache), when use_cache=True


@dataclass
class Tail:
    """One forward's record of a batch at layer l (``Backbone.tail``), for training a value:
    the value runs on ``h``, and ``rest`` takes its output to the logits that enter the loss,
    so that ``F.cross_entropy(rest(l(h)), targets)`` is the batch's ``lm_loss``."""

    inputs: torch.Tensor  # (B, T, D): l's input at every position of the batch (keys pool it)
    h: torch.Tensor  # float32: l's input where the loss needs the value, (P, D) or (R, T, D)
    rest: Callable[[torch.Tensor], torch.Tensor]  # the value's output on h -> (P, V) float32
    targets: torch.Tensor  # (P,): the token each of those P logits predicts


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Language-model cross-entropy: position t predicts token t+1; -100 labels are ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> CLIP-normalised pixel values (B, 3, size, size)."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def left_pad(rows: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Token rows -> left-padded (B, T) input_ids, attention_mask, prompt_mask and labels.

    Each row is prompt tokens followed by answer tokens; labels keep only the answer tokens.
    """
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    prompt_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (row, n_prompt) in enumerate(zip(rows, prompt_lens)):
        start = T - len(row)
        input_ids[b, start:] = torch.tensor(row)
        attention_mask[b, start:] = 1
        prompt_mask[b, start : start + n_prompt] = True
        labels[b, start + n_prompt :] = input_ids[b, start + n_prompt :]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_mask": prompt_mask,
        "labels": labels,
    }


def record_inputs(
    backbone: nn.Module,
    batch: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    kwargs_of: Optional[nn.Module] = None,
) -> dict[str, Any]:
    """Run ``backbone`` once on ``batch`` and return what it fed the hooked modules.

    ``seen[name]`` is the first input ``modules[name]`` received and ``seen["kwargs"]`` the
    keyword arguments ``kwargs_of`` received (when given); the first call counts. The hooks
    change nothing and are removed even when the forward fails. Runs in the caller's grad mode.
    """
    seen: dict[str, Any] = {}

    def keep_input(name: str):
        def hook(module, args, output):
            seen.setdefault(name, args[0])

        return hook

    def keep_kwargs(module, args, kwargs):
        seen.setdefault("kwargs", kwargs)

    handles = [module.register_forward_hook(keep_input(n)) for n, module in modules.items()]
    if kwargs_of is not None:
        handles.append(kwargs_of.register_forward_pre_hook(keep_kwargs, with_kwargs=True))
    try:
        backbone(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


class Backbone(nn.Module):
    """The shared part of every backbone: encoding, greedy generation with a KV cache,
    rephrasing, decoding and devices.

    A backbone supplies ``n_image_tokens``, ``image_token_id``, ``pad_token_id``,
    ``tokenizer``, ``prompt_ids(prompt)`` (the tokens of a filled-in template),
    ``answer_ids(answer)`` (answer tokens + EOS), ``pixel_values(images)`` and ``forward``.
    """

    target_layer: str
    eos_token_id: int
    max_new_tokens: int = 8
    max_positions: int  # the decoder's position embeddings: image, prompt and answer must fit

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(self.parameters()).dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in batch.items()
        }

    def token_ids(self, text: str) -> list[int]:
        """The tokenizer's ids for ``text``, without special tokens (no BOS, no EOS)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_tokens(self, ids: list[int]) -> str:
        """Generated token ids -> answer text, without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode(
        self,
        images: Sequence[Optional[Image.Image]],
        questions: Sequence[str],
        answers: Optional[Sequence[str]] = None,
        template: str = PROMPT,
    ) -> dict[str, torch.Tensor]:
        """Left-padded rows on the decoder's positions (B, T), each
        ``[prompt before the image][image placeholders][prompt][answer tokens, EOS]``;
        see the module docstring and ``segments``. Image None = text-only row."""
        if len(images) != len(questions) or (
            answers is not None and len(answers) != len(questions)
        ):
            raise ValueError("encode: images, questions and answers must have the same length")
        with_images = [im is not None for im in images]
        if any(with_images) and not all(with_images):
            raise ValueError("encode: a batch is either all images or all text-only (image None)")
        image = bool(images) and all(with_images)
        image_ids = [self.image_token_id] * self.n_image_tokens if image else []
        rows = []
        prompt_lens = []
        for i, q in enumerate(questions):
            before, after = self.segments(template.format(q), image)
            prompt = before + image_ids + after
            answer = self.answer_ids(answers[i]) if answers is not None else []
            rows.append(prompt + answer)
            prompt_lens.append(len(prompt))
        for q, row in zip(questions, rows):
            if len(row) > self.max_positions:
                raise ValueError(
                    f"the question {q!r} needs {len(row)} positions with the image and its "
                    f"answer; the model has {self.max_positions}"
                )
        batch = left_pad(rows, prompt_lens, self.pad_token_id)
        if image:
            batch["pixel_values"] = self.pixel_values(images)  # (B, 3, H, W)
        return batch

    def layer_input_and_tail(
        self, batch: dict[str, torch.Tensor], layer_path: str, per_position: bool = False
    ) -> tuple[torch.Tensor, Optional[Tail]]:
        """One forward of ``batch``: the input of layer ``layer_path`` on the batch's positions
        (B, T, D), and its ``tail`` (None where this backbone has none for the layer)."""
        tail = self.tail(batch, layer_path, per_position)
        if tail is None:
            return self.layer_input(batch, layer_path), None
        return tail.inputs, tail

    @torch.no_grad()
    def layer_input(self, batch: dict[str, torch.Tensor], layer_path: str) -> torch.Tensor:
        """The input h^{l-1} that layer ``layer_path`` sees when the backbone runs on ``batch``,
        on the batch's positions (B, T, D) (OPT's fc2 sees them flattened to (B*T, D))."""
        seen = record_inputs(self, batch, {"h": self.get_submodule(layer_path)})
        B, T = batch["attention_mask"].shape
        return seen["h"].reshape(B, T, -1)  # (B, T, D)

    def segments(self, prompt: str, image: bool = True) -> tuple[list[int], list[int]]:
        """The prompt's tokens before and after the image positions (here: all after them)."""
        return [], self.prompt_ids(prompt)

    def check(self, records: Sequence[data.EditRecord]) -> None:
        """Refuse, before any work, a record this backbone cannot encode: a target word it
        cannot spell (it would be edited as <unk> and never generated), or a question that
        does not fit in its positions with the image and the answer (or the generated tokens).
        """
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        for r in records:
            for word in r.target.split():
                if unknown is not None and unknown in self.answer_ids(word):
                    raise ValueError(
                        f"record {r.id}: the target {r.target!r} has a word this backbone "
                        f"cannot spell: {word!r}"
                    )
            asked = [(q, r.target) for q in (r.question, *r.rephrases, *r.train_rephrases)]
            asked += [(s.question, s.answer) for s in (*r.locality, *r.m_locality)]
            for q, a in asked:
                n = (
                    self.n_image_tokens
                    + len(self.prompt_ids(PROMPT.format(q)))
                    + max(len(self.answer_ids(a)), self.max_new_tokens)
                )
                if n > self.max_positions:
                    raise ValueError(
                        f"record {r.id}: the question {q!r} needs {n} positions with the image "
                        f"and its answer; the model has {self.max_positions}"
                    )

    def rephrase(self, question: str) -> list[str]:
        """Ask the language model (text only, greedy) for a paraphrase: the positive of Eq. 3
        for records that bring no training rephrasings (MMEdit)."""
        text = self.generate([None], [question], max_new_tokens=32, template=REPHRASE)[0]
        text = text.strip().split("\n")[0].strip()
        return [text] if text and text != question else []

    def tail(
        self, batch: dict[str, torch.Tensor], layer_path: str, per_position: bool = False
    ) -> Optional[Tail]:
        """Cached-activation training: one forward of ``batch`` records what layer
        ``layer_path`` sees, and the returned ``Tail`` runs only the network after it, where
        the loss (``batch["labels"]``) needs it. ``per_position``: the value maps each
        position's input on its own (a copy of the layer does), so where the network after
        the layer is per position too, only the loss positions are kept. None: not supported
        here (training then runs the full forward at every step)."""
        return None

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Optional[Image.Image]],
        questions: Sequence[str],
        max_new_tokens: Optional[int] = None,
        template: str = PROMPT,
    ) -> list[str]:
        """Greedy answers. The prompt is one call; each new token is one call on the KV cache
        with ``prompt_mask`` all False (so a routing hook holds the prompt's route)."""
        batch = self.to_device(self.encode(images, questions, template=template))
        batch.pop("labels")
        mask = batch["attention_mask"]
        out = self(**batch, use_cache=True)
        B = mask.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=mask.device)
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens or self.max_new_tokens):
            token = out.logits[:, -1].argmax(-1)  # (B,)
            new_tokens.append(token)
            done |= token == self.eos_token_id
            # Stop when every answer has ended, or when no position is left.
            if done.all() or mask.shape[1] == self.max_positions:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            out = self(
                input_ids=token[:, None],
                attention_mask=mask,
                prompt_mask=torch.zeros(B, 1, dtype=torch.bool, device=mask.device),
                kv_cache=out.kv_cache,
                use_cache=True,
            )
        tokens = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
        answers = []
        for row in tokens:
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            answers.append(self.decode_tokens(row))
        return answers


def take_rows(x: Any, rows: torch.Tensor) -> Any:
    """A decoder layer's keyword argument ``x`` at the batch rows ``rows`` (B,) bool: a tensor
    with a batch axis (two axes or more, B first) is indexed, a tuple item by item; anything
    else (a mask broadcast over the batch, cache positions, flags) is shared as it is."""
    if isinstance(x, tuple):
        return tuple(take_rows(item, rows) for item in x)
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and len(x) == len(rows):
        return x[rows]
    return x


def decoder_tail(
    backbone: nn.Module,
    batch: dict[str, torch.Tensor],
    layer_path: str,
    layers: Sequence[nn.Module],
    target: str,
    residual_at: str,
    kept: tuple[str, ...],
    finish_layer: Callable[..., torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    per_position: bool = False,
) -> Optional[Tail]:
    """``Backbone.tail`` for a decoder-only LM: the part every decoder shares.

    ``target`` and ``residual_at`` name submodules of a decoder layer: ``layer_path`` must be
    some layer L's ``target`` (else None is returned), and the input of ``residual_at`` is the
    residual stream that the target's output joins. One forward records h (the target's
    input), that residual stream, and the keyword arguments named in ``kept`` that layer L+1
    receives. ``finish_layer(layer L, h, residual, y)`` (what layer L computes after the
    target) and ``head`` (final norm, LM head -> logits) work position by position.

    Position t's logits predict token t + 1, so the loss reads P positions: those before a
    target token. When L is the last layer, everything after the target is per position: with
    ``per_position`` (a value that maps each position's h on its own) the tail keeps those P
    positions and nothing else. Otherwise a later layer's attention mixes the positions, and
    the tail keeps every position of the R rows that hold a target.
    """
    layers = list(layers)
    module = backbone.get_submodule(layer_path)
    found = [
        i for i, layer in enumerate(layers) if dict(layer.named_modules()).get(target) is module
    ]
    if not found:
        return None
    L = found[0]
    layer = layers[L]
    watched = {"h": module, "residual": layer.get_submodule(residual_at)}
    following = layers[L + 1] if L + 1 < len(layers) else None
    # Grad mode on, as in the naive loop's forward: some kernels (torch's fused attention
    # fast path, used by open_clip's ViT) take another route under no_grad, and the
    # cached activations must be exactly those the naive loop sees.
    with torch.enable_grad():
        seen = record_inputs(backbone, batch, watched, kwargs_of=following)
    B, T = batch["attention_mask"].shape
    # detach: the recorded graph is dropped with `seen` when this function returns
    inputs = seen["h"].detach().reshape(B, T, -1)  # (B, T, F), whatever shape l saw
    dtype = inputs.dtype  # the network's: the value's float32 output is cast to it
    residual = seen["residual"].detach().reshape(B, T, -1)  # (B, T, D)
    # The token each position predicts; -100 (none) at the last position
    predicts = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # (B, T)
    at = predicts != -100  # (B, T): the P positions whose logits enter the loss
    targets = predicts[at]  # (P,)
    if per_position and following is None:
        h = inputs[at]  # (P, F)
        residual = residual[at]  # (P, D)

        def rest_at(y: torch.Tensor) -> torch.Tensor:  # y: (P, D), the value's output
            return head(finish_layer(layer, h, residual, y.to(dtype))).float()  # (P, V)

        return Tail(inputs, h.float(), rest_at, targets)
    rows = at.any(dim=1)  # (B,): the rows that hold a target
    h = inputs[rows]  # (R, T, F)
    residual = residual[rows]  # (R, T, D)
    later = {k: take_rows(v, rows) for k, v in seen.get("kwargs", {}).items() if k in kept}

    def rest(y: torch.Tensor) -> torch.Tensor:  # y: (R, T, D), the value's output
        hidden = finish_layer(layer, h, residual, y.to(dtype))  # (R, T, D)
        for later_layer in layers[L + 1 :]:
            hidden = later_layer(hidden, **later)
        return head(hidden)[at[rows]].float()  # (P, V)

    return Tail(inputs, h.float(), rest, targets)


def opt_tail(
    backbone: nn.Module,
    batch: dict[str, torch.Tensor],
    layer_path: str,
    decoder: nn.Module,
    lm_head: nn.Module,
    per_position: bool = False,
) -> Optional[Tail]:
    """``Backbone.tail`` for an OPT decoder whose target is one decoder layer's ``fc2``.

    h is the input of ``fc2``; the residual stream is the FFN's input; the later layers need
    the attention mask and positions. ``rest(y)`` recomputes exactly what OPT computes after
    ``fc2``: the residual add, the later layers, the final layer norm, the LM head. Returns
    None when ``layer_path`` is not a decoder layer's ``fc2``.
    """
    pre_norm = decoder.config.do_layer_norm_before

    def finish_layer(layer, h, residual, y):  # y: fc2's output, (..., D)
        hidden = residual + y
        if not pre_norm:
            hidden = layer.final_layer_norm(hidden)
        return hidden

    def head(hidden):
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return lm_head(hidden)

    return decoder_tail(
        backbone,
        batch,
        layer_path,
        decoder.layers,
        target="fc2",
        # the FFN's residual: the input of its layer norm (pre-norm OPT) or of fc1 (post-norm)
        residual_at="final_layer_norm" if pre_norm else "fc1",
        kept=("attention_mask", "position_ids"),
        finish_layer=finish_layer,
        head=head,
        per_position=per_position,
    )


def llama_tail(
    backbone: nn.Module,
    batch: dict[str, torch.Tensor],
    layer_path: str,
    model: nn.Module,
    lm_head: nn.Module,
    per_position: bool = False,
) -> Optional[Tail]:
    """``Backbone.tail`` for a LLaMA-family decoder (``model`` holds ``layers`` and ``norm``)
    whose target is one decoder layer's ``mlp.up_proj``.

    h is the input of ``up_proj``, which is also the input of ``gate_proj``; the residual
    stream is the MLP's input; the later layers need the attention mask, position ids and
    the rotary ``position_embeddings``. ``rest(y)`` recomputes exactly what LLaMA computes
    after ``up_proj``: ``down_proj(act(gate_proj(h)) * y)``, the residual add, the later
    layers, the final RMSNorm, the LM head. Returns None when ``layer_path`` is not a decoder
    layer's ``mlp.up_proj``.
    """

    def finish_layer(layer, h, residual, y):  # y: up_proj's output, (..., F)
        mlp = layer.mlp
        return residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * y)  # (..., D)

    def head(hidden):
        return lm_head(model.norm(hidden))

    return decoder_tail(
        backbone,
        batch,
        layer_path,
        model.layers,
        target="mlp.up_proj",
        residual_at="post_attention_layernorm",
        kept=("attention_mask", "position_ids", "position_embeddings", "cache_position"),
        finish_layer=finish_layer,
        head=head,
        per_position=per_position,
    )


# ---------------------------------------------------------------------------
# TinyVLM
# ---------------------------------------------------------------------------


@dataclass
class TinyConfig:
    image_size: int = 64  # the world's images are 64x64
    patch_size: int = 16  # -> 16 image tokens
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    hidden: int = 128  # OPT hidden size D
    ffn: int = 512  # OPT fc1/fc2 width (the target layer fc2 is ffn -> hidden)
    layers: int = 4  # OPT decoder layers
    heads: int = 4
    max_positions: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> "TinyConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TinyConfig fields: {sorted(unknown)}")
        return cls(**d)


SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<image>"]


def build_tokenizer(words: Sequence[str]):
    """A word-level tokenizer (tokenizers WordLevel in a PreTrainedTokenizerFast) over `words`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS, *re.findall(r"\w+|[^\w\s]", PROMPT.replace("{}", " ")), *words]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation marks
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


class TinyVLM(Backbone):
    """open_clip ViT (patch tokens) -> projector -> OPT decoder; the default, CPU-sized backbone."""

    def __init__(self, config: TinyConfig = TinyConfig(), tokenizer=None):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from transformers import OPTConfig, OPTForCausalLM

        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(data.vocabulary())
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id
        self.eos_token_id = tok.eos_token_id
        self.image_token_id = tok.convert_tokens_to_ids("<image>")
        self.n_image_tokens = (config.image_size // config.patch_size) ** 2
        self.vision = _build_vision_tower(
            config.hidden,
            CLIPVisionCfg(
                layers=config.vision_layers,
                width=config.vision_width,
                head_width=config.vision_width // config.vision_heads,
                patch_size=config.patch_size,
                image_size=config.image_size,
                output_tokens=True,
            ),
        )
        self.projector = nn.Linear(config.vision_width, config.hidden)
        self.lm = OPTForCausalLM(
            OPTConfig(
                vocab_size=len(tok),
                hidden_size=config.hidden,
                num_hidden_layers=config.layers,
                ffn_dim=config.ffn,
                num_attention_heads=config.heads,
                max_position_embeddings=config.max_positions,
                word_embed_proj_dim=config.hidden,
                pad_token_id=self.pad_token_id,
                bos_token_id=self.eos_token_id,
                eos_token_id=self.eos_token_id,
                dropout=0.0,
                attention_dropout=0.0,
                activation_dropout=0.0,
                layerdrop=0.0,
            )
        )
        self.target_layer = f"lm.model.decoder.layers.{config.layers - 1}.fc2"
        self.max_positions = config.max_positions

    # -- interface ---------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        return self.token_ids(prompt)

    def answer_ids(self, answer: str) -> list[int]:
        return self.token_ids(answer) + [self.eos_token_id]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return pixels(images, self.config.image_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        kv_cache: Any = None,
        use_cache: bool = False,
    ) -> LMOutput:
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        if pixel_values is not None:
            _, patches = self.vision(pixel_values)  # (B, P, W)
            image_embeds = self.projector(patches).to(embeds.dtype)  # (B, P, D)
            at_image = (input_ids == self.image_token_id)[..., None]  # (B, T, 1)
            # the patch embeddings fill the placeholder positions, row by row, in order
            embeds = embeds.masked_scatter(at_image, image_embeds)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=kv_cache,
            use_cache=use_cache,
        )
        loss = lm_loss(out.logits, labels) if labels is not None else None
        return LMOutput(out.logits, loss, out.cache if use_cache else None)

    def tail(self, batch, layer_path: str, per_position: bool = False) -> Optional[Tail]:
        decoder = self.lm.model.decoder
        return opt_tail(self, batch, layer_path, decoder, self.lm.lm_head, per_position)

    def rephrase(self, question: str) -> list[str]:
        """TinyVLM knows its world's paraphrases (the stand-in for asking an LLM to rephrase)."""
        return data.rephrasings(question)

    # -- checkpoint ----------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """safetensors weights + json config + tokenizer json (no pickle)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Not the LM head: it is tied to the input embeddings.
        state = {
            k: v.detach().contiguous().clone()
            for k, v in self.state_dict().items()
            if k != "lm.lm_head.weight"
        }
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(
            json.dumps(asdict(self.config), indent=1, sort_keys=True) + "\n"
        )
        self.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = TINY_DIR, device: str = "cpu") -> "TinyVLM":
        from safetensors.torch import load_file
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"TinyVLM checkpoint {path}: missing {name} "
                    f"(train one with `python models.py train-tiny --out {path}`)"
                )
        config = TinyConfig.from_dict(json.loads((path / "config.json").read_text()))
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"),
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            additional_special_tokens=["<image>"],
        )
        model = cls(config, tok)
        missing, unexpected = model.load_state_dict(
            load_file(str(path / "model.safetensors")), strict=False
        )
        if unexpected or set(missing) - {"lm.lm_head.weight"}:
            raise ValueError(
                f"TinyVLM checkpoint {path}: missing {missing}, unexpected {unexpected}"
            )
        model.lm.tie_weights()
        return model.to(device).eval()


# ---------------------------------------------------------------------------
# BLIP-2 OPT
# ---------------------------------------------------------------------------


class Blip2OPT(Backbone):
    """``transformers.Blip2ForConditionalGeneration`` with an OPT decoder (the authors' backbone).

    Layout on the decoder's positions, as Hugging Face's ``Blip2Processor`` builds it: the
    ``num_query_tokens`` image placeholder tokens, the tokenizer's own special tokens (OPT: BOS
    ``</s>``), the prompt ``Question: {q} Short answer:``, then `` {answer}</s>``. The model
    scatters the Q-Former's projected outputs into the placeholder positions. One difference
    from the processor: a padded batch is padded on the left of the whole row, where the
    processor pads the text and then prepends the image tokens (pads between image and BOS);
    OPT's positions come from the attention mask, so each real token sees the same thing.
    """

    def __init__(self, model, processor):
        super().__init__()
        config = model.config
        if config.text_config.model_type != "opt":
            raise ValueError(
                f"Blip2OPT needs a BLIP-2 with an OPT decoder, "
                f"got {config.text_config.model_type!r}"
            )
        if config.image_token_id is None:
            raise ValueError(
                "Blip2OPT: the BLIP-2 config has no image_token_index (a pre-4.46 checkpoint?)"
            )
        if processor.num_query_tokens not in (None, config.num_query_tokens):
            raise ValueError(
                f"Blip2OPT: processor has {processor.num_query_tokens} query tokens, "
                f"model {config.num_query_tokens}"
            )
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id
        self.eos_token_id = tok.eos_token_id
        self.image_token_id = config.image_token_id
        self.n_image_tokens = config.num_query_tokens  # the Q-Former's query tokens
        last = config.text_config.num_hidden_layers - 1
        self.target_layer = f"model.language_model.model.decoder.layers.{last}.fc2"  # OPT-2.7B: 31
        self.max_positions = config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype: Optional[torch.dtype] = None,
        device: Optional[str] = None,
    ) -> "Blip2OPT":
        """Load model and processor from ``name_or_path``, which the user names: a local
        directory, or a hub id (e.g. ``BLIP2_OPT``; offline with HF_HUB_OFFLINE=1). Nothing loads
        by default. Defaults: CUDA if available; fp16 on CUDA, fp32 on CPU."""
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        path = Path(name_or_path).expanduser()
        if (path.is_absolute() or str(name_or_path).startswith((".", "~"))) and not path.is_dir():
            raise FileNotFoundError(
                f"{path}: no such model directory (download {BLIP2_OPT} there first)"
            )
        processor = Blip2Processor.from_pretrained(path if path.is_dir() else name_or_path)
        model = Blip2ForConditionalGeneration.from_pretrained(
            path if path.is_dir() else name_or_path, dtype=dtype
        )
        return cls(model, processor).to(device).eval()

    # -- interface ---------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]  # with BOS, as the processor

    def answer_ids(self, answer: str) -> list[int]:
        return self.token_ids(" " + answer) + [self.eos_token_id]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        # (B, 3, H, W)
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        kv_cache: Any = None,
        use_cache: bool = False,
    ) -> LMOutput:
        if pixel_values is not None:
            # BLIP-2 proper: ViT -> Q-Former -> projection, scattered into the image positions.
            out = self.model(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=kv_cache,
                use_cache=use_cache,
            )
            new_cache = out.language_model_outputs.cache
        else:
            # Text-only batches and decoding steps (the image is already in the KV cache); the
            # BLIP-2 forward requires pixel_values, so call its OPT directly.
            if kv_cache is None and (input_ids == self.image_token_id).any():
                raise ValueError("Blip2OPT.forward: image tokens in input_ids but no pixel_values")
            out = self.model.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=kv_cache,
                use_cache=use_cache,
            )
            new_cache = out.cache
        loss = lm_loss(out.logits, labels) if labels is not None else None
        return LMOutput(out.logits, loss, new_cache if use_cache else None)

    def tail(self, batch, layer_path: str, per_position: bool = False) -> Optional[Tail]:
        lm = self.model.language_model
        return opt_tail(self, batch, layer_path, lm.model.decoder, lm.lm_head, per_position)


def offline_blip2_processor(n_query: int = 4, image_size: int = 32):
    """A ``Blip2Processor`` built in memory (nothing downloads): a BLIP image processor at
    ``image_size`` and a word-level tokenizer over the world's vocabulary that prepends BOS
    ``</s>`` as OPT's tokenizer does."""
    from tokenizers import processors
    from transformers import Blip2Processor, BlipImageProcessor

    tok = build_tokenizer(data.vocabulary())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", tok.convert_tokens_to_ids("</s>"))]
    )
    tok.bos_token = "</s>"
    return Blip2Processor(
        BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tok,
        num_query_tokens=n_query,
    )


def random_blip2(
    layers: int = 2, hidden: int = 32, ffn: int = 64, n_query: int = 4, seed: int = 0
) -> Blip2OPT:
    """A randomly initialised BLIP-2 OPT built in memory from a ``Blip2Config`` (nothing downloads):
    a 1-layer ViT (32x32 images, 8x8 patches) and a 1-layer Q-Former of width 32, ``n_query``
    query tokens, and an OPT decoder of ``layers`` layers, width ``hidden``, FFN width ``ffn``.
    ``random_blip2(layers=32)`` has BLIP-2 OPT-2.7B's depth (32 decoder layers) at a small width."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    processor = offline_blip2_processor(n_query)
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=64,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tok),
            hidden_size=hidden,
            num_hidden_layers=layers,
            ffn_dim=ffn,
            num_attention_heads=2,
            word_embed_proj_dim=hidden,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        num_query_tokens=n_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # Make the images matter in a random model: HF initialises the query tokens to zeros, and
    # its std 0.02 leaves the image path near-constant.
    with torch.no_grad():
        model.query_tokens.normal_()
        for name, p in model.named_parameters():
            if name.startswith(("vision_model", "qformer", "language_projection")) and p.dim() >= 2:
                p.normal_(std=p.shape[-1] ** -0.5)
    return Blip2OPT(model, processor).eval()


# ---------------------------------------------------------------------------
# MiniGPT-4 (Vicuna v0)
# ---------------------------------------------------------------------------

MINIGPT4_PROMPT = (
    "###Human: <Img><ImageHere></Img> {} ###Assistant: "  # stage 2's prompt_template, one image
)
MINIGPT4_TEXT_PROMPT = "###Human: {} ###Assistant: "  # the same conversation, no image
IMAGE_HERE = "<ImageHere>"  # the image placeholder token


class MiniGPT4(Backbone):
    """MiniGPT-4 (Vicuna v0), assembled from transformers modules:

        image (B, 3, 224, 224) -> Blip2VisionModel, EVA ViT-g/14, 39 layers -> (B, 257, 1408)
          (its post_layernorm is MiniGPT-4's ln_vision)
        -> Blip2QFormerModel on the 32 learned query tokens -> (B, 32, 768)
        -> llama_proj (nn.Linear) -> (B, 32, 4096), at the image positions of a LlamaForCausalLM.

    Layout on the decoder's positions, as MiniGPT-4 builds it: BOS ``###Human: <Img>``, the 32
    image positions, ``</Img> {instruction} ###Assistant: ``, then the answer and EOS; the
    instruction is ``template.format(question)`` (BLIP-2's VQA prompt by default, as on every
    backbone). Text before and after the image is tokenized separately, as MiniGPT-4 does.
    MiniGPT-4 ends answers with ``###``; here they end with EOS as on the other backbones, and a
    generated answer is cut at ``###`` as MiniGPT-4's chat does. Positions come from the attention
    mask, so a left-padded row sees what it sees alone.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        qformer: nn.Module,
        query_tokens: nn.Parameter,
        llama_proj: nn.Linear,
        llama_model: nn.Module,
        tokenizer,
    ):
        super().__init__()
        config = llama_model.config
        if (llama_proj.in_features, llama_proj.out_features) != (
            qformer.config.hidden_size,
            config.hidden_size,
        ):
            raise ValueError(
                f"MiniGPT4: llama_proj maps {llama_proj.in_features} -> {llama_proj.out_features}, "
                f"needs Q-Former {qformer.config.hidden_size} -> LLaMA {config.hidden_size}"
            )
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = query_tokens  # (1, Q, H)
        self.llama_proj = llama_proj
        self.llama_model = llama_model
        # ln_vision is a default nn.LayerNorm (HF's BLIP-2: 1e-6)
        self.vision_model.post_layernorm.eps = 1e-5
        self.tokenizer = tokenizer
        tok = tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_HERE)
        if self.image_token_id is None or self.image_token_id == tok.unk_token_id:
            raise ValueError(f"MiniGPT4: the tokenizer has no {IMAGE_HERE} token")
        self.pad_token_id = tok.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = tok.eos_token_id  # as MiniGPT-4
        self.eos_token_id = tok.eos_token_id
        self.n_image_tokens = query_tokens.shape[1]
        self.image_size = vision_model.config.image_size
        last = config.num_hidden_layers - 1  # Vicuna-7B: 31
        self.target_layer = f"llama_model.model.layers.{last}.mlp.up_proj"
        self.max_positions = config.max_position_embeddings

    @classmethod
    def from_pretrained(
        cls,
        blip2_dir: str | os.PathLike,
        vicuna_dir: str | os.PathLike,
        projection_file: str | os.PathLike,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "MiniGPT4":
        """Assemble MiniGPT-4 from local files only (nothing downloads):

        - ``blip2_dir``: a Hugging Face BLIP-2 directory (config.json, safetensors); only its
          vision tower, Q-Former and query tokens are read. MiniGPT-4 takes them from LAVIS's
          ``blip2_pretrained_flant5xxl.pth``, which Hugging Face converted as
          ``Salesforce/blip2-flan-t5-xxl``.
        - ``vicuna_dir``: a Hugging Face LLaMA directory with its tokenizer (Vicuna-7B v0).
        - ``projection_file``: MiniGPT-4's released checkpoint, holding
          ``model['llama_proj.weight']`` and ``model['llama_proj.bias']``.

        Defaults: CUDA if available; fp16 on CUDA, fp32 on CPU."""
        from safetensors import safe_open
        from transformers import (
            AutoTokenizer,
            Blip2Config,
            Blip2QFormerModel,
            Blip2VisionModel,
            LlamaForCausalLM,
        )

        blip2_dir = Path(blip2_dir).expanduser()
        vicuna_dir = Path(vicuna_dir).expanduser()
        projection_file = Path(projection_file).expanduser()
        for path, what in (
            (blip2_dir, "BLIP-2 checkpoint directory"),
            (vicuna_dir, "Vicuna directory"),
        ):
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: no such {what} (MiniGPT4 reads local files only)")
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path}: no config.json in this {what}")
        if not projection_file.is_file():
            raise FileNotFoundError(f"{projection_file}: no such MiniGPT-4 checkpoint file")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)

        # BLIP-2: the vision tower, Q-Former and query tokens, from the safetensors shards.
        config = Blip2Config.from_pretrained(blip2_dir, local_files_only=True)
        index = blip2_dir / "model.safetensors.index.json"
        shards = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        state = {}
        wanted = ("vision_model.", "qformer.", "query_tokens")
        for shard in shards:
            if not (blip2_dir / shard).is_file():
                raise FileNotFoundError(
                    f"{blip2_dir / shard}: missing (MiniGPT4 reads BLIP-2 weights as safetensors)"
                )
            with safe_open(str(blip2_dir / shard), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)})
        with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
            vision = Blip2VisionModel(config.vision_config)
            qformer = Blip2QFormerModel(config.qformer_config)
        for prefix, module in (("vision_model.", vision), ("qformer.", qformer)):
            missing = [prefix + k for k in module.state_dict() if prefix + k not in state]
            if missing:
                raise ValueError(
                    f"{blip2_dir}: no {missing[0]!r} (and {len(missing) - 1} more) "
                    f"in the BLIP-2 weights"
                )
            module.load_state_dict(
                {k: state[prefix + k].to(dtype) for k in module.state_dict()}, assign=True
            )
        if "query_tokens" not in state:
            raise ValueError(f"{blip2_dir}: no 'query_tokens' in the BLIP-2 weights")
        query_tokens = nn.Parameter(state["query_tokens"].to(dtype))  # (1, 32, 768)

        # MiniGPT-4's projection, from its released checkpoint (a pickle, read with weights_only).
        try:
            ckpt = torch.load(projection_file, map_location="cpu", weights_only=True)
        except Exception as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{projection_file}: cannot read as a MiniGPT-4 checkpoint: {first_line}"
            ) from None
        weights = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
        for key in ("llama_proj.weight", "llama_proj.bias"):
            if key not in weights:
                raise ValueError(
                    f"{projection_file}: no model[{key!r}] (not a MiniGPT-4 checkpoint?)"
                )
        out_features, in_features = weights["llama_proj.weight"].shape  # (4096, 768)
        llama_proj = nn.Linear(in_features, out_features, dtype=dtype)
        llama_proj.load_state_dict(
            {"weight": weights["llama_proj.weight"], "bias": weights["llama_proj.bias"]}
        )

        # Vicuna, with the image placeholder added to its tokenizer (never embedded: forward
        # replaces it).
        llama = LlamaForCausalLM.from_pretrained(vicuna_dir, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(vicuna_dir, local_files_only=True)
        if tok.convert_tokens_to_ids(IMAGE_HERE) in (None, tok.unk_token_id):
            tok.add_special_tokens({"additional_special_tokens": [IMAGE_HERE]})
        return cls(vision, qformer, query_tokens, llama_proj, llama, tok).to(device).eval()

    # -- interface ---------------------------------------------------------
    def segments(self, prompt: str, image: bool = True) -> tuple[list[int], list[int]]:
        """The tokens before and after the image positions of a filled-in conversation: BOS
        and ``###Human: <Img>``, then ``</Img> {prompt} ###Assistant: `` (text-only: all in
        the first)."""
        if not image:
            return self.tokenizer(MINIGPT4_TEXT_PROMPT.format(prompt))["input_ids"], []
        before, after = MINIGPT4_PROMPT.split(IMAGE_HERE)
        # BOS with the first part, as MiniGPT-4 tokenizes it
        return self.tokenizer(before)["input_ids"], self.token_ids(after.format(prompt))

    def prompt_ids(self, prompt: str) -> list[int]:
        before, after = self.segments(prompt)
        return before + after  # the prompt's tokens around the image positions

    def answer_ids(self, answer: str) -> list[int]:
        return self.token_ids(answer) + [self.eos_token_id]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        # MiniGPT-4's eval processor: bicubic resize, CLIP mean/std
        return pixels(images, self.image_size)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """MiniGPT-4's encode_img: (B, 3, H, W) -> (B, Q, D) inputs of the language model."""
        # (B, 1+P, W), after ln_vision
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # (B, Q, H)
        ones = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)  # (B, 1+P)
        out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=ones
        )
        return self.llama_proj(out.last_hidden_state.to(self.llama_proj.weight.dtype))  # (B, Q, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        kv_cache: Any = None,
        use_cache: bool = False,
    ) -> LMOutput:
        at_image = input_ids == self.image_token_id  # (B, T)
        # The placeholder is never embedded: its positions get the image embeddings.
        embed_ids = input_ids.masked_fill(at_image, self.pad_token_id)
        embeds = self.llama_model.get_input_embeddings()(embed_ids)  # (B, T, D)
        if pixel_values is not None:
            # masked_scatter needs as many placeholders as image embeddings: B x Q
            if at_image.sum() != len(input_ids) * self.n_image_tokens:
                raise ValueError(
                    f"MiniGPT4.forward: each row needs {self.n_image_tokens} image tokens"
                )
            image_embeds = self.image_embeds(pixel_values).to(embeds.dtype)  # (B, Q, D)
            embeds = embeds.masked_scatter(at_image[..., None], image_embeds)
        elif kv_cache is None and at_image.any():
            raise ValueError("MiniGPT4.forward: image tokens in input_ids but no pixel_values")
        # LLaMA numbers positions 0, 1, ... whatever the mask; count real tokens only (pads
        # get 0), as generate does, and keep the positions of this call's tokens.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = positions[:, -input_ids.shape[1] :]  # (B, T)
        out = self.llama_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=kv_cache,
            use_cache=use_cache,
        )
        loss = lm_loss(out.logits, labels) if labels is not None else None
        return LMOutput(out.logits, loss, out.cache if use_cache else None)

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).split("###")[0].strip()

    def tail(self, batch, layer_path: str, per_position: bool = False) -> Optional[Tail]:
        llama = self.llama_model
        return llama_tail(self, batch, layer_path, llama.model, llama.lm_head, per_position)


def offline_minigpt4_tokenizer():
    """A word-level tokenizer over the world's vocabulary and MiniGPT-4's template words, built in
    memory: BOS ``<s>`` prepended as LLaMA's tokenizer does, EOS ``</s>``, and ``<ImageHere>``."""
    from tokenizers import processors

    template = MINIGPT4_PROMPT.replace(IMAGE_HERE, " ") + REPHRASE
    tok = build_tokenizer(
        ["<s>", IMAGE_HERE, *re.findall(r"\w+|[^\w\s]+", template), *data.vocabulary()]
    )
    tok.add_special_tokens(
        {"bos_token": "<s>", "additional_special_tokens": ["<image>", IMAGE_HERE]}
    )
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def random_minigpt4(
    layers: int = 2, hidden: int = 32, ffn: int = 64, n_query: int = 8, seed: int = 0
) -> MiniGPT4:
    """A randomly initialised MiniGPT-4 built in memory (nothing downloads): a 1-layer BLIP-2 ViT
    (32x32 images, 8x8 patches) and a 1-layer Q-Former of width 32 with ``n_query`` query tokens,
    the projection, and a LLaMA of ``layers`` layers, width ``hidden``, MLP width ``ffn``.
    ``random_minigpt4(layers=32)`` has Vicuna-7B's depth (32 decoder layers) at a small width."""
    from transformers import (
        Blip2QFormerConfig,
        Blip2QFormerModel,
        Blip2VisionConfig,
        Blip2VisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = offline_minigpt4_tokenizer()
    torch.manual_seed(seed)
    vision = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    qformer = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
        )
    )
    query_tokens = nn.Parameter(torch.randn(1, n_query, 32))  # (1, Q, H)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    llama_proj = nn.Linear(32, hidden)
    with torch.no_grad():  # as random_blip2: make the images matter in a random model
        for module in (vision, qformer, llama_proj):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.normal_(std=p.shape[-1] ** -0.5)
    return MiniGPT4(vision, qformer, query_tokens, llama_proj, llama, tok).eval()


# ---------------------------------------------------------------------------
# Training TinyVLM on the world (python models.py train-tiny)
# ---------------------------------------------------------------------------


def warmup_cosine(opt: torch.optim.Optimizer, steps: int):
    """The lr schedule of a training run: linear warm-up over 5% of ``steps``, cosine decay."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )


def train_tiny(
    out_dir: str | os.PathLike,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    config: TinyConfig = TinyConfig(),
    progress: bool = True,
    device: str = "cpu",
    stream: Optional[Iterator[data.Sample]] = None,
    words: Optional[Sequence[str]] = None,
    model: Optional["TinyVLM"] = None,
) -> list[float]:
    """Train TinyVLM on ``stream`` (default: the world's endless training stream, seeded) with a
    tokenizer over ``words`` (default: the world's vocabulary); returns the loss per step.
    ``model``: go on from this one instead of a fresh one (``config`` and ``words`` unused)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    if model is None:
        tokenizer = build_tokenizer(words) if words is not None else None
        model = TinyVLM(config, tokenizer)
    model = model.to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    if stream is None:
        stream = data.training_stream(seed)
    losses = []
    bar = tqdm(range(steps), desc="train-tiny", disable=not progress)
    for _ in bar:
        samples = [next(stream) for _ in range(batch_size)]
        batch = model.to_device(
            model.encode(
                [s.image for s in samples],
                [s.question for s in samples],
                [s.answer for s in samples],
            )
        )
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval().cpu()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return losses


def knowledge(
    backbone: Backbone, records: Sequence[data.EditRecord], batch_size: int = 64
) -> dict[str, float]:
    """What the unedited model knows: exact match (%) of generated answers against the true
    (old) answers, on every part of the records, and on the black / white anchor questions."""
    parts = {
        "edit": [(r.image, r.question, r.answer) for r in records],
        "rephrases": [(r.image, q, r.answer) for r in records for q in r.rephrases],
        "rephrase_images": [
            (im, r.question, r.answer) for r in records for im in r.rephrase_images
        ],
        "locality": [(s.image, s.question, s.answer) for r in records for s in r.locality],
        "unrelated": [(s.image, s.question, s.answer) for r in records for s in r.m_locality],
        "black_white": [
            (data.anchor_image(a, data.SIZE), q, answers[data.FAMILY_OF[q]])
            for a, answers in data.ANCHOR_ANSWERS.items()
            for q in data.FAMILY_OF
        ],
    }
    result = {}
    for name, triples in parts.items():
        right = 0
        for i in range(0, len(triples), batch_size):
            chunk = triples[i : i + batch_size]
            answers = backbone.generate([t[0] for t in chunk], [t[1] for t in chunk])
            right += sum(a == t[2] for a, t in zip(answers, chunk))
        result[name] = 100.0 * right / len(triples)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Backbones for BalancEdit. Subcommand train-tiny "
        "trains TinyVLM on the world of data.py and saves a checkpoint."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-tiny", help="train TinyVLM (seeded; minutes on a 2-core CPU)")
    t.add_argument(
        "--out", required=True, help="checkpoint directory (assets/tinyvlm is the shipped one)"
    )
    t.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    t.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    t.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)")
    t.add_argument("--seed", type=int, default=0, help="seed for weights and the training stream")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: idle cores)"
    )
    k = sub.add_parser(
        "check-tiny", help="exact match of a TinyVLM checkpoint on the shipped sample"
    )
    k.add_argument(
        "--model", default=str(TINY_DIR), help="checkpoint directory (default: assets/tinyvlm)"
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-tiny":
        try:
            model = TinyVLM.from_pretrained(args.model)
        except (FileNotFoundError, ValueError) as e:
            parser.exit(2, f"models.py check-tiny: error: {e}\n")
        print(json.dumps({k: round(v, 2) for k, v in knowledge(model, data.load_sample()).items()}))
        return 0
    if min(args.steps, args.batch_size, args.threads) < 1 or not args.lr > 0:
        parser.error("--steps, --batch-size and --threads must be >= 1 and --lr > 0")
    torch.set_num_threads(args.threads)
    try:  # by trying, before any work: the folder is made (and removed if training fails)
        cleanup = data.claim_output(args.out, "--out", folder=True)
    except data.OutputError as e:
        parser.exit(2, f"models.py train-tiny: error: {e}\n")
    start = time.time()
    try:
        losses = train_tiny(
            args.out, args.steps, args.batch_size, args.lr, args.seed, device=args.device
        )
    except BaseException:
        cleanup()
        raise
    print(
        f"trained {args.steps} steps in {time.time() - start:.0f} s; final loss "
        f"{np.mean(losses[-50:]):.4f}; saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
