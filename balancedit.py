"""BalancEdit: the method, in one file.

Guo, Hu, Guan, Hartvigsen, Li, "BalancEdit: Dynamically Balancing the
Generality-Locality Trade-off in Multi-modal Model Editing", ICML 2025.

BalancEdit leaves the model's weights alone. It keeps a *codebook* at one target
layer :math:`l`: each edit adds an entry (key :math:`k`, value :math:`v_k`,
radius :math:`\\epsilon_k`). A forward hook on :math:`l` routes every sample of a
batch (paper Sec. 4, Eq. 1):

.. math::

    f^l(h^{l-1}) = \\begin{cases} v_j(h^{l-1}) & \\text{if } d(q, k_j) \\le \\epsilon_j,
                    \\; j = \\arg\\min_k d(q, k) \\\\
                    l(h^{l-1}) & \\text{otherwise (bit for bit)} \\end{cases}

where the query :math:`q` is the mean of :math:`h^{l-1}` over the sample's prompt
positions. The radius of each entry comes from one positive (same image,
rephrased question) and one negative (black image, same question) key
(Sec. 4, Eq. 3; see :func:`radius` for the sign convention we follow), and the
value is trained on the edit target (Eq. 2, the editor at the end of the file).

Where to find things:

- :func:`distance`       ``d(q, k)``: cosine (``1 - cos``, default) or Euclidean (Table 6)
- :func:`radius`         **Eq. 3**, ``eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)``
- :class:`Codebook`      keys, radii, values, targets; ``lookup`` = the ``argmin`` and the test of Eq. 1
- :func:`full_value`, :class:`LoRAValue`, :func:`make_value`: the values ``v_k``
- :class:`VectorValue`   GRACE's value (a vector that replaces the layer output)
- :func:`attach`         **Eq. 1**, the routing forward hook (``RouteHandle._route``)
- :func:`queries`        the key / query of a sample: mean of ``h^{l-1}`` over its prompt positions
- :func:`override`       ``f_new``: the layer's output replaced by one value for every row (Eq. 2 training)
- ``# ---- Editor (Eq. 2) ----``:
  :class:`BalancEditConfig` (every knob, with defaults), :meth:`_Method._train` (**Eq. 2**,
  optionally on cached activations), :meth:`BalancEditor.edit` (positive, negative, Eq. 3,
  the many-edit rules), ``save``/``load``, and the :class:`FineTune` and :class:`Grace` baselines

Shapes: ``B`` batch, ``T`` positions, ``D`` the layer's input width, ``N``
codebook entries.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ANCHOR_KINDS, anchor_image
from models import lm_loss

DISTANCES = ("cos", "euc")
KEYS = ("mean", "last")
SPANS = ("row", "key")
VALUE_KINDS = ("full", "lora")


# ----------------------------------------------------------------------------
# Distances and the radius (Eq. 3)


def distance(queries: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """``d(q, k)`` for every query and key, in float32.

    queries: (B, D); keys: (N, D) -> (B, N).
    ``"cos"``: ``1 - cos(q, k)`` (the authors' default), in [0, 2]; a zero
    vector counts as orthogonal to everything (distance 1, even to itself);
    ``"euc"``: ``||q - k||_2`` (paper Table 6).
    """
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; allowed: {', '.join(DISTANCES)}")
    q = queries.float()  # (B, D)
    k = keys.float()  # (N, D)
    if kind == "cos":
        return _cosine(q, _unit(k))  # (B, N)
    # The exact (non-matmul) path: d(k, k) is 0, and the golden tests are exact.
    return torch.cdist(q, k, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-8)  # (., D) unit rows


def _cosine(q: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    """``1 - cos``: queries (B, D), unit keys (N, D) -> (B, N)."""
    return (1.0 - _unit(q) @ k_hat.T).clamp(min=0.0)


def radius(d_pos, d_neg, alpha):
    """Eq. 3, the radius of an entry: ``eps = alpha * d(Pos, k) + (1 - alpha) * d(Neg, k)``.

    ``d_pos`` is the distance from the key to the positive (same image, a
    training rephrasing of the question), ``d_neg`` the distance to the
    negative (a black image, same question). Floats or tensors (broadcast).

    Sign convention. The paper's main text writes
    ``eps = (1 - alpha) d(Pos, k) + alpha d(Neg, k)``, but its Appendix D
    (Eq. 10), the authors' released code
    (``epsilons = (1-alpha)*locality_dists + alpha*rephrase_dists`` with
    alpha = 0.05 to 0.35) and the paper's own alpha ablation (as alpha grows,
    I-Gen falls and Loc rises, i.e. the radius shrinks towards the positive)
    all use the weighting implemented here. So alpha = 0 gives ``d_neg``
    (the widest ball that still excludes the negative) and alpha = 1 gives
    ``d_pos`` (the smallest ball that still covers the positive).

    Floating point. We compute the same quantity as
    ``d_neg + alpha * (d_pos - d_neg)`` clamped to ``[min, max]`` of the two
    distances, with ``alpha == 1`` returning ``d_pos`` itself. Unlike the
    two-product form ``alpha*d_pos + (1-alpha)*d_neg``, this is guaranteed to
    (a) lie between the two distances, (b) be monotone in alpha, and (c) give
    both endpoints exactly (alpha = 0 -> ``d_neg``, alpha = 1 -> ``d_pos``).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 1.0:
        return d_pos
    # Eq. 3: eps = alpha * d_pos + (1 - alpha) * d_neg
    eps = d_neg + alpha * (d_pos - d_neg)
    if isinstance(eps, torch.Tensor):
        lo = torch.minimum(torch.as_tensor(d_pos), torch.as_tensor(d_neg))
        hi = torch.maximum(torch.as_tensor(d_pos), torch.as_tensor(d_neg))
        return torch.minimum(torch.maximum(eps, lo), hi)
    return min(max(eps, min(d_pos, d_neg)), max(d_pos, d_neg))


# ----------------------------------------------------------------------------
# The codebook: keys k (N, D), radii eps (N,), values v_k, targets y^n


class Codebook(nn.Module):
    """The entries of BalancEdit at one layer: ``(k_j, eps_j, v_j, y^n_j)``.

    State:

    - ``keys``   buffer (N, D) float32; empty (0, 0) until the first ``add`` fixes D;
    - ``radii``  buffer (N,) float32, every entry finite and >= 0;
    - ``values`` ``nn.ModuleList`` of N modules (the ``v_j``);
    - ``targets`` ``list[str]`` of N edit targets, stored in the state dict as
      ``_extra_state`` (see ``get_extra_state``).

    All mutation goes through :meth:`add`, :meth:`remove` and
    :meth:`set_radius`, so the four stay the same length.

    Loading: ``state_dict()`` holds ``keys``, ``radii``, ``values.{j}.*`` and
    ``_extra_state`` (targets and the distance kind). To load it into a fresh
    ``Codebook``, first ``add`` N placeholder entries whose values have the
    saved structure (e.g. ``make_value(layer, kind)``, key ``torch.zeros(D)``,
    radius 0, target ``""``), then ``load_state_dict``.
    """

    def __init__(self, distance: str = "cos"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; allowed: {', '.join(DISTANCES)}")
        self.distance = distance  # the kind of d(q, k), "cos" or "euc"
        self.register_buffer("keys", torch.zeros(0, 0))  # (N, D)
        self.register_buffer("radii", torch.zeros(0))  # (N,)
        self.values = nn.ModuleList()  # N modules v_j
        self.targets: list[str] = []  # N strings y^n_j

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int | None:
        """D, fixed by the first ``add`` (None before)."""
        return self.keys.shape[1] if self.keys.shape[1] > 0 else None

    def add(self, key: torch.Tensor, value: nn.Module, radius: float, target: str) -> int:
        """Append an entry; returns its index."""
        key = torch.as_tensor(key).detach()
        if key.dim() != 1 or key.shape[0] == 0:
            raise ValueError(f"key must have shape (D,), got {tuple(key.shape)}")
        if self.dim is not None and key.shape[0] != self.dim:
            raise ValueError(f"key has D={key.shape[0]} but the codebook's keys have D={self.dim}")
        if not isinstance(value, nn.Module):
            raise TypeError(f"value must be an nn.Module, got {type(value).__name__}")
        r = _check_radius(radius)
        key = key.to(self.keys.device, torch.float32)  # (D,)
        keys = self.keys if self.dim is not None else self.keys.new_zeros(0, key.shape[0])
        self.keys = torch.cat([keys, key[None]], dim=0)  # (N+1, D)
        self.radii = torch.cat([self.radii, self.radii.new_tensor([r])])  # (N+1,)
        self.values.append(value)
        self.targets.append(str(target))
        return len(self) - 1

    def remove(self, i: int) -> None:
        """Delete entry ``i`` (0 <= i < N); later entries shift down by one."""
        i = self._check_index(i)
        keep = torch.arange(len(self), device=self.keys.device) != i  # (N,)
        self.keys = self.keys[keep]  # (N-1, D)
        self.radii = self.radii[keep]  # (N-1,)
        del self.values[i]
        del self.targets[i]

    def set_radius(self, i: int, r: float) -> None:
        i = self._check_index(i)
        self.radii[i] = _check_radius(r)

    @torch.no_grad()
    def lookup(self, queries: torch.Tensor):
        """The routing decision of Eq. 1 for each query.

        queries: (B, D) -> ``index`` (B,) long, ``dist`` (B,) float32,
        ``hit`` (B,) bool, on the queries' device:
        ``j = argmin_k d(q, k)``, ``dist = d(q, k_j)``, ``hit = dist <= eps_j``.
        An empty codebook: index -1, dist +inf, hit False.
        """
        if queries.dim() != 2:
            raise ValueError(f"queries must have shape (B, D), got {tuple(queries.shape)}")
        B = queries.shape[0]
        assert len(self.values) == len(self.targets) == len(self) == self.radii.shape[0]
        if len(self) == 0:
            return (
                torch.full((B,), -1, dtype=torch.long, device=queries.device),
                torch.full((B,), math.inf, device=queries.device),
                torch.zeros(B, dtype=torch.bool, device=queries.device),
            )
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have D={queries.shape[1]} but the keys have D={self.dim}")
        q = queries.to(self.keys.device, torch.float32)  # (B, D)
        if self.distance == "cos":  # the same numbers as distance(), with the unit keys cached
            d = _cosine(q, self._unit_keys())  # (B, N)
        else:
            d = distance(q, self.keys, self.distance)  # (B, N)
        dist, index = d.min(dim=1)  # (B,), (B,)  j = argmin_k d(q, k)
        hit = dist <= self.radii[index]  # (B,)  Eq. 1: d(q, k_j) <= eps_j
        dev = queries.device
        return index.to(dev), dist.to(dev), hit.to(dev)

    def _unit_keys(self) -> torch.Tensor:
        """The keys normalised to unit length (N, D), recomputed only when the keys change
        (a new tensor on add/remove/.to, or an in-place write such as load_state_dict)."""
        # Holding the source tensor keeps its identity unique (a freed tensor's address can be
        # reused); _version counts its in-place writes.
        src, version = getattr(self, "_unit_source", (None, None))
        if src is not self.keys or version != self.keys._version:
            self._unit_cache = _unit(self.keys)
            self._unit_source = (self.keys, self.keys._version)
        return self._unit_cache

    def get_extra_state(self):
        return {"targets": list(self.targets), "distance": self.distance}

    def set_extra_state(self, state) -> None:
        targets = list(state["targets"])
        if len(targets) != len(self.values):
            raise ValueError(f"{len(targets)} saved targets but {len(self.values)} values")
        if state["distance"] not in DISTANCES:
            raise ValueError(f"unknown distance {state['distance']!r}; allowed: {', '.join(DISTANCES)}")
        self.targets = targets
        self.distance = state["distance"]

    def _check_index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self):
            raise IndexError(f"codebook index {i!r} out of range for {len(self)} entries")
        return i

    def extra_repr(self) -> str:
        return f"N={len(self)}, D={self.dim}, distance={self.distance!r}"


def _check_radius(r) -> float:
    r = float(r)
    if not (math.isfinite(r) and r >= 0.0):
        raise ValueError(f"radius must be finite and >= 0, got {r}")
    return r


# ----------------------------------------------------------------------------
# Values v_k


def _strip_hooks(module: nn.Module) -> nn.Module:
    """Drop forward hooks that ``deepcopy`` carried over (e.g. our routing hook)."""
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        m._forward_hooks_always_called.clear()
        m._forward_pre_hooks.clear()
        m._forward_pre_hooks_with_kwargs.clear()
    return module


HALF = (torch.float16, torch.bfloat16)


class Float32(nn.Module):
    """A half-precision layer's value kept in float32: Adam on fp16 weights loses small
    updates and its eps (1e-8) underflows to 0. Computes in float32, returns the input dtype."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def full_value(layer: nn.Module) -> nn.Module:
    """``v_k``: a trainable copy of layer ``l`` (the paper's default). The layer is untouched.
    A half-precision layer's copy trains in float32 (see :class:`Float32`)."""
    value = _strip_hooks(copy.deepcopy(layer))
    value.requires_grad_(True)
    if any(p.dtype in HALF for p in value.parameters()):
        value = Float32(value)
    return value


class LoRAValue(nn.Module):
    """``v_k(x) = W x + b + B (A x)``: layer ``l`` plus a low-rank update.

    ``A`` (r, in) is random (kaiming, as ``nn.Linear``), ``B`` (out, r) is zero,
    so a fresh value computes what the layer computes. The base layer is
    referenced, not registered: the state dict holds only ``A`` and ``B``, and
    its weights are used detached (no gradient reaches the model).
    """

    def __init__(self, layer: nn.Linear, rank: int = 8):
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LoRA values need an nn.Linear layer, got {type(layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        object.__setattr__(self, "base", layer)  # not a submodule
        w = layer.weight  # A and B are float32 whatever the layer's dtype (see Float32)
        self.A = nn.Parameter(torch.empty(rank, layer.in_features, dtype=torch.float32, device=w.device))
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.base.weight.detach()  # (out, in)
        b = None if self.base.bias is None else self.base.bias.detach()  # (out,)
        update = F.linear(F.linear(x.float(), self.A), self.B)  # (..., out) B A x, in float32
        return F.linear(x, W, b) + update.to(x.dtype)  # (..., out)


def make_value(layer: nn.Module, kind: str = "full", rank: int = 8) -> nn.Module:
    """A fresh value for ``layer``: ``"full"`` (a trainable copy) or ``"lora"`` (rank ``rank``)."""
    if kind == "full":
        return full_value(layer)
    if kind == "lora":
        return LoRAValue(layer, rank)
    raise ValueError(f"unknown value kind {kind!r}; allowed: full, lora")


class VectorValue(nn.Module):
    """GRACE's value: a learned vector ``v`` (out_dim,) that replaces the layer output."""

    def __init__(self, out_dim: int, init: torch.Tensor | None = None):
        super().__init__()
        v = torch.zeros(out_dim) if init is None else torch.as_tensor(init).detach().float().clone()
        if v.shape != (out_dim,):
            raise ValueError(f"init must have shape ({out_dim},), got {tuple(v.shape)}")
        self.v = nn.Parameter(v)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.v.to(h.dtype).expand(*h.shape[:-1], self.v.shape[0])  # (..., out_dim)


# ----------------------------------------------------------------------------
# Routing, Eq. 1: a forward hook on layer l


@torch.no_grad()
def queries(h: torch.Tensor, prompt: torch.Tensor, key: str = "mean") -> torch.Tensor:
    """The query (or key) of each sample from the layer input ``h^{l-1}``.

    h: (B, T, D); prompt: (B, T) bool, the prompt positions (image + question).
    ``"mean"``: the mean of ``h`` over the prompt positions (padding and answer never
    count); ``"last"`` (GRACE): ``h`` at the last prompt position. -> (B, D) float32;
    rows with no prompt position are NaN.
    """
    B, T = prompt.shape
    hf = h.detach().float()  # (B, T, D)
    n_prompt = prompt.sum(dim=1)  # (B,)
    if key == "mean":
        s = torch.where(prompt[..., None], hf, 0.0).sum(dim=1)  # (B, D)
        q = s / n_prompt.clamp(min=1)[:, None].float()  # (B, D)
    elif key == "last":
        last = torch.where(prompt, torch.arange(T, device=h.device), -1).amax(dim=1)  # (B,)
        q = hf[torch.arange(B, device=h.device), last.clamp(min=0)]  # (B, D)
    else:
        raise ValueError(f"unknown key {key!r}; allowed: {', '.join(KEYS)}")
    return torch.where((n_prompt > 0)[:, None], q, math.nan)  # (B, D)


class RouteHandle:
    """The hooks that :func:`attach` registers, and the state they share.

    ``remove()`` (idempotent) or ``with attach(...) as h:`` takes them off.
    For inspection, after each call of the layer:

    - ``last_index`` (B,) long: the entry used by each sample, -1 = miss;
    - ``last_dist``  (B,) float32: ``d(q, k_j)`` to the nearest key (inf = none / held);
    - ``last_query`` (B, D) float32: the query ``q`` (NaN rows: no prompt position).

    All three are None after a call on an empty codebook (the fast path).
    """

    def __init__(self, model: nn.Module, layer_path: str, codebook: Codebook, key: str, span: str, mask_kwarg: str):
        if key not in KEYS:
            raise ValueError(f"unknown key {key!r}; allowed: {', '.join(KEYS)}")
        if span not in SPANS:
            raise ValueError(f"unknown span {span!r}; allowed: {', '.join(SPANS)}")
        self.codebook, self.key, self.span, self.mask_kwarg = codebook, key, span, mask_kwarg
        self.last_index = self.last_dist = self.last_query = None
        self._mask = None  # (B, T) prompt mask of the model call in progress
        self._held = None  # (B,) long: the route held for KV-cache decoding
        layer = model.get_submodule(layer_path)
        self._handles = [
            layer.register_forward_hook(self._route),
            model.register_forward_pre_hook(self._read_mask, with_kwargs=True),
            model.register_forward_hook(self._clear_mask, always_call=True),
        ]

    def _read_mask(self, module, args, kwargs):
        self._mask = kwargs.get(self.mask_kwarg)

    def _clear_mask(self, module, args, output):
        self._mask = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._mask = self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _route(self, layer, args, out):
        cb = self.codebook
        if len(cb) == 0:  # empty codebook: nothing to do
            self.last_index = self.last_dist = self.last_query = self._held = None
            return None
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            raise TypeError("routing needs a layer called with a tensor input and returning a tensor")
        h = args[0]

        # Layout: restore (B, T, .) from what the layer saw.
        mask = self._mask
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"{self.mask_kwarg} must have shape (B, T), got {tuple(mask.shape)}")
            B, T = mask.shape
            if h.numel() != B * T * h.shape[-1] or out.numel() != B * T * out.shape[-1]:
                raise ValueError(
                    f"layer input {tuple(h.shape)} / output {tuple(out.shape)} do not match "
                    f"the {self.mask_kwarg} layout (B, T) = {(B, T)}"
                )
            prompt = mask.to(device=h.device, dtype=torch.bool)  # (B, T)
        elif h.dim() == 3:  # (B, T, D): every position counts
            B, T = h.shape[:2]
            prompt = torch.ones(B, T, dtype=torch.bool, device=h.device)  # (B, T)
        elif h.dim() == 2:  # (B, D): each row is its own sample with one position
            B, T = h.shape[0], 1
            prompt = torch.ones(B, 1, dtype=torch.bool, device=h.device)  # (B, 1)
        else:
            raise ValueError(f"cannot route a layer input of shape {tuple(h.shape)} without a prompt mask")
        h3 = h.reshape(B, T, h.shape[-1])  # (B, T, D)
        n_prompt = prompt.sum(dim=1)  # (B,)
        has_prompt = n_prompt > 0  # (B,)
        pos = torch.arange(T, device=h.device)  # (T,)
        last = torch.where(prompt, pos, -1).amax(dim=1)  # (B,)  last prompt position, -1 if none

        q = queries(h3, prompt, self.key)  # (B, D) the query of each sample

        # Eq. 1: j = argmin_k d(q, k); route where d(q, k_j) <= eps_j.
        index = torch.full((B,), -1, dtype=torch.long, device=h.device)  # (B,)
        dist = torch.full((B,), math.inf, device=h.device)  # (B,)
        if has_prompt.any():
            j, d, hit = cb.lookup(q[has_prompt])
            index[has_prompt] = torch.where(hit, j, -1)
            dist[has_prompt] = d

        # KV-cache decoding: a row with no prompt position keeps its prefill route.
        if mask is None:
            self._held = None
        else:
            if self._held is None or self._held.shape[0] != B:
                self._held = torch.full((B,), -1, dtype=torch.long, device=h.device)
            held = self._held.to(h.device)
            held = torch.where(held < len(cb), held, -1)  # entries removed since: miss
            index = torch.where(has_prompt, index, held)
            self._held = torch.where(has_prompt, index, held)
        self.last_index, self.last_dist, self.last_query = index, dist, q

        if not (index >= 0).any():
            return None  # no row hits: the layer's output object, untouched

        # Hit rows: v_j(h^{l-1}); miss rows: the original output, bit for bit.
        new = out.clone(memory_format=torch.contiguous_format)
        new3 = new.view(B, T, out.shape[-1])  # (B, T, D_out), a view of new
        if self.span == "row":
            write = torch.ones(B, T, dtype=torch.bool, device=h.device)  # (B, T)
        else:  # "key" (GRACE): the key position (the last prompt position) only
            write = pos[None, :] == last[:, None]  # (B, T); all False on decoding steps
        for j in index[index >= 0].unique().tolist():
            rows = (index == j).nonzero(as_tuple=True)[0]  # (n,)
            v_out = cb.values[j](h3[rows])  # (n, T, D_out)
            if v_out.shape != (rows.shape[0], T, out.shape[-1]):
                raise ValueError(f"value {j} returned {tuple(v_out.shape)}, expected {(rows.shape[0], T, out.shape[-1])}")
            new3[rows] = torch.where(write[rows][..., None], v_out.to(out.dtype), new3[rows])
        return new


def attach(
    model: nn.Module,
    layer_path: str,
    codebook: Codebook,
    key: str = "mean",
    span: str = "row",
    mask_kwarg: str = "prompt_mask",
) -> RouteHandle:
    """Route layer ``layer_path`` of ``model`` through ``codebook`` (Eq. 1).

    For each sample: ``j = argmin_k d(q, k_j)``; if ``d(q, k_j) <= eps_j`` its
    output becomes ``v_j(h^{l-1})``, otherwise it is the layer's output, bit for
    bit. The model's weights are never touched; ``handle.remove()`` undoes it.

    The query ``q`` (``key="mean"``) is the mean of the layer input over the
    sample's *prompt* positions: image and question tokens, not the answer.
    (The authors' code averages over every position, including the
    teacher-forced answer; averaging over the prompt lets free generation see
    the same key.) ``key="last"`` (GRACE) takes the input at the last prompt
    position. Padding never counts, so a sample's key is the same alone or in
    a padded batch, up to the order of float summation.

    Layout. ``model`` is called with keyword ``mask_kwarg`` = a (B, T)
    bool/int prompt mask (read by a pre-hook on ``model``; a mask passed
    positionally is not seen). With it, the layer's input and output are
    reshaped to (B, T, .), which undoes the (B*T, D) flattening of Hugging
    Face's OPT decoder layer before ``fc1``/``fc2``. Without it, a 3-D input
    (B, T, D) counts every position and a 2-D input (B, D) is B samples of one
    position each.

    ``span="row"`` replaces every position of a hit sample; ``span="key"``
    (GRACE) only the key position, the last prompt position: the first answer
    token is predicted from the value, and the following tokens (teacher-forced
    or generated) from the unedited layer, as GRACE does for autoregressive
    models (each generated token is its own query, and far from the key).

    KV-cache decoding: a row whose mask has no prompt position (the decoding
    steps after prefill) keeps the route decided at the last call where it had
    one; none held, or a different batch size, is a miss. Without a mask
    nothing is held: every call routes on its own input.
    """
    return RouteHandle(model, layer_path, codebook, key, span, mask_kwarg)


class OverrideHandle:
    """The hook of :func:`override`; ``remove()`` (idempotent) or a ``with`` block."""

    def __init__(self, model: nn.Module, layer_path: str, value: nn.Module):
        self.value = value
        self._handle = model.get_submodule(layer_path).register_forward_hook(self._replace)

    def _replace(self, layer, args, out):
        return self.value(args[0]).to(out.dtype)  # f_new: v(h^{l-1}) for every row

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def override(model: nn.Module, layer_path: str, value: nn.Module) -> OverrideHandle:
    """``f_new``: the model with layer ``layer_path``'s output replaced by ``value(input)``
    for all rows. Gradients flow into ``value``; the model's weights are untouched."""
    return OverrideHandle(model, layer_path, value)


# ---- Editor (Eq. 2) ----


@dataclass
class BalancEditConfig:
    """Every knob of BalancEdit, with the defaults used on TinyVLM. Unknown values raise."""

    layer: Optional[str] = None  # dotted path of layer l; None: the backbone's target_layer (last decoder fc2)
    alpha: float = 0.7          # Eq. 3: weight of d(Pos, k); 0 -> eps = d(Neg, k), 1 -> eps = d(Pos, k)
    distance: str = "cos"       # d(q, k): "cos" (1 - cos, the authors' default) or "euc" (paper Table 6)
    steps: int = 100            # Eq. 2: Adam steps on the value (authors: 50 on BLIP-2 OPT)
    lr: float = 1e-2            # Eq. 2: Adam learning rate (authors: 1e-4 on BLIP-2 OPT; TinyVLM needs more)
    negative: str = "black"     # the negative's anchor image (paper Table 7): "black", "white" or "noise"
    value: str = "full"         # v_k: "full" trainable copy of layer l (paper default) or "lora" (W + B A)
    rank: int = 8               # rank of B A when value == "lora"
    grace_eps0: float = 1.0     # GRACE baseline only: its fixed initial radius, Euclidean (GRACE's code: 1.0)
    grace_lr: float = 1.0       # GRACE baseline only: Adam lr of its value vectors (GRACE's code: 1.0)
    cache: bool = True          # Eq. 2 on cached activations (same result; the backbone must supply a tail)
    seed: int = 0               # seeds value initialisation (LoRA's A) and the noise anchor

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.negative not in ANCHOR_KINDS:
            raise ValueError(f"negative must be one of {ANCHOR_KINDS}, got {self.negative!r}")
        if self.value not in VALUE_KINDS:
            raise ValueError(f"value must be one of {VALUE_KINDS}, got {self.value!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        for name in ("steps", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "grace_eps0", "grace_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "BalancEditConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown BalancEditConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class EditReport:
    """What one edit did (returned by every method's ``edit``)."""

    index: int                  # codebook entry of this edit (FT: the number of edits so far - 1)
    action: str                 # "new", "overlap", "conflict" (BalancEdit); "expand", "split" (GRACE); "tune" (FT)
    d_pos: float                # d(Pos, k) (nan where the method has none)
    d_neg: float                # d(Neg, k)
    radius: float               # eps of the entry (Eq. 3 for BalancEdit; GRACE's radius)
    losses: list[float] = field(default_factory=list)  # Eq. 2 loss at each step
    seconds: float = 0.0        # wall time of the whole edit


class _Method:
    """What BalancEdit, FT and GRACE share: the layer, keys, and the Eq. 2 training loop."""

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        self.backbone, self.config = backbone, config
        self.layer_path = config.layer or backbone.target_layer
        self.layer = backbone.get_submodule(self.layer_path)  # layer l (never eval)
        self.device = next(self.layer.parameters()).device  # the codebook lives beside the layer

    def _batch(self, images, questions, answers=None) -> dict:
        return self.backbone.to_device(self.backbone.encode(list(images), list(questions), answers))

    @torch.no_grad()
    def keys(self, images, questions, key: str = "mean") -> torch.Tensor:
        """The key of each (image, question) at layer l: (B, D), exactly as the routing hook sees it."""
        batch = self._batch(images, questions)
        h, _ = self._layer_io(batch)
        mask = batch["prompt_mask"].bool()
        B, T = mask.shape
        return queries(h.reshape(B, T, -1), mask, key)  # (B, D)

    @torch.no_grad()
    def _layer_io(self, batch: dict):
        """Layer l's input h^{l-1} and output on ``batch`` (as the layer saw them)."""
        seen = []

        def record(module, args, out):
            seen.append((args[0], out))  # returns None: the output is unchanged

        handle = self.layer.register_forward_hook(record)
        try:
            self.backbone(**batch)
        finally:
            handle.remove()
        return seen[0]

    def _train(self, value: nn.Module, batch: dict, lr: Optional[float] = None) -> list[float]:
        """Eq. 2: v* = argmin_v L(f_new(i, t), y^n), Adam on the value's parameters only.

        The loss is the language-model cross-entropy on the target tokens (labels are -100
        elsewhere). With ``config.cache`` and a backbone that supplies ``tail``, the model
        runs once and the steps run through the layers after l only: the layers below l are
        frozen, so their outputs (the cached h^{l-1}) do not change during training.
        """
        torch.manual_seed(self.config.seed)
        params = [p for p in value.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr or self.config.lr, fused=True)
        cached = self.backbone.tail(batch, self.layer_path) if self.config.cache else None
        losses = []
        for _ in range(self.config.steps):
            if cached is not None:
                h, tail = cached  # h^{l-1} as layer l saw it; tail: layer output -> logits
                loss = lm_loss(tail(value(h)), batch["labels"])
            else:
                with override(self.backbone, self.layer_path, value):  # f_new
                    loss = self.backbone(**batch).loss
            # Gradients for the value only: the model's weights get none (and are never stepped).
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            losses.append(loss.item())
        return losses


class _CodebookMethod(_Method):
    """A method whose edits are codebook entries routed by :func:`attach` (BalancEdit, GRACE)."""

    codebook: Codebook
    key, span = "mean", "row"  # how attach() routes: see attach

    def __len__(self) -> int:
        return len(self.codebook)

    def attached(self) -> RouteHandle:
        """``with method.attached(): backbone(...)``: the model routed through the codebook (Eq. 1)."""
        return attach(self.backbone, self.layer_path, self.codebook, key=self.key, span=self.span)

    def remove(self, i: int) -> None:
        self.codebook.remove(i)

    def reset(self) -> None:
        while len(self.codebook):
            self.codebook.remove(len(self.codebook) - 1)


class BalancEditor(_CodebookMethod):
    """BalancEdit (paper Sec. 4): one codebook entry per edit at layer l.

    ``edit(record)``: key k, positive and negative keys, radius (Eq. 3), the many-edit
    rules, a trained value (Eq. 2), a new entry. ``attached()``: the edited model (Eq. 1).
    """

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        super().__init__(backbone, config)
        self.codebook = Codebook(config.distance).to(self.device)

    def _positive_question(self, record) -> str:
        """R(t): a training rephrasing (never one that scores T-Gen), else the backbone's own."""
        if record.train_rephrases:
            return record.train_rephrases[0]
        rephrased = [q for q in self.backbone.rephrase(record.question) if q not in record.rephrases]
        if not rephrased:
            raise ValueError(f"record {record.id}: no training rephrasing and the backbone offers none")
        return rephrased[0]

    def edit(self, record) -> EditReport:
        start = time.perf_counter()
        cfg, cb = self.config, self.codebook
        negative = anchor_image(cfg.negative, record.image.size, seed=cfg.seed)
        # One forward for the three keys: k = (i, t), Pos = (i, R(t)), Neg = (anchor, t).
        k, pos, neg = self.keys([record.image, record.image, negative],
                                [record.question, self._positive_question(record), record.question])
        d_pos = distance(pos[None], k[None], cfg.distance).item()
        d_neg = distance(neg[None], k[None], cfg.distance).item()
        eps = float(radius(d_pos, d_neg, cfg.alpha))  # Eq. 3: eps = alpha*d_pos + (1-alpha)*d_neg

        # Many edits (paper "How to continually edit").
        action, init = "new", None
        if len(cb):
            d = distance(k[None], cb.keys, cfg.distance)[0]  # (N,) d(k, k_j)
            differ = torch.tensor([t != record.target for t in cb.targets], device=d.device)  # (N,)
            # A conflict: k lies in entry j's ball with a different target, and k_j is as close
            # to k as a rephrasing of the question is (d <= d(Pos, k)): the same question, asked
            # again with a new answer. The new edit replaces the old entry.
            conflict = differ & (d <= cb.radii) & (d <= d_pos)
            for j in sorted(conflict.nonzero().flatten().tolist(), reverse=True):
                cb.remove(j)
                action = "conflict"
            if len(cb):
                d = distance(k[None], cb.keys, cfg.distance)[0]  # (N,)
                differ = torch.tensor([t != record.target for t in cb.targets], device=d.device)
                # Same target and k inside the ball: start from that value (no forgetting).
                same = ~differ & (d <= cb.radii)
                if same.any() and action == "new":
                    j = int(torch.where(same, d, math.inf).argmin())
                    init, action = cb.values[j], "overlap"
                # Different targets must not swallow each other's keys: where a ball holds the
                # other's key, it shrinks to just inside that key (only these entries change).
                # No more is needed: Eq. 1 routes a query to its nearest key first.
                for j in (differ & ((d <= cb.radii) | (d <= eps))).nonzero().flatten().tolist():
                    inside = _just_below(float(d[j]))
                    cb.set_radius(j, min(float(cb.radii[j]), inside))
                    eps = min(eps, inside)

        value = _strip_hooks(copy.deepcopy(init)) if init is not None else self._new_value()
        losses = self._train(value, self._batch([record.image], [record.question], [record.target]))
        index = cb.add(k, value, eps, record.target)
        return EditReport(index, action, d_pos, d_neg, eps, losses, time.perf_counter() - start)

    def _new_value(self) -> nn.Module:
        torch.manual_seed(self.config.seed)
        return make_value(self.layer, self.config.value, self.config.rank)

    # -- save / load: safetensors + json, no pickle -------------------------
    def save(self, path) -> None:
        """Write ``path/codebook.safetensors`` (keys, radii, values) and ``path/codebook.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.codebook.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        save_file(tensors, str(path / "codebook.safetensors"))
        meta = {"format": "balancedit-codebook", "version": 1, "config": asdict(self.config),
                "layer": self.layer_path, "layer_shapes": _shapes(self.layer),
                "targets": list(self.codebook.targets)}
        (path / "codebook.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path, backbone: nn.Module) -> "BalancEditor":
        """Read what ``save`` wrote; refuses a codebook made for another layer or shape."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, tensor_file = path / "codebook.json", path / "codebook.safetensors"
        for f in (meta_file, tensor_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: no such file (expected a directory written by BalancEditor.save)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != "balancedit-codebook":
            raise ValueError(f"{meta_file}: not a BalancEdit codebook")
        editor = cls(backbone, BalancEditConfig.from_dict(meta["config"]))
        if editor.layer_path != meta["layer"]:
            raise ValueError(f"{meta_file}: saved for layer {meta['layer']!r}, not {editor.layer_path!r}")
        if _shapes(editor.layer) != meta["layer_shapes"]:
            raise ValueError(f"{meta_file}: layer {meta['layer']!r} has shapes {_shapes(editor.layer)}, "
                             f"the codebook was saved for {meta['layer_shapes']}")
        state = load_file(str(tensor_file))
        keys = state["keys"]
        for target in meta["targets"]:  # placeholders of the saved structure, then the saved state
            editor.codebook.add(torch.zeros(keys.shape[1]), editor._new_value(), 0.0, target)
        state["_extra_state"] = {"targets": meta["targets"], "distance": editor.config.distance}
        editor.codebook.load_state_dict(state, strict=True)  # copies into the layer's device
        return editor


def _just_below(d: float) -> float:
    """A radius just inside distance d: 0.1% below it, a margin far above float round-off
    (distances recomputed in other batch shapes differ by ~1e-7), far below key spacing."""
    return d * (1.0 - 1e-3)


def _shapes(module: nn.Module) -> dict:
    return {name: list(p.shape) for name, p in module.state_dict().items()}


class FineTune(_Method):
    """FT baseline: fine-tune (a copy of) layer l in place, same loss, steps and lr; no routing,
    so every input sees the edit. ``remove`` cannot undo one edit of several: it undoes all."""

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        super().__init__(backbone, config)
        self.tuned: Optional[nn.Module] = None
        self.n_edits = 0

    def __len__(self) -> int:
        return self.n_edits

    def edit(self, record) -> EditReport:
        start = time.perf_counter()
        if self.tuned is None:
            self.tuned = full_value(self.layer)
        losses = self._train(self.tuned, self._batch([record.image], [record.question], [record.target]))
        self.n_edits += 1
        nan = math.nan
        return EditReport(self.n_edits - 1, "tune", nan, nan, nan, losses, time.perf_counter() - start)

    def attached(self):
        """The fine-tuned layer replaces layer l for every input (the model itself is untouched)."""
        if self.tuned is None:  # nothing edited yet: the plain model
            return contextlib.nullcontext()
        return override(self.backbone, self.layer_path, self.tuned)

    def remove(self, i: int) -> None:
        if not 0 <= i < self.n_edits:
            raise IndexError(f"edit index {i} out of range for {self.n_edits} edits")
        self.reset()

    def reset(self) -> None:
        self.tuned, self.n_edits = None, 0


class _AtKey(nn.Module):
    """GRACE's replacement during training: v at the key position (``write``), layer l elsewhere."""

    def __init__(self, layer: nn.Module, value: nn.Module, write: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule
        self.value, self.write = value, write    # write: (B, T) bool

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.write.reshape(*h.shape[:-1], 1) if h.dim() == 2 else self.write[..., None]
        return torch.where(w, self.value(h), self.layer(h))


class Grace(_CodebookMethod):
    """GRACE baseline (Hartvigsen et al. 2023) at the same layer: a codebook with a FIXED initial
    radius eps0 (``config.grace_eps0``), key = the layer input at the last prompt token, value = a
    learned vector that replaces the layer output at that position (see ``attach``'s span="key":
    one vector cannot also produce every later token, so later positions keep the layer, as in
    GRACE's autoregressive setting where each new token is its own query). GRACE's rules: no key
    within eps0 + eps_j -> new entry; same target -> expand the radius to cover; different
    target -> add, and split both radii to half the distance."""

    key, span = "last", "key"  # routing: the last prompt token's input; the value at that position

    def __init__(self, backbone: nn.Module, config: BalancEditConfig = BalancEditConfig()):
        super().__init__(backbone, config)
        self.codebook = Codebook("euc").to(self.device)  # GRACE's distance: Euclidean
        self.eps0 = config.grace_eps0

    def edit(self, record) -> EditReport:
        start = time.perf_counter()
        cb, eps0 = self.codebook, self.eps0
        batch = self._batch([record.image], [record.question], [record.target])
        k = self.keys([record.image], [record.question], key="last")[0]  # (D,)
        action, j = "new", -1
        if len(cb):
            d = distance(k[None], cb.keys, "euc")[0]  # (N,)
            j = int(d.argmin())
            dj = float(d[j])
            if dj <= eps0 + float(cb.radii[j]):
                if cb.targets[j] == record.target:
                    action = "expand"          # same label: grow the ball to cover k
                    cb.set_radius(j, max(float(cb.radii[j]), dj))
                else:
                    action = "split"           # different label: both radii to half the distance
                    cb.set_radius(j, dj / 2)
        if action == "expand":
            value, eps = cb.values[j], float(cb.radii[j])
        else:
            value = VectorValue(self.layer.out_features if hasattr(self.layer, "out_features") else k.shape[0],
                                init=self._output_at_key(batch))
            eps = eps0 if action == "new" else float(cb.radii[j])
        mask = batch["prompt_mask"].bool()                                  # (B, T)
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, pos, -1).amax(dim=1)                       # (B,)
        write = pos[None, :] == last[:, None]                               # (B, T) the key position
        losses = self._train(_AtKey(self.layer, value, write), batch, lr=self.config.grace_lr)
        index = j if action == "expand" else cb.add(k, value, eps, record.target)
        return EditReport(index, action, math.nan, math.nan, eps, losses, time.perf_counter() - start)

    @torch.no_grad()
    def _output_at_key(self, batch: dict) -> torch.Tensor:
        """Layer l's output at the last prompt position: GRACE's initial value."""
        _, y = self._layer_io(batch)
        mask = batch["prompt_mask"].bool()
        B, T = mask.shape
        y = y.reshape(B, T, -1)                                             # (B, T, D_out)
        last = torch.where(mask, torch.arange(T, device=mask.device), -1).amax(dim=1)
        return y[0, last[0]].float()
