"""What a backbone must provide to be edited, the cached tails, and TinyVLM.

The editor and the metrics see a backbone only through ``Backbone``'s interface:

- ``target_layer``: the dotted path of the layer l that BalancEdit wraps by default (the last
  decoder layer's ``fc2`` on OPT, as the authors; ``mlp.up_proj`` on LLaMA);
- ``encode(images, questions, answers=None)`` -> a batch of (B, T) tensors on the decoder's
  positions: ``input_ids`` (image positions hold a placeholder token), ``pixel_values``,
  ``attention_mask``, ``labels`` (-100 outside the answer tokens) and ``prompt_mask``;
- ``backbone(**batch)`` -> ``LMOutput(logits, loss, kv_cache)``, with ``backbone.prompt_mask``
  readable by a routing hook during the call (the contract is in ``Backbone``'s docstring);
- ``generate(images, questions)`` -> greedy answers; ``rephrase(question)`` -> paraphrases;
- ``tail(batch, layer_path)`` -> a ``Tail`` for cached training, or None;
  ``layer_input(batch, layer_path)`` -> l's input (B, T, D).

A subclass supplies ``forward`` and the token and pixel helpers listed in ``Backbone``; the rest
is shared. TinyVLM, the embedded default, is an open_clip ViT -> a projector -> an OPT decoder:
a miniature of BLIP-2 OPT, trained on the generated world by train.py and shipped in
``assets/tinyvlm``. The authors' backbones are in blip2.py and minigpt4.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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
    ``answer_ids(answer)`` (answer tokens + EOS), ``pixel_values(images)`` and ``forward``;
    its ``__init__`` calls ``super().__init__()``.

    The prompt mask is owned here. ``encode`` returns ``prompt_mask`` (B, T) bool, True at the
    image and question positions (what a key averages over), and a caller hands it on with the
    batch: ``backbone(**batch)``. ``generate`` passes the prompt's on the prefill call and an
    all-False (B, 1) one at each decoding step, so that a routing hook holds the route it chose
    on the prompt. ``forward`` never sees it: a forward pre-hook registered here takes it out of
    the call's keyword arguments and keeps it as ``self.prompt_mask`` (None when the call gave
    none). A routing hook on a layer (balancedit.Router) reads ``backbone.prompt_mask`` during
    the call.
    """

    target_layer: str
    eos_token_id: int
    max_new_tokens: int = 8
    max_positions: int  # the decoder's position embeddings: image, prompt and answer must fit

    def __init__(self):
        super().__init__()
        self.prompt_mask: Optional[torch.Tensor] = None  # (B, T) bool, of the current call
        self.register_forward_pre_hook(Backbone.take_prompt_mask, with_kwargs=True)

    @staticmethod
    def take_prompt_mask(backbone: Backbone, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The pre-hook: ``prompt_mask`` leaves the call's keyword arguments for
        ``backbone.prompt_mask``."""
        backbone.prompt_mask = kwargs.pop("prompt_mask", None)
        return args, kwargs

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


def layer_index(layers: Sequence[nn.Module], target: str, module: nn.Module) -> Optional[int]:
    """The index of the layer whose submodule ``target`` is ``module``, or None."""
    for i, layer in enumerate(layers):
        if dict(layer.named_modules()).get(target) is module:
            return i
    return None


def record_layer(
    backbone: nn.Module,
    batch: dict[str, torch.Tensor],
    watched: dict[str, nn.Module],
    following: Optional[nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One forward of ``batch``: the input of each ``watched`` module on the batch's positions
    (B, T, ...), detached, and the keyword arguments ``following`` receives (when given)."""
    # Grad mode on, as in the naive loop's forward: some kernels (torch's fused attention
    # fast path, used by open_clip's ViT) take another route under no_grad, and the
    # cached activations must be exactly those the naive loop sees.
    with torch.enable_grad():
        seen = record_inputs(backbone, batch, watched, kwargs_of=following)
    B, T = batch["attention_mask"].shape
    # detach: the recorded graph is dropped with `seen` when this function returns
    inputs = {name: seen[name].detach().reshape(B, T, -1) for name in watched}
    return inputs, seen.get("kwargs", {})


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t's logits predict token t + 1: the (B, T) positions whose logits enter the
    loss (those before an answer token), and the (P,) tokens they predict."""
    predicts = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T); -100 (none) at the last
    at = predicts != -100  # (B, T)
    return at, predicts[at]


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
    L = layer_index(layers, target, backbone.get_submodule(layer_path))
    if L is None:
        return None
    layer = layers[L]
    watched = {"h": layer.get_submodule(target), "residual": layer.get_submodule(residual_at)}
    following = layers[L + 1] if L + 1 < len(layers) else None
    seen, kwargs = record_layer(backbone, batch, watched, following)
    inputs = seen["h"]  # (B, T, F), whatever shape l saw
    dtype = inputs.dtype  # the network's: the value's float32 output is cast to it
    residual = seen["residual"]  # (B, T, D)
    at, targets = loss_positions(batch["labels"])  # (B, T), (P,)
    if per_position and following is None:
        h = inputs[at]  # (P, F)
        residual = residual[at]  # (P, D)

        def rest_at(y: torch.Tensor) -> torch.Tensor:  # y: (P, D), the value's output
            return head(finish_layer(layer, h, residual, y.to(dtype))).float()  # (P, V)

        return Tail(inputs, h.float(), rest_at, targets)
    rows = at.any(dim=1)  # (B,): the rows that hold a target
    h = inputs[rows]  # (R, T, F)
    residual = residual[rows]  # (R, T, D)
    later = {k: take_rows(v, rows) for k, v in kwargs.items() if k in kept}

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
    """open_clip ViT (patch tokens) -> projector -> OPT decoder; the default, CPU-sized backbone.
    ``tokenizer``: word-level, over its world's vocabulary (``build_tokenizer``)."""

    def __init__(self, config: TinyConfig, tokenizer):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from transformers import OPTConfig, OPTForCausalLM

        self.config = config
        self.tokenizer = tokenizer
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

    def grown(self, max_positions: int, words: Sequence[str]) -> "TinyVLM":
        """A copy with ``max_positions`` positions and ``words`` added after its vocabulary (to
        be taught to read IKE's text: ike.FORMAT_WORDS). Every trained weight is kept; only the
        new rows (positions, words) start fresh."""
        vocab = self.tokenizer.get_vocab()
        tokenizer = build_tokenizer([*sorted(vocab, key=vocab.get), *words])  # old ids kept
        model = TinyVLM(replace(self.config, max_positions=max_positions), tokenizer)
        state = model.state_dict()
        for name, old in self.state_dict().items():
            state[name][tuple(slice(0, n) for n in old.shape)] = old  # the old rows, in place
        model.load_state_dict(state)
        model.lm.tie_weights()
        return model

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
                    f"(train one with `python train.py --out {path}`)"
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
