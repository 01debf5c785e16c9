"""MiniGPT-4 (Vicuna v0) behind the interface of models.py, assembled from transformers parts.

``MiniGPT4`` is BLIP-2's ViT and Q-Former, MiniGPT-4's projection and a LLaMA (Vicuna-7B),
loaded from local files by ``MiniGPT4.from_pretrained``; its target layer is the last LLaMA
layer's ``mlp.up_proj``, and ``llama_tail`` is its cached tail. ``random_minigpt4`` builds a tiny
random one in memory, with ``offline_minigpt4_tokenizer``, so that the tests run without weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image

import world
from blip2 import TINY_QFORMER, TINY_VISION
from models import (
    REPHRASE,
    Backbone,
    LMOutput,
    Tail,
    build_tokenizer,
    decoder_tail,
    lm_loss,
    pixels,
)

MINIGPT4_PROMPT = (
    "###Human: <Img><ImageHere></Img> {} ###Assistant: "  # stage 2's prompt_template, one image
)
MINIGPT4_TEXT_PROMPT = "###Human: {} ###Assistant: "  # the same conversation, no image
IMAGE_HERE = "<ImageHere>"  # the image placeholder token


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
        blip2_dir = Path(blip2_dir).expanduser()
        vicuna_dir = Path(vicuna_dir).expanduser()
        projection_file = Path(projection_file).expanduser()
        check_local_files(blip2_dir, vicuna_dir, projection_file)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        parts = load_blip2_vision(blip2_dir, dtype)
        llama_proj = load_projection(projection_file, dtype)
        llama, tok = load_vicuna(vicuna_dir, dtype)
        model = cls(parts.vision, parts.qformer, parts.query_tokens, llama_proj, llama, tok)
        return model.to(device).eval()

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


# The steps of MiniGPT4.from_pretrained, each from local files only.


def check_local_files(blip2_dir: Path, vicuna_dir: Path, projection_file: Path) -> None:
    """Refuse, before loading anything, a missing directory, config.json or checkpoint file."""
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


def read_safetensors(folder: Path, wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of ``wanted``, from a Hugging Face checkpoint
    folder's safetensors file or shards (listed in its index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    state = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(
                f"{folder / shard}: missing (MiniGPT4 reads BLIP-2 weights as safetensors)"
            )
        with safe_open(str(folder / shard), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)})
    return state


class Blip2Vision(NamedTuple):
    """What MiniGPT-4 takes from BLIP-2: the image side."""

    vision: nn.Module  # the ViT
    qformer: nn.Module
    query_tokens: nn.Parameter  # (1, Q, H)


def load_blip2_vision(blip2_dir: Path, dtype: torch.dtype) -> Blip2Vision:
    """BLIP-2's vision tower, Q-Former and query tokens, from ``blip2_dir``'s safetensors."""
    from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

    config = Blip2Config.from_pretrained(blip2_dir, local_files_only=True)
    state = read_safetensors(blip2_dir, ("vision_model.", "qformer.", "query_tokens"))
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
    return Blip2Vision(vision, qformer, query_tokens)


def load_projection(projection_file: Path, dtype: torch.dtype) -> nn.Linear:
    """MiniGPT-4's projection, from its released checkpoint (a pickle, read with
    weights_only)."""
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
            raise ValueError(f"{projection_file}: no model[{key!r}] (not a MiniGPT-4 checkpoint?)")
    out_features, in_features = weights["llama_proj.weight"].shape  # (4096, 768)
    llama_proj = nn.Linear(in_features, out_features, dtype=dtype)
    llama_proj.load_state_dict(
        {"weight": weights["llama_proj.weight"], "bias": weights["llama_proj.bias"]}
    )
    return llama_proj


def load_vicuna(vicuna_dir: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Vicuna and its tokenizer, with the image placeholder added to the tokenizer (never
    embedded: ``MiniGPT4.forward`` replaces it)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(vicuna_dir, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(vicuna_dir, local_files_only=True)
    if tok.convert_tokens_to_ids(IMAGE_HERE) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_HERE]})
    return llama, tok


def offline_minigpt4_tokenizer():
    """A word-level tokenizer over the world's vocabulary and MiniGPT-4's template words, built in
    memory: BOS ``<s>`` prepended as LLaMA's tokenizer does, EOS ``</s>``, and ``<ImageHere>``."""
    from tokenizers import processors

    template = MINIGPT4_PROMPT.replace(IMAGE_HERE, " ") + REPHRASE
    tok = build_tokenizer(
        ["<s>", IMAGE_HERE, *re.findall(r"\w+|[^\w\s]+", template), *world.vocabulary()]
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
    vision = Blip2VisionModel(Blip2VisionConfig(**TINY_VISION))  # random_blip2's image side
    qformer = Blip2QFormerModel(Blip2QFormerConfig(**TINY_QFORMER))
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
