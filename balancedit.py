"""BalancEdit (Guo et al., ICML 2025), top to bottom in the paper's order (its Section 4).

The model's weights are never touched. Around one layer l the editor keeps a codebook: edit j is
an entry (key k_j, value v_j = an edited copy of l, radius eps_j, target y^n_j).

    Eq. 1  f^l(h) = v_j(h) if d(q, k_j) <= eps_j, where j = argmin_k d(q, k); else l(h)
    Eq. 2  v_j = argmin_v L(f_new(i, t), y^n)          (Adam on v only)
    Eq. 3  eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)

h is l's input h^{l-1}; q and k pool it over the prompt (image and question). Pos is the same
image with a rephrased question, Neg a black image with the same question. Shapes: B samples,
T positions, D the layer's input width, N codebook entries.
"""

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from data import ANCHORS, anchor_image
from editor import Editor, EditReport

HEADER = {"format": "balancedit-codebook", "version": 2}  # a saved codebook's first fields
CHOICES = {  # allowed values of the config's fields
    "distance": ("cos", "euc"),
    "pool": ("mean", "last"),
    "negative": ANCHORS,
    "value_form": ("full", "lora"),
}


@dataclass
class BalancEditConfig:
    """The knobs, with the defaults used on TinyVLM."""

    layer: str | None = None  # dotted path of layer l (an nn.Linear); None: the backbone's
    alpha: float = 0.7  # Eq. 3: 0 gives d(Neg, k), 1 gives d(Pos, k) (authors: 0.05-0.35)
    distance: str = "cos"  # d(q, k): "cos" (1 - cos, the authors') or "euc" (Table 6)
    pool: str = "mean"  # q and k: the prompt's "mean" (the paper's) or its "last" position
    negative: str = "black"  # Neg's image (Table 7): "black", "white" or "noise"
    steps: int = 100  # Eq. 2: Adam steps (authors: 50 on BLIP-2 OPT)
    lr: float = 1e-2  # Eq. 2: Adam's learning rate (authors: 1e-4 on BLIP-2 OPT)
    value_form: str = "full"  # v_k: a "full" copy of l (the paper's) or "lora" (l + B A)
    rank: int = 8  # the rank of B A (value_form "lora")
    cache: bool = True  # Eq. 2 on cached activations: the same values, faster
    seed: int = 0  # LoRA's A and the noise negative

    def __post_init__(self):  # refuse a bad value before any work, naming the field
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"BalancEditConfig.{name}: {value!r} is not in {allowed}")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"BalancEditConfig.alpha: {self.alpha!r} is not a number in [0, 1]")
        for name in ("steps", "rank"):
            n = getattr(self, name)
            if type(n) is not int or n < 1:
                raise ValueError(f"BalancEditConfig.{name}: {n!r} is not a positive integer")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ValueError(f"BalancEditConfig.lr: {self.lr!r} is not a positive number")


def distance(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """d(q, k) for every pair, in float32: (B, D), (N, D) -> (B, N)."""
    if metric == "cos":  # 1 - cos(q, k), in [0, 2]; a zero vector is at 1 from all
        q_hat = F.normalize(queries.float(), dim=-1, eps=1e-8)  # (B, D)
        k_hat = F.normalize(keys.float(), dim=-1, eps=1e-8)  # (N, D)
        return (1.0 - q_hat @ k_hat.T).clamp(min=0.0)  # (B, N)
    if metric == "euc":  # ||q - k||_2 (Table 6), not by matmul: d(k, k) is exactly 0
        mode = "donot_use_mm_for_euclid_dist"
        return torch.cdist(queries.float(), keys.float(), compute_mode=mode)  # (B, N)
    raise ValueError(f"unknown distance {metric!r}; allowed: {CHOICES['distance']}")


def radius(d_pos, d_neg, alpha: float):
    """Eq. 3: eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k), for floats or tensors.

    The paper's main text swaps the weights; its Eq. 10, the authors' code and its ablation
    (the ball shrinks as alpha grows) use this form: alpha = 0 leaves Neg just out, 1 holds Pos.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
    if alpha == 1.0:
        return d_pos  # exactly: the form below rounds off
    # The same sum as a step from d_neg towards d_pos: monotone in alpha in floats too.
    eps = d_neg + alpha * (d_pos - d_neg)
    # Clamped: round-off never steps past either end.
    if isinstance(eps, torch.Tensor):
        return eps.clamp(torch.minimum(d_pos, d_neg), torch.maximum(d_pos, d_neg))
    return min(max(eps, min(d_pos, d_neg)), max(d_pos, d_neg))


def prompt_key(h: torch.Tensor, prompt: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """The key (or query) of each sample, (B, D) float32: h^{l-1} (B, T, D) pooled over the
    prompt (B, T), its "mean" or its "last" position, never padding or the answer, so that
    generation and a padded batch see the same key. NaN for a row with no prompt position (a
    KV-cache decoding step)."""
    if pool not in CHOICES["pool"]:
        raise ValueError(f"unknown pool {pool!r}; allowed: {CHOICES['pool']}")
    if pool == "last":
        # The running count of prompt positions reaches the row's total at its last one.
        count = prompt.cumsum(dim=1)  # (B, T)
        prompt = prompt & (count == count[:, -1:])  # (B, T)
    weight = prompt[..., None].float()  # (B, T, 1)
    return (h.float() * weight).sum(dim=1) / weight.sum(dim=1)  # (B, D)


@dataclass
class Asked:
    """What an edit asked: its image (by SHA-1), its question and the question's rephrasings."""

    image_sha1: str
    question: str
    rephrasings: list[str]

    def same_edit(self, other: "Asked | None") -> bool:
        """The same image, and the same question up to a rephrasing."""
        if other is None or other.image_sha1 != self.image_sha1:
            return False
        theirs = [other.question, *other.rephrasings]
        return not {self.question, *self.rephrasings}.isdisjoint(theirs)


class Codebook(nn.Module):
    """The entries j = (k_j, eps_j, v_j, y^n_j); tensors in buffers, one length N for all."""

    def __init__(self, metric: str = "cos"):
        super().__init__()
        if metric not in CHOICES["distance"]:
            raise ValueError(f"unknown distance {metric!r}; allowed: {CHOICES['distance']}")
        self.metric = metric  # d of Eq. 1
        self.register_buffer("keys", torch.zeros(0, 0))  # (N, D); the first key sets D
        self.register_buffer("radii", torch.zeros(0))  # N
        self.values = nn.ModuleList()  # v_j
        self.targets = []  # y^n_j
        self.asked = []  # Asked of edit j, or None
        self.removals = 0  # entries removed so far: a router's held indices are stale after one

    def __len__(self) -> int:
        return len(self.targets)

    def add(self, key, value: nn.Module, radius: float, target: str, asked=None) -> int:
        """Append an entry; returns its index. Refuses what would make routing wrong."""
        key = torch.as_tensor(key).detach().to(self.keys.device, torch.float32)
        D = self.keys.shape[1] if len(self) else key.shape[-1]
        if key.dim() != 1 or len(key) != D or not torch.isfinite(key).all():
            raise ValueError(f"key must be a finite vector of {D} numbers; got {key}")
        if not math.isfinite(float(radius)) or radius < 0:
            raise ValueError(f"radius must be a finite number >= 0; got {radius!r}")
        if not isinstance(target, str):
            raise ValueError(f"need a string target: {target!r}")
        if len(self) == 0:
            self.keys = key.new_zeros(0, D)
        self.keys = torch.cat([self.keys, key[None]])  # (N+1, D)
        self.radii = torch.cat([self.radii, self.radii.new_tensor([float(radius)])])  # (N+1,)
        self.values.append(value)
        self.targets.append(target)
        self.asked.append(asked)
        return len(self) - 1

    def remove(self, j: int) -> None:
        """Delete entry j; later entries shift down one."""
        if not 0 <= j < len(self):
            raise IndexError(f"codebook index {j} out of range for {len(self)} entries")
        keep = torch.arange(len(self), device=self.keys.device) != j  # (N,) all but j
        self.keys = self.keys[keep]
        self.radii = self.radii[keep]
        del self.values[j]
        del self.targets[j]
        del self.asked[j]
        self.removals += 1

    @torch.no_grad()
    def lookup(self, queries: torch.Tensor):
        """Eq. 1's decision per query (B, D): j = argmin_k d(q, k), d(q, k_j), hit: d <= eps_j,
        each (B,). A NaN query never hits; with no entry: -1, inf, False."""
        B = len(queries)
        if len(self) == 0:
            j = torch.full((B,), -1, device=queries.device)
            dist = torch.full((B,), math.inf, device=queries.device)
            return j, dist, torch.zeros(B, dtype=torch.bool, device=queries.device)
        dist, j = distance(queries, self.keys, self.metric).min(dim=1)  # (B,), (B,)
        return j, dist, dist <= self.radii[j]


class LoRAValue(nn.Module):
    """v(x) = W x + bias + B A x, W and bias layer l's own (frozen): r (in + out) trained
    numbers instead of a copy of l. B starts at zero, so v starts as l."""

    def __init__(self, layer: nn.Linear, rank: int = 8):
        super().__init__()
        device = layer.weight.device
        # l's weight and bias, shared (not copied), neither trained nor saved.
        self.register_buffer("W", layer.weight.detach(), persistent=False)  # (out, in)
        bias = None if layer.bias is None else layer.bias.detach()
        self.register_buffer("bias", bias, persistent=False)  # (out,) or None
        self.A = nn.Parameter(torch.empty(rank, layer.in_features, device=device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) float32 -> (..., out)
        base = F.linear(x.to(self.W.dtype), self.W, self.bias).float()
        return base + F.linear(F.linear(x, self.A), self.B)


def new_value(layer: nn.Linear, form: str = "full", rank: int = 8) -> nn.Module:
    """v, starting as layer l: a "full" copy or l + a zero "lora" update, in float32 (Adam on
    fp16 weights loses small updates)."""
    if form == "lora":
        return LoRAValue(layer, rank)
    shape = (layer.in_features, layer.out_features)
    bias = layer.bias is not None
    # skip_init: no random initialisation (no draw from the RNG); the weights are l's.
    value = nn.utils.skip_init(nn.Linear, *shape, bias=bias, device=layer.weight.device)
    value.load_state_dict(layer.state_dict())  # l's weights, cast to float32
    return value


class Router(contextlib.AbstractContextManager):
    """Eq. 1 as a forward hook on layer l, per sample, until ``detach()`` or a ``with``'s end.
    It reads the prompt mask (B, T) of the model's call in progress (``model.prompt_mask``,
    set by models.Backbone), which also undoes OPT's flattening of (B, T, D) to (B*T, D)
    before ``fc2``. A variant overrides ``query`` or ``rewrite``, the parts that differ."""

    def __init__(self, model: nn.Module, layer_path: str, codebook: Codebook, pool: str = "mean"):
        self.model = model
        self.codebook = codebook
        self.pool = pool  # how a query pools h^{l-1}: "mean" or "last"
        self.held = None  # (B,) the route chosen on the prompt, held while decoding
        self.held_removals = 0  # codebook.removals when self.held was set
        self.last_index = None  # (B,) the entry each sample used in the last call; -1: l
        self.last_query = None  # (B, D) the last call's queries
        self.handle = model.get_submodule(layer_path).register_forward_hook(self.route)

    def detach(self) -> None:
        """Remove the hook: the plain model again."""
        self.handle.remove()

    def __exit__(self, *exc):
        self.detach()

    def prompt(self, h: torch.Tensor) -> torch.Tensor | None:
        """The call's prompt mask (B, T) that h (B, T, D) or (B*T, D) is laid out on; None: the
        call gave none (then every position of a 3-D h, or every row of a 2-D h, is a prompt)."""
        mask = getattr(self.model, "prompt_mask", None)
        if mask is None:
            return None
        if h.shape[:-1].numel() != mask.numel():
            layout = f"the prompt mask layout {tuple(mask.shape)}"
            raise ValueError(f"layer input {tuple(h.shape)} does not match {layout}")
        return mask.to(h.device, torch.bool)

    def query(self, h: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """q of Eq. 1 for each sample (B, D), NaN where a row has no prompt position."""
        return prompt_key(h, prompt, self.pool)

    def hold(self, index: torch.Tensor, prompt: torch.Tensor, masked: bool) -> torch.Tensor:
        """KV-cache decoding: a row with no prompt position keeps its prompt's route, row by row.
        A call without a mask holds nothing; a new batch size, or an entry removed since (the
        later ones shift down: a held index may name another entry), starts a new hold."""
        if not masked:
            self.held = None
            return index
        held = self.held
        removed = self.held_removals != self.codebook.removals
        if held is None or len(held) != len(index) or removed:
            held = torch.full_like(index, -1)
        self.held = torch.where(prompt.any(dim=1), index, held)  # (B,)
        self.held_removals = self.codebook.removals
        return self.held

    def rewrite(self, out, h, index, prompt) -> torch.Tensor:
        """Eq. 1's output: v_j(h) on every position of a row routed to entry j (``index`` (B,))."""
        B, T = prompt.shape
        y = out.reshape(B, T, -1).clone()  # (B, T, D_out), a copy to write into
        for e in index[index >= 0].unique().tolist():
            rows = index == e  # (B,)
            y[rows] = self.codebook.values[e](h[rows].float()).to(out.dtype)  # Eq. 1: v_j(h)
        return y.reshape(out.shape)

    def route(self, layer, args, out):
        h = args[0]  # (B, T, D), or (B*T, D) as OPT's fc2 sees it
        prompt = self.prompt(h)
        masked = prompt is not None
        if not masked:  # every position of a (B, T, D) input; each row of a 2-D one alone
            prompt = torch.ones(h.shape[:2] if h.dim() == 3 else (len(h), 1), dtype=torch.bool)
            prompt = prompt.to(h.device)
        B, T = prompt.shape
        h = h.reshape(B, T, -1)  # (B, T, D)
        q = self.query(h, prompt)  # (B, D)
        j, _, hit = self.codebook.lookup(q)  # Eq. 1: j = argmin_k d(q, k), d(q, k_j) <= eps_j
        index = self.hold(torch.where(hit, j, -1), prompt, masked)  # (B,); -1: layer l
        self.last_index = index
        self.last_query = q
        if (index < 0).all():
            return None  # no sample in scope: l's own output, untouched
        return self.rewrite(out, h, index, prompt)


def override(model: nn.Module, layer_path: str, value: nn.Module):
    """f_new of Eq. 2: every output of layer l is v(h^{l-1}), until the hook is removed."""

    def hook(layer, args, out):
        return value(args[0].float()).to(out.dtype)  # v computes in float32

    return model.get_submodule(layer_path).register_forward_hook(hook)


def train_value(backbone, layer_path, value, batch, steps, lr, tail=None) -> list[float]:
    """Eq. 2: v* = argmin_v L(f_new(i, t), y^n) by Adam on v's parameters only; L is the LM
    cross-entropy on the target tokens (labels -100 elsewhere). Returns each step's loss.
    ``tail``: the batch's ``models.Tail`` (cached activations: the same values, faster), or None
    (the plain loop: the whole model at every step)."""
    params = [p for p in value.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    losses = []
    for _ in range(steps):
        if tail is None:
            # The whole model, l replaced by v; a hook's handle removes it at the block's end.
            with override(backbone, layer_path, value):
                loss = backbone(**batch).loss
        else:  # the layers below l are frozen: v on the recorded h^{l-1}, then the net after l
            logits = tail.rest(value(tail.h))  # (P, V) float32
            loss = F.cross_entropy(logits, tail.targets)
        # Gradients for v only (inputs=): no .grad is ever written into the model.
        opt.zero_grad()
        loss.backward(inputs=params)
        opt.step()
        losses.append(loss.item())
    value.zero_grad(set_to_none=True)  # a stored value holds no gradients
    return losses


@dataclass
class Probe:  # what an edit's one forward finds (BalancEditor.probe)
    k: torch.Tensor  # (D,) the key
    d_pos: float  # d(Pos, k)
    d_neg: float  # d(Neg, k)
    batch: dict  # the edit's row (i, t, y^n): Eq. 2's batch
    tail: object  # its models.Tail, or None (the plain loop)


class BalancEditor(Editor):
    """BalancEdit at one layer: ``edit`` adds an entry, ``attached()`` is the edited model."""

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        self.backbone = backbone
        self.config = config
        self.layer_path = config.layer or backbone.target_layer
        self.layer = backbone.get_submodule(self.layer_path)  # layer l
        if not isinstance(self.layer, nn.Linear):
            got = type(self.layer).__name__
            raise ValueError(f"layer {self.layer_path!r} is a {got}, not an nn.Linear")
        self.codebook = Codebook(config.distance).to(self.layer.weight.device)

    def __len__(self) -> int:
        return len(self.codebook)

    def keys_of(self, images, questions) -> torch.Tensor:
        """The key of each (image, question), (B, D), as the routing hook computes it."""
        batch = self.backbone.to_device(self.backbone.encode(images, questions))
        h = self.backbone.layer_input(batch, self.layer_path)  # (B, T, D)
        return prompt_key(h, batch["prompt_mask"], self.config.pool)  # (B, D)

    def positive_question(self, record) -> str:
        """R(t): the first training rephrasing, else of the backbone's own, that T-Gen does not
        score (not in ``record.rephrases``: an edit is never scored on its own positive)."""
        unseen = [q for q in record.train_rephrases if q not in record.rephrases]
        if not unseen:
            asked = self.backbone.rephrase(record.question)
            unseen = [q for q in asked if q not in record.rephrases]
        if not unseen:
            raise ValueError(f"record {record.id}: no rephrasing that T-Gen does not score")
        return unseen[0]

    def edit(self, record) -> EditReport:
        """Add the edit (i, t) -> y^n of ``record``, in the paper's steps."""
        start = time.perf_counter()
        y = record.target
        image = record.image  # decoded from its file once
        p = self.probe(record, image)  # 1. the key, d(Pos, k), d(Neg, k)
        eps = radius(p.d_pos, p.d_neg, self.config.alpha)  # 2. Eq. 3
        image_sha1 = hashlib.sha1(image.tobytes()).hexdigest()
        asked = Asked(image_sha1, record.question, [*record.train_rephrases, *record.rephrases])
        removed = self.drop_conflicts(asked, y)  # 3. the many-edit rules
        init = None
        if len(self.codebook):  # the rules below compare k with the keys there are
            d = distance(p.k[None], self.codebook.keys, self.config.distance)[0]  # (N,) d(k, k_j)
            same = torch.tensor([t == y for t in self.codebook.targets], device=d.device)  # (N,)
            init = None if removed else self.same_target_value(d, same)
            eps = self.shrink_overlaps(d, ~same, eps)
        value, losses = self.train(p.batch, p.tail, init)  # 4. Eq. 2
        index = self.codebook.add(p.k, value, eps, y, asked)  # 5. the new entry
        action = "conflict" if removed else "new" if init is None else "overlap"
        seconds = time.perf_counter() - start
        return EditReport(index, action, removed, p.d_pos, p.d_neg, eps, losses, seconds)

    def probe(self, record, image) -> Probe:
        """One forward of (i, t), (i, R(t)) and (black, t): k, d(Pos, k), d(Neg, k), Eq. 2's row."""
        cfg = self.config
        black = anchor_image(cfg.negative, image.size, seed=cfg.seed)  # or white, noise
        images = [image, image, black]
        questions = [record.question, self.positive_question(record), record.question]
        answers = [record.target] * 3  # y^n after each prompt: causal, so no key sees it
        batch = self.backbone.to_device(self.backbone.encode(images, questions, answers))
        batch["labels"][1:] = -100  # Eq. 2 learns the edit's row only
        h, tail = self.backbone.layer_input_and_tail(batch, self.layer_path, per_position=True)
        keys = prompt_key(h, batch["prompt_mask"], cfg.pool)  # (3, D): k, Pos's, Neg's
        d = distance(keys[1:], keys[:1], cfg.distance)  # (2, 1): d(Pos, k), d(Neg, k)
        edit_row = {n: x[:1] for n, x in batch.items()}
        return Probe(keys[0], float(d[0, 0]), float(d[1, 0]), edit_row, tail if cfg.cache else None)

    # Many edits (the paper's "how to continually edit"), one rule per method.
    def drop_conflicts(self, asked: Asked, target: str) -> list[str]:
        """The same edit asked again with a new answer: the old entry goes (a merely near key is
        no conflict). Returns what went, as "question -> target"."""
        cb = self.codebook
        removed = []
        for j in reversed(range(len(cb))):  # from the end: the indices left stay valid
            if cb.targets[j] != target and asked.same_edit(cb.asked[j]):
                removed.append(f"{cb.asked[j].question!r} -> {cb.targets[j]!r}")
                cb.remove(j)
        return removed

    def same_target_value(self, d: torch.Tensor, same: torch.Tensor) -> nn.Module | None:
        """The nearest same-target entry (``same`` (N,)) whose ball holds k (at ``d`` (N,)): the
        new value starts from its value, so that the earlier edit is not forgotten."""
        holds = same & (d <= self.codebook.radii)  # (N,)
        if not holds.any():
            return None
        return self.codebook.values[int(torch.where(holds, d, math.inf).argmin())]  # the nearest

    def shrink_overlaps(self, d: torch.Tensor, other: torch.Tensor, eps: float) -> float:
        """Balls with other targets (``other`` (N,)) must not hold each other's keys: where they
        do, both radii shrink to just inside d(k, k_j). Returns the new ball's radius."""
        cb = self.codebook
        overlap = other & ((d <= cb.radii) | (d <= eps))  # (N,) either holds the other's key
        for j in overlap.nonzero()[:, 0].tolist():
            inside = float(d[j]) * (1 - 1e-3)  # a margin far above float round-off
            cb.radii[j] = min(float(cb.radii[j]), inside)
            eps = min(eps, inside)
        return eps

    def train(self, batch, tail, init: nn.Module | None) -> tuple[nn.Module, list[float]]:
        """Eq. 2: a new value, from l (or ``init``), trained on the edit's row (its tail)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)  # LoRA's A
        value = new_value(self.layer, cfg.value_form, cfg.rank)
        if init is not None:
            value.load_state_dict(init.state_dict())
        losses = train_value(self.backbone, self.layer_path, value, batch, cfg.steps, cfg.lr, tail)
        return value, losses

    def attached(self) -> Router:
        """``with editor.attached(): ...`` runs the edited model (Eq. 1)."""
        return Router(self.backbone, self.layer_path, self.codebook, self.config.pool)

    def remove(self, j: int) -> None:
        """Undo edit j alone: its entry goes, the later ones shift down one."""
        self.codebook.remove(j)

    def save(self, path) -> None:
        """Write ``path/codebook.safetensors`` (keys, radii, values) and ``path/codebook.json``."""
        meta = {**HEADER, "config": asdict(self.config), "layer": self.layer_path}
        meta["targets"] = self.codebook.targets
        meta["asked"] = [None if a is None else asdict(a) for a in self.codebook.asked]
        checkpoint.save(path, "codebook", self.codebook.state_dict(), meta)

    @classmethod
    def load(cls, path, backbone: nn.Module) -> "BalancEditor":
        """Read what ``save`` wrote; a bad file is one ValueError naming the file and the fault."""
        fields = {"config", "layer", "targets", "asked"}
        meta, state = checkpoint.load(path, "codebook", HEADER, fields)
        try:  # a bad field or entry: the message says which
            editor = cls(backbone, BalancEditConfig(**meta["config"]))
            if meta["layer"] != editor.layer_path:
                raise ValueError(f"saved for layer {meta['layer']!r}, not {editor.layer_path!r}")
            keys = state["keys"]  # (N, D)
            D = editor.layer.in_features
            if keys.shape != (len(meta["targets"]), D) or len(meta["asked"]) != len(keys):
                raise ValueError(f"keys {tuple(keys.shape)}; this layer takes {D} inputs")
            for j, target in enumerate(meta["targets"]):
                value = new_value(editor.layer, editor.config.value_form, editor.config.rank)
                prefix = f"values.{j}."
                weights = {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}
                value.load_state_dict(weights)
                asked = None if meta["asked"][j] is None else Asked(**meta["asked"][j])
                editor.codebook.add(keys[j], value, float(state["radii"][j]), target, asked)
        except (TypeError, KeyError, IndexError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot load a codebook: {e}") from e
        return editor
