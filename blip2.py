"""BLIP-2 OPT, the authors' backbone, behind the interface of models.py.

``Blip2OPT`` wraps ``transformers.Blip2ForConditionalGeneration`` (``BLIP2_OPT`` is loaded only
when a user names it). ``random_blip2`` builds a tiny random one in memory, with
``offline_blip2_processor``'s word-level tokenizer over the world's vocabulary: the tests and
bench.py run BLIP-2's code path without downloading anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

import world
from models import Backbone, LMOutput, Tail, build_tokenizer, lm_loss, opt_tail

# The authors' backbone: loaded only when a user asks for it.
BLIP2_OPT = "Salesforce/blip2-opt-2.7b"
# The image side of the random models (random_blip2, minigpt4.random_minigpt4): a 1-layer ViT on
# 32x32 images in 8x8 patches, and a 1-layer Q-Former, both of width 32.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TINY_QFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    encoder_hidden_size=32,
)


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

    tok = build_tokenizer(world.vocabulary())
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
        vision_config=TINY_VISION,
        qformer_config=dict(**TINY_QFORMER, vocab_size=64),
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
