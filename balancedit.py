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
- :func:`override`       ``f_new``: the layer's output replaced by one value for every row (Eq. 2 training)
- ``# ---- Editor (Eq. 2) ----``: the editor, the FT and GRACE baselines

Shapes: ``B`` batch, ``T`` positions, ``D`` the layer's input width, ``N``
codebook entries.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTANCES = ("cos", "euc")
KEYS = ("mean", "last")
SPANS = ("row", "from_key")


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
        q_hat = F.normalize(q, dim=-1, eps=1e-8)  # (B, D)
        k_hat = F.normalize(k, dim=-1, eps=1e-8)  # (N, D)
        return (1.0 - q_hat @ k_hat.T).clamp(min=0.0)  # (B, N)
    # The exact (non-matmul) path: d(k, k) is 0, and the golden tests are exact.
    return torch.cdist(q, k, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N)


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
        d = distance(q, self.keys, self.distance)  # (B, N)
        dist, index = d.min(dim=1)  # (B,), (B,)  j = argmin_k d(q, k)
        hit = dist <= self.radii[index]  # (B,)  Eq. 1: d(q, k_j) <= eps_j
        dev = queries.device
        return index.to(dev), dist.to(dev), hit.to(dev)

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


def full_value(layer: nn.Module) -> nn.Module:
    """``v_k``: a trainable copy of layer ``l`` (the paper's default). The layer is untouched."""
    value = _strip_hooks(copy.deepcopy(layer))
    value.requires_grad_(True)
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
        w = layer.weight
        self.A = nn.Parameter(torch.empty(rank, layer.in_features, dtype=w.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.base.weight.detach()  # (out, in)
        b = None if self.base.bias is None else self.base.bias.detach()  # (out,)
        return F.linear(x, W, b) + F.linear(F.linear(x, self.A), self.B)  # (..., out)


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

        # The query q of each sample (prompt positions only; padding never counts).
        with torch.no_grad():
            hf = h3.detach().float()  # (B, T, D)
            if self.key == "mean":
                s = torch.where(prompt[..., None], hf, 0.0).sum(dim=1)  # (B, D)
                q = s / n_prompt.clamp(min=1)[:, None].float()  # (B, D)
            else:  # "last": GRACE's key, the input at the last prompt position
                q = hf[torch.arange(B, device=h.device), last.clamp(min=0)]  # (B, D)
            q = torch.where(has_prompt[:, None], q, math.nan)  # (B, D)

        # Eq. 1: j = argmin_k d(q, k); route where d(q, k_j) <= eps_j.
        index = torch.full((B,), -1, dtype=torch.long, device=h.device)  # (B,)
        dist = torch.full((B,), math.inf, device=h.device)  # (B,)
        if has_prompt.any():
            j, d, hit = cb.lookup(q[has_prompt])
            index[has_prompt] = torch.where(hit, j, -1)
            dist[has_prompt] = d

        # KV-cache decoding: a row with no prompt position keeps its prefill route.
        held_rows = torch.zeros(B, dtype=torch.bool, device=h.device)  # (B,)
        if mask is None:
            self._held = None
        else:
            if self._held is None or self._held.shape[0] != B:
                self._held = torch.full((B,), -1, dtype=torch.long, device=h.device)
            held = self._held.to(h.device)
            held = torch.where(held < len(cb), held, -1)  # entries removed since: miss
            held_rows = ~has_prompt & (held >= 0)
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
        else:  # "from_key" (GRACE): positions >= the last prompt position
            write = (pos[None, :] >= last[:, None]) | held_rows[:, None]  # (B, T)
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

    ``span="row"`` replaces every position of a hit sample; ``span="from_key"``
    (GRACE) only positions from the last prompt position on.

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
