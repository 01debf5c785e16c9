"""BalancEdit, the method, top to bottom in the paper's order (Section 4).

Guo, Hu, Guan, Hartvigsen, Li, "BalancEdit: Dynamically Balancing the Generality-Locality
Trade-off in Multi-modal Model Editing", ICML 2025.

The model's weights are never touched. Around one layer l the editor keeps a codebook; edit j
is an entry (key k_j, value v_j = an edited copy of l, radius eps_j, target y^n_j).

    Eq. 1  f^l(h^{l-1}) = v_j(h^{l-1}) if d(q, k_j) <= eps_j, j = argmin_k d(q, k); else l(h^{l-1})
    Eq. 2  v_j = argmin_v L(f_new(i, t), y^n)          (Adam on v only)
    Eq. 3  eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)

q and k are the mean of l's input h^{l-1} over the prompt (image, question) or, pool="last", its last position.
Pos is the same image with a rephrased question; Neg is a black image with the same question.
Shapes: B samples, T positions, D the layer's input width, N codebook entries.

    model, record = models.TinyVLM.from_pretrained(), data.load_sample(limit=1)[0]
    editor = BalancEditor(model, BalancEditConfig(alpha=0.7))
    report = editor.edit(record)                                  # one codebook entry
    with editor.attached():                                       # the edited model (Eq. 1)
        print(model.generate([record.image], [record.question]))  # [record.target]
"""

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from data import ANCHORS, anchor_image
from models import lm_loss


@dataclass
class BalancEditConfig:
    """The method's knobs, with the defaults used on TinyVLM."""

    layer: str | None = (
        None  # dotted path of layer l (an nn.Linear); None: the backbone's target_layer
    )
    alpha: float = (
        0.7  # Eq. 3: 0 -> eps = d(Neg, k), 1 -> eps = d(Pos, k) (authors: 0.05-0.35 on BLIP-2)
    )
    distance: str = "cos"  # d(q, k): "cos" (1 - cos, the authors' default) or "euc" (Table 6)
    pool: str = "mean"  # q and k: the "mean" over the prompt (the paper's) or its "last" position
    negative: str = "black"  # the negative's image (Table 7): "black", "white" or "noise"
    steps: int = 100  # Eq. 2: Adam steps (authors: 50 on BLIP-2 OPT)
    lr: float = 1e-2  # Eq. 2: Adam learning rate (authors: 1e-4 on BLIP-2 OPT)
    value_form: str = "full"  # v_k: "full" copy of l (the paper's) or "lora" (l + B A, for memory)
    rank: int = 8  # rank of B A when value == "lora"
    cache: bool = True  # Eq. 2 on cached activations: the same values, faster
    seed: int = 0  # LoRA's A and the noise negative

    def __post_init__(self):  # refuse bad values before any work
        checks = {
            "distance": self.distance in ("cos", "euc"),
            "pool": self.pool in ("mean", "last"),
            "negative": self.negative in ANCHORS,
            "value_form": self.value_form in ("full", "lora"),
            "alpha": 0 <= self.alpha <= 1,
            "steps": type(self.steps) is int and self.steps >= 1,
            "rank": type(self.rank) is int and self.rank >= 1,
            "lr": isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"BalancEditConfig: bad {name}: {getattr(self, name)!r} (see the field's comment)"
                )


# ---------------------------------------------------------------- distance and radius (Eq. 3)
def distance(queries: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """d(q, k) for every pair, in float32: (B, D), (N, D) -> (B, N). "cos": 1 - cos, in [0, 2]
    (a zero vector is at distance 1 from everything); "euc": ||q - k||_2 (Table 6)."""
    q, k = queries.float(), keys.float()
    if kind == "cos":
        return (1.0 - F.normalize(q, dim=-1, eps=1e-8) @ F.normalize(k, dim=-1, eps=1e-8).T).clamp(
            min=0.0
        )
    if kind == "euc":  # the exact (non-matmul) path: d(k, k) == 0
        return torch.cdist(q, k, compute_mode="donot_use_mm_for_euclid_dist")
    raise ValueError(f"unknown distance {kind!r}; allowed: cos, euc")


def radius(d_pos, d_neg, alpha: float):
    """Eq. 3: eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k), floats or tensors.

    The paper's main text swaps the weights; its Appendix D (Eq. 10), the authors' code and its
    own alpha ablation (the ball shrinks as alpha grows) use this form. alpha = 0 gives d(Neg, k),
    the widest ball that excludes the negative; alpha = 1 gives d(Pos, k), the smallest that holds
    the positive. The clamp keeps eps between the two in floating point too."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
    if alpha == 1.0:
        return d_pos
    eps = d_neg + alpha * (
        d_pos - d_neg
    )  # = alpha * d_pos + (1 - alpha) * d_neg, monotone in alpha
    if isinstance(eps, torch.Tensor):
        return eps.clamp(torch.minimum(d_pos, d_neg), torch.maximum(d_pos, d_neg))
    return min(max(eps, min(d_pos, d_neg)), max(d_pos, d_neg))


# ---------------------------------------------------------------- the key
def prompt_mean(h: torch.Tensor, prompt: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """The key (or query) of each sample: the mean of h^{l-1} (B, T, D) over its prompt positions (B, T),
    never padding or the answer, so generation and a padded batch see the same key; pool="last": the last
    prompt position only. -> (B, D) float32; NaN for a row with no prompt position (a KV-cache decoding step)."""
    if pool == "last":
        prompt = prompt & (prompt.cumsum(dim=1) == prompt.sum(dim=1, keepdim=True))  # (B, T)
    prompt = prompt[..., None]  # (B, T, 1)
    return (h.float() * prompt).sum(dim=1) / prompt.sum(dim=1)  # (B, D)


# ---------------------------------------------------------------- the codebook
class Codebook(nn.Module):
    """The entries (k_j, eps_j, v_j, y^n_j): keys (N, D) and radii (N,) in buffers, values in a
    ModuleList, targets and what each edit asked (image hash, question, rephrasings) in lists, one length."""

    def __init__(self, distance: str = "cos"):
        super().__init__()
        if distance not in ("cos", "euc"):
            raise ValueError(f"unknown distance {distance!r}; allowed: cos, euc")
        self.distance = distance
        self.register_buffer("keys", torch.zeros(0, 0))  # (N, D)
        self.register_buffer("radii", torch.zeros(0))  # (N,)
        self.register_buffer(
            "unit_keys", torch.zeros(0, 0), persistent=False
        )  # (N, D) k / |k|, for "cos"
        self.values, self.targets, self.asked = nn.ModuleList(), [], []

    def __len__(self) -> int:
        return len(self.targets)

    def add(
        self, key: torch.Tensor, value: nn.Module, radius: float, target: str, asked: list[str] = ()
    ) -> int:
        """Append an entry; returns its index. Refuses what would make routing wrong."""
        key, D = (
            torch.as_tensor(key).detach().to(self.keys.device, torch.float32),
            self.keys.shape[1],
        )
        if key.dim() != 1 or not torch.isfinite(key).all() or (len(self) and len(key) != D):
            raise ValueError(
                f"key must be a finite vector of {D if len(self) else 'D'} numbers; got {key}"
            )
        if not (
            math.isfinite(float(radius))
            and radius >= 0
            and isinstance(target, str)
            and all(isinstance(a, str) for a in asked)
        ):
            raise ValueError(
                f"need a finite radius >= 0 and a string target; got {radius!r}, {target!r}"
            )
        keys, unit_keys = (
            (self.keys, self.unit_keys) if len(self) else (key[None][:0], key[None][:0])
        )
        self.keys = torch.cat([keys, key[None]])  # (N+1, D)
        self.unit_keys = torch.cat(
            [unit_keys, F.normalize(key[None], dim=-1, eps=1e-8)]
        )  # once, not per query
        self.radii = torch.cat([self.radii, self.radii.new_tensor([float(radius)])])  # (N+1,)
        self.values.append(value)
        self.targets.append(target)
        self.asked.append(list(asked))
        return len(self) - 1

    def remove(self, j: int) -> None:
        """Delete entry j; later entries shift down by one."""
        if not 0 <= j < len(self):
            raise IndexError(f"codebook index {j} out of range for {len(self)} entries")
        keep = torch.arange(len(self), device=self.keys.device) != j  # (N,)
        self.keys, self.radii, self.unit_keys = (
            self.keys[keep],
            self.radii[keep],
            self.unit_keys[keep],
        )
        del self.values[j], self.targets[j], self.asked[j]

    @torch.no_grad()
    def lookup(self, queries: torch.Tensor):
        """Eq. 1's decision per query, (B, D) -> index (B,), dist (B,), hit (B,):
        j = argmin_k d(q, k), dist = d(q, k_j), hit = dist <= eps_j (an empty codebook: -1, inf, False)."""
        if len(self) == 0:
            miss = torch.full((len(queries),), -1, device=queries.device)
            return miss, miss.float().fill_(math.inf), miss > 0
        q = queries.float()  # (B, D)
        if self.distance == "cos":  # distance(q, keys, "cos"), with the keys' norms computed at add
            d = (1.0 - F.normalize(q, dim=-1, eps=1e-8) @ self.unit_keys.T).clamp(min=0.0)  # (B, N)
        else:
            d = distance(q, self.keys, "euc")  # (B, N)
        dist, index = d.min(dim=1)  # (B,), (B,)  j = argmin_k d(q, k)
        return (
            index,
            dist,
            dist <= self.radii[index],
        )  # hit: d(q, k_j) <= eps_j (a NaN query never hits)


# ---------------------------------------------------------------- the values v_k
class LoRAValue(nn.Module):
    """v(x) = W x + b + B A x with layer l's W and b frozen (referenced, not stored): a value of
    r (in + out) numbers instead of a copy of l. B starts at zero, so v starts as l."""

    def __init__(self, layer: nn.Linear, rank: int = 8):
        super().__init__()
        object.__setattr__(self, "base", layer)  # not a submodule: not trained, not saved
        self.A = nn.Parameter(
            torch.empty(rank, layer.in_features, device=layer.weight.device)
        )  # (r, in)
        self.B = nn.Parameter(
            torch.zeros(layer.out_features, rank, device=layer.weight.device)
        )  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) float32 -> (..., out) float32
        W, b = (
            self.base.weight.detach(),
            None if self.base.bias is None else self.base.bias.detach(),
        )
        return F.linear(x.to(W.dtype), W, b).float() + F.linear(F.linear(x, self.A), self.B)


def new_value(layer: nn.Linear, form: str = "full", rank: int = 8) -> nn.Module:
    """A value that starts as layer l, trained and kept in float32 (Adam on fp16 weights loses
    small updates): "full", a copy of l; "lora", l plus a zero low-rank update."""
    if form == "lora":
        return LoRAValue(layer, rank)
    value = nn.utils.skip_init(
        nn.Linear,
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=torch.float32,
    )
    value.load_state_dict(layer.state_dict())  # copies l's weights (cast to float32)
    return value


# ---------------------------------------------------------------- routing (Eq. 1)
class Router:
    """Route layer ``layer_path`` of ``model`` through ``codebook`` (Eq. 1), per sample, until ``remove()``
    or the end of a ``with`` block. The backbone's ``prompt_mask`` (B, T) keyword gives the layout; a KV-cache
    decoding step (no prompt position) holds its prompt's route. After each call of the layer, ``last_index``
    (B,) is the entry each sample used (-1: the layer itself) and ``last_query`` (B, D) its query."""

    def __init__(self, model: nn.Module, layer_path: str, codebook: Codebook, pool: str = "mean"):
        self.codebook, self.pool, self.mask, self.held, self.last_index, self.last_query = (
            codebook,
            pool,
            *[None] * 4,
        )
        self.handles = [
            model.get_submodule(layer_path).register_forward_hook(self.route),
            model.register_forward_pre_hook(self.read_mask, with_kwargs=True),
        ]

    def read_mask(self, model, args, kwargs):  # the backbone's (B, T) prompt mask, on every call
        self.mask = kwargs.get("prompt_mask")

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def route(self, layer, args, out):
        cb, h = self.codebook, args[0]
        # The (B, T) layout: the prompt mask undoes OPT's flattening of (B, T, D) to (B*T, D). Without
        # one, every position of a 3-D input counts, and each row of a 2-D input is one sample.
        if self.mask is None:
            prompt = torch.ones(
                h.shape[:-1] if h.dim() == 3 else (len(h), 1), dtype=torch.bool, device=h.device
            )
        elif self.mask.numel() * h.shape[-1] == h.numel():
            prompt = self.mask.to(h.device, torch.bool)  # (B, T)
        else:
            raise ValueError(
                f"layer input {tuple(h.shape)} does not match the prompt mask layout {tuple(self.mask.shape)}"
            )
        B, T = prompt.shape
        h = h.reshape(B, T, -1)  # (B, T, D)
        q = prompt_mean(h, prompt, self.pool)  # (B, D); NaN rows: no prompt position
        j, _, hit = cb.lookup(q)  # Eq. 1: j = argmin_k d(q, k), hit = d(q, k_j) <= eps_j
        index = torch.where(hit, j, -1)  # (B,)
        if (
            self.mask is not None
        ):  # KV-cache decoding: a row with no prompt keeps the prefill's route
            held = (
                self.held
                if self.held is not None and len(self.held) == B
                else torch.full_like(index, -1)
            )
            index = torch.where(prompt.any(dim=1), index, torch.where(held < len(cb), held, -1))
        self.held = index if self.mask is not None else None
        self.last_index, self.last_query = index, q
        if (index < 0).all():
            return None  # every sample out of scope: the layer's own output, untouched
        new = out.clone(memory_format=torch.contiguous_format).view(B, T, -1)  # (B, T, D_out)
        for e in index[index >= 0].unique().tolist():
            rows = (index == e).nonzero()[:, 0]
            new[rows] = cb.values[e](h[rows].float()).to(out.dtype)  # Eq. 1: v_j(h^{l-1})
        return new.view(out.shape)


attach = Router  # with attach(model, layer_path, codebook[, pool]) as router: ... (Eq. 1)


def override(model: nn.Module, layer_path: str, value: nn.Module):
    """f_new of Eq. 2: ``with override(...):`` every sample's layer output is v(h^{l-1})."""
    return model.get_submodule(layer_path).register_forward_hook(
        lambda layer, args, out: value(args[0].float()).to(out.dtype)
    )


# ---------------------------------------------------------------- training a value (Eq. 2)
def train_value(
    backbone: nn.Module,
    layer_path: str,
    value: nn.Module,
    batch: dict,
    steps: int,
    lr: float,
    cache: bool = True,
) -> list[float]:
    """Eq. 2: v* = argmin_v L(f_new(i, t), y^n), Adam on v's parameters only; L is the LM
    cross-entropy on the target tokens (labels are -100 elsewhere). Returns the loss per step."""
    params = [p for p in value.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    # Fast path: the layers below l are frozen, so h^{l-1} is the same at every step; record it
    # once, with a function running only the network after l (None if the backbone has none).
    cached = backbone.tail(batch, layer_path) if cache else None
    losses = []
    for _ in range(steps):
        if cached is None:  # the plain loop: the whole model, layer l replaced by v
            with override(backbone, layer_path, value):
                loss = backbone(**batch).loss
        else:
            h, tail = cached  # h^{l-1} as l saw it; tail: l's output -> logits
            loss = lm_loss(tail(value(h.float()).to(h.dtype)), batch["labels"])
        for p, g in zip(params, torch.autograd.grad(loss, params)):  # no gradient reaches the model
            p.grad = g
        opt.step()
        losses.append(loss.item())
    value.zero_grad(set_to_none=True)  # a stored value holds no gradients
    return losses


# ---------------------------------------------------------------- the editor
@dataclass
class EditReport:  # what one edit did
    index: int  # the entry of this edit
    action: str  # "new"; "overlap" (started from a same-target entry); "conflict" (replaced one)
    removed: list[str]  # the entries a conflict removed, as "question -> target"
    d_pos: float  # d(Pos, k)
    d_neg: float  # d(Neg, k)
    radius: float  # eps of the entry
    losses: list[float] = field(default_factory=list)  # Eq. 2 loss per step
    seconds: float = 0.0  # wall time of the edit


class BalancEditor:
    """BalancEdit at one layer: ``edit(record)`` adds an entry, ``attached()`` is the edited model."""

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        self.backbone, self.config, self.layer_path = (
            backbone,
            config,
            config.layer or backbone.target_layer,
        )
        self.layer = backbone.get_submodule(self.layer_path)  # layer l
        if not isinstance(self.layer, nn.Linear):
            raise ValueError(
                f"layer {self.layer_path!r} is a {type(self.layer).__name__}, not an nn.Linear"
            )
        self.codebook = Codebook(config.distance).to(self.layer.weight.device)

    def __len__(self) -> int:
        return len(self.codebook)

    @torch.no_grad()
    def keys_of(self, images, questions) -> torch.Tensor:
        """The key of each (image, question): (B, D), as the routing hook computes it."""
        batch, seen = self.backbone.to_device(self.backbone.encode(images, questions)), []
        with self.layer.register_forward_hook(lambda layer, args, out: seen.append(args[0])):
            self.backbone(**batch)
        prompt = batch["prompt_mask"]
        return prompt_mean(seen[0].reshape(*prompt.shape, -1), prompt, self.config.pool)  # (B, D)

    def positive(self, record) -> str:
        """R(t): a training rephrasing (never one that scores T-Gen), else the backbone's own."""
        rephrased = record.train_rephrases or [
            q for q in self.backbone.rephrase(record.question) if q not in record.rephrases
        ]
        if not rephrased:
            raise ValueError(
                f"record {record.id}: no training rephrasing and the backbone offers none"
            )
        return rephrased[0]

    def edit(self, record) -> EditReport:
        start, cfg, cb = time.perf_counter(), self.config, self.codebook
        # The key k = (i, t) and the two probes of Eq. 3, Pos = (i, R(t)) and Neg = (black, t).
        anchor = anchor_image(cfg.negative, record.image.size, seed=cfg.seed)  # black by default
        k, pos, neg = self.keys_of(
            [record.image, record.image, anchor],
            [record.question, self.positive(record), record.question],
        )
        d_pos, d_neg = distance(torch.stack([pos, neg]), k[None], cfg.distance)[:, 0].tolist()
        eps = radius(d_pos, d_neg, cfg.alpha)  # Eq. 3
        # Many edits (the paper's "how to continually edit"). What the edit asks: image, question, rephrasings.
        asked = [
            hashlib.sha1(record.image.tobytes()).hexdigest(),
            record.question,
            *record.train_rephrases,
            *record.rephrases,
        ]
        action, init, removed = "new", None, []
        if len(cb):
            d = distance(k[None], cb.keys, cfg.distance)[0]  # (N,) d(k, k_j)
            differ = torch.tensor([t != record.target for t in cb.targets], device=d.device)  # (N,)
            # The same edit asked again (its image and question, up to a rephrasing) with a new answer:
            # the old entry goes. A merely near key is no conflict.
            again = [
                old[:1] == asked[:1] and not set(old[1:]).isdisjoint(asked[1:]) for old in cb.asked
            ]
            conflict = differ & torch.tensor(again, dtype=torch.bool, device=d.device)  # (N,)
            for j in conflict.nonzero()[:, 0].flip(0).tolist():
                removed.append(f"{cb.asked[j][1]!r} -> {cb.targets[j]!r}")
                cb.remove(j)
                action = "conflict"
            d, differ = d[~conflict], differ[~conflict]
            # k inside a ball with the same target: start from that value, so it is not forgotten.
            same = ~differ & (d <= cb.radii)
            if same.any() and action == "new":
                action, init = "overlap", cb.values[int(torch.where(same, d, math.inf).argmin())]
            # Balls with different targets must not hold each other's keys: shrink both just inside.
            # Only these entries change; Eq. 1 routes a query to its nearest key first.
            for j in (differ & ((d <= cb.radii) | (d <= eps))).nonzero()[:, 0].tolist():
                inside = float(d[j]) * (1 - 1e-3)  # a margin far above float round-off
                cb.radii[j] = min(float(cb.radii[j]), inside)
                eps = min(eps, inside)
        torch.manual_seed(cfg.seed)  # LoRA's A
        value = new_value(self.layer, cfg.value_form, cfg.rank)
        if init is not None:
            value.load_state_dict(init.state_dict())
        batch = self.backbone.to_device(
            self.backbone.encode([record.image], [record.question], [record.target])
        )
        losses = train_value(
            self.backbone, self.layer_path, value, batch, cfg.steps, cfg.lr, cfg.cache
        )  # Eq. 2
        index = cb.add(k, value, eps, record.target, asked)
        return EditReport(
            index, action, removed, d_pos, d_neg, eps, losses, time.perf_counter() - start
        )

    def attached(self) -> Router:
        """``with editor.attached(): ...`` runs the edited model (Eq. 1)."""
        return attach(self.backbone, self.layer_path, self.codebook, self.config.pool)

    def remove(self, j: int) -> None:
        """Undo edit j (the model is as if it had never been made)."""
        self.codebook.remove(j)

    # ------------------------------------------------------------ save / load (safetensors + json)
    def save(self, path) -> None:
        """Write ``path/codebook.safetensors`` (keys, radii, values) and ``path/codebook.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.cpu().contiguous() for k, v in self.codebook.state_dict().items()},
            str(path / "codebook.safetensors"),
        )
        meta = {
            "format": "balancedit-codebook",
            "version": 1,
            "config": asdict(self.config),
            "layer": self.layer_path,
            "targets": self.codebook.targets,
            "asked": self.codebook.asked,
        }
        (path / "codebook.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path, backbone: nn.Module) -> "BalancEditor":
        """Read what ``save`` wrote, for this backbone; every entry is checked as ``add`` checks it."""
        try:
            meta, state = (
                json.loads(Path(path, "codebook.json").read_text()),
                load_file(str(Path(path, "codebook.safetensors"))),
            )
            if meta.get("format") != "balancedit-codebook" or meta.get("version") != 1:
                raise ValueError("not a BalancEdit codebook of format version 1")
            editor = cls(backbone, BalancEditConfig(**meta["config"]))
            keys = state["keys"]  # (N, D), D = the layer's inputs
            if (meta["layer"], len(meta["targets"]), *keys.shape[1:]) != (
                editor.layer_path,
                len(keys),
                editor.layer.in_features,
            ):
                raise ValueError(
                    f"saved for layer {meta['layer']!r} with {len(meta['targets'])} targets for keys of shape "
                    f"{tuple(keys.shape)}; this layer takes {editor.layer.in_features} inputs"
                )
            for j, target in enumerate(meta["targets"]):
                value, prefix = (
                    new_value(editor.layer, editor.config.value_form, editor.config.rank),
                    f"values.{j}.",
                )
                value.load_state_dict(
                    {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}
                )
                editor.codebook.add(
                    keys[j], value, float(state["radii"][j]), target, meta["asked"][j]
                )
        except (
            OSError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            RuntimeError,
        ) as e:
            raise ValueError(
                f"{path}: cannot load a codebook written by BalancEditor.save: {e}"
            ) from None
        return editor
