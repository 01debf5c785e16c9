"""The baselines BalancEdit is compared with: FT (fine-tuning layer l) and GRACE (a fixed radius).

Both have BalancEdit's interface: ``edit(record) -> EditReport``, ``attached()``, ``remove(i)``
and ``len()``, so that the protocols of evaluate.py run them alike.
"""

import contextlib
import math
import time

import torch
import torch.nn as nn

from balancedit import (
    BalancEditConfig,
    Codebook,
    EditReport,
    Router,
    distance,
    new_value,
    override,
    train_value,
)

TIE = 1e-5  # GRACE's margin at a split, also kept beyond a key that a ball grows to cover


class FineTune:
    """FT: fine-tune (a float32 copy of) layer l with Eq. 2's loss, steps and lr. No routing, so
    every input sees the edit; removing any edit undoes them all."""

    def __init__(self, backbone, config: BalancEditConfig):
        self.backbone = backbone
        self.config = config
        self.layer_path = config.layer or backbone.target_layer
        self.tuned = None  # the tuned copy of layer l, made by the first edit
        self.n_edits = 0

    def __len__(self) -> int:
        return self.n_edits

    def edit(self, record) -> EditReport:
        start = time.perf_counter()
        if self.tuned is None:
            self.tuned = new_value(self.backbone.get_submodule(self.layer_path))
        batch = self.backbone.encode([record.image], [record.question], [record.target])
        batch = self.backbone.to_device(batch)
        cfg = self.config
        losses = train_value(
            self.backbone, self.layer_path, self.tuned, batch, cfg.steps, cfg.lr, cfg.cache
        )
        self.n_edits += 1
        return EditReport(
            index=self.n_edits - 1,
            action="tune",
            removed=[],
            d_pos=math.nan,
            d_neg=math.nan,
            radius=math.nan,
            losses=losses,
            seconds=time.perf_counter() - start,
        )

    def attached(self):
        if self.tuned is None:
            return contextlib.nullcontext()
        return override(self.backbone, self.layer_path, self.tuned)

    def remove(self, i: int) -> None:
        """Undo every edit: one tuned layer holds them all."""
        self.tuned = None
        self.n_edits = 0


class GraceRouter(Router):
    """GRACE's hook: the query is the layer input at the last prompt position, and a hit replaces
    the layer output at that position only (in GRACE each later token is its own query, far from
    the key, so the answer's later tokens keep the layer). Decoding steps have no prompt
    position: no edit."""

    def route(self, layer, args, out):
        prompt = self.mask.bool()  # (B, T)
        B, T = prompt.shape
        positions = torch.arange(T, device=prompt.device)  # (T,)
        # Each row's last prompt position: the largest position where prompt is True, else -1.
        last = torch.where(prompt, positions, -1).amax(dim=1)  # (B,)
        h = args[0].reshape(B, T, -1)  # (B, T, D): OPT's fc2 sees (B*T, D)
        q = h[torch.arange(B), last.clamp(min=0)]  # (B, D)
        j, _, hit = self.codebook.lookup(q)
        index = torch.where(hit & (last >= 0), j, -1)  # (B,): -1 for a miss
        self.last_index = index
        if (index < 0).all():
            return None
        new = out.clone(memory_format=torch.contiguous_format).view(B, T, -1)  # (B, T, D_out)
        for b in (index >= 0).nonzero()[:, 0].tolist():
            new[b, last[b]] = self.codebook.values[int(index[b])].v.to(out.dtype)
        return new.view(out.shape)


class Vector(nn.Module):
    """GRACE's value: a learned vector v (D_out,), the layer's output at the key position. Called
    in training (f_new): v at the ``write`` positions (B, T), layer l's own output elsewhere."""

    def __init__(self, layer: nn.Module, init: torch.Tensor):
        super().__init__()
        # Set past nn.Module's __setattr__: the layer is then not a submodule, so it is neither
        # trained nor saved with the vector.
        object.__setattr__(self, "layer", layer)
        self.v = nn.Parameter(init.detach().float().clone())
        self.write = None  # (B, T) bool, set before training

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., D) float32, flattened as layer l sees it."""
        y = self.layer(h.to(self.layer.weight.dtype)).float()
        return torch.where(self.write.reshape(*h.shape[:-1], 1), self.v, y)


class Grace:
    """GRACE (Hartvigsen et al. 2023) at the same layer: a Euclidean codebook of vectors with a
    FIXED initial radius eps0. No key within eps0 + eps_j: a new entry; the same target: that ball
    grows to cover the key; another target: a new entry, and both radii become half the
    distance (the old one TIE less, as in GRACE's code). eps0 = 1 and lr = 1 are GRACE's
    defaults.

    GRACE grows a ball to exactly d(k_j, k), which leaves the new key on its boundary: whether
    the edit's own prompt then hits depends on the last bits of a forward pass (another batch,
    another thread count). The ball grows TIE beyond the key instead, so the key is inside."""

    def __init__(self, backbone, config: BalancEditConfig, eps0: float = 1.0, lr: float = 1.0):
        self.backbone = backbone
        self.config = config
        self.eps0 = eps0
        self.lr = lr
        self.layer_path = config.layer or backbone.target_layer
        self.layer = backbone.get_submodule(self.layer_path)
        self.codebook = Codebook("euc").to(self.layer.weight.device)

    def __len__(self) -> int:
        return len(self.codebook)

    @torch.no_grad()
    def at_key(self, images, questions, answers=None):
        """For a one-row batch: layer l's input h (D,) and output y (D_out,) at the last prompt
        position, the batch, and that position as a (1, T) mask."""
        batch = self.backbone.to_device(self.backbone.encode(images, questions, answers))
        last = batch["prompt_mask"][0].nonzero().max()  # the last prompt position
        write = torch.zeros_like(batch["prompt_mask"], dtype=torch.bool)  # (1, T)
        write[0, last] = True
        inputs = self.backbone.layer_input(batch, self.layer_path)  # (1, T, D)
        outputs = self.layer(inputs)  # (1, T, D_out): what the layer gave in that run
        h = inputs[write].float()  # (1, D)
        y = outputs[write].float()  # (1, D_out)
        return h[0], y[0], batch, write

    def edit(self, record) -> EditReport:
        start = time.perf_counter()
        cb = self.codebook
        k = self.at_key([record.image], [record.question])[0]  # (D,): the key, as the hook sees it
        _, y, batch, write = self.at_key([record.image], [record.question], [record.target])
        action = "new"
        j = -1
        eps = self.eps0
        if len(cb):
            d = distance(k[None], cb.keys, "euc")[0]  # (N,)
            j = int(d.argmin())
            if d[j] <= self.eps0 + cb.radii[j]:
                if cb.targets[j] == record.target:
                    action = "expand"  # the ball grows to cover the key, TIE beyond it
                    eps = max(float(cb.radii[j]), float(d[j]) + TIE)
                    cb.radii[j] = eps
                else:
                    action = "split"  # both balls shrink to half the distance
                    eps = float(d[j]) / 2
                    cb.radii[j] = eps - TIE  # GRACE's: the old ball stops short of the new
        if action == "expand":
            vector = cb.values[j]
        else:
            vector = Vector(self.layer, y)  # a new vector starts as the layer's output
        vector.write = write
        cfg = self.config
        losses = train_value(
            self.backbone, self.layer_path, vector, batch, cfg.steps, self.lr, cfg.cache
        )
        if action != "expand":
            j = cb.add(k, vector, eps, record.target)
        return EditReport(
            index=j,
            action=action,
            removed=[],
            d_pos=math.nan,
            d_neg=math.nan,
            radius=eps,
            losses=losses,
            seconds=time.perf_counter() - start,
        )

    def attached(self) -> GraceRouter:
        return GraceRouter(self.backbone, self.layer_path, self.codebook)

    def remove(self, i: int) -> None:
        self.codebook.remove(i)
