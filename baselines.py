"""The baselines BalancEdit is compared with: FT (fine-tuning layer l) and GRACE (a fixed radius).

Each is an ``editor.Editor``, so that the protocols of evaluate.py run them alike, and each has
its own config; both train with Eq. 2's loss (balancedit.train_value). Both save and load what
their edits made, as BalancEdit does (the sequential protocol's checkpoints).
"""

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import checkpoint
from balancedit import Codebook, Router, distance, new_value, override, train_value
from editor import Editor, EditReport

TIE = 1e-5  # GRACE's margin at a split, also kept beyond a key that a ball grows to cover
FT_HEADER = {"format": "ft-layer", "version": 1}  # a saved FT's first fields
GRACE_HEADER = {"format": "grace-codebook", "version": 1}  # a saved GRACE's first fields


@dataclass
class FTConfig:
    layer: str | None = None  # dotted path of layer l; None: the backbone's
    steps: int = 100  # Adam steps per edit (BalancEdit's)
    lr: float = 1e-2  # Adam's learning rate (BalancEdit's)
    cache: bool = True  # train on cached activations: the same values, faster


class FineTune(Editor):
    """FT: fine-tune (a float32 copy of) layer l with Eq. 2's loss, steps and lr. No routing, so
    every input sees the edit."""

    def __init__(self, backbone, config: FTConfig = FTConfig()):
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
        tail = self.backbone.tail(batch, self.layer_path) if cfg.cache else None
        losses = train_value(
            self.backbone, self.layer_path, self.tuned, batch, cfg.steps, cfg.lr, tail
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

    def remove(self, j: int) -> None:
        """Undo every edit, not edit j alone: one tuned layer holds them all."""
        if not 0 <= j < self.n_edits:
            raise IndexError(f"edit {j} out of range for {self.n_edits} edits")
        self.tuned = None
        self.n_edits = 0

    def save(self, path) -> None:
        """Write ``path/tuned.safetensors`` (the tuned layer) and ``path/tuned.json``."""
        meta = {**FT_HEADER, "config": asdict(self.config), "edits": self.n_edits}
        checkpoint.save(path, "tuned", {} if self.tuned is None else self.tuned.state_dict(), meta)

    @classmethod
    def load(cls, path, backbone) -> "FineTune":
        """Read what ``save`` wrote; a bad file is one ValueError naming the file and the fault."""
        meta, state = checkpoint.load(path, "tuned", FT_HEADER, {"config", "edits"})
        try:
            editor = cls(backbone, FTConfig(**meta["config"]))
            editor.n_edits = int(meta["edits"])
            if state:
                editor.tuned = new_value(backbone.get_submodule(editor.layer_path))
                editor.tuned.load_state_dict(state)
        except (TypeError, KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot load a tuned layer: {e}") from e
        return editor


class GraceRouter(Router):
    """GRACE's hook: the query is the layer input at the last prompt position (``pool="last"``),
    and a hit replaces the layer output at that position only (in GRACE each later token is its
    own query, far from the key, so the answer's later tokens keep the layer). Decoding steps
    have no prompt position: they miss."""

    def __init__(self, model: nn.Module, layer_path: str, codebook: Codebook):
        super().__init__(model, layer_path, codebook, pool="last")

    def hold(self, index, prompt, masked) -> torch.Tensor:
        return index  # nothing held: a decoding step's query (no prompt position) misses

    def rewrite(self, out, h, index, prompt) -> torch.Tensor:
        B, T = prompt.shape
        positions = torch.arange(T, device=prompt.device)  # (T,)
        # Each row's last prompt position: the largest position where prompt is True, else -1.
        last = torch.where(prompt, positions, -1).amax(dim=1)  # (B,)
        new = out.clone(memory_format=torch.contiguous_format).view(B, T, -1)  # (B, T, D_out)
        for b in ((index >= 0) & (last >= 0)).nonzero()[:, 0].tolist():
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


@dataclass
class GraceConfig:
    layer: str | None = None  # dotted path of layer l; None: the backbone's
    eps0: float = 1.0  # the initial radius of every entry (Euclidean), GRACE's default
    steps: int = 100  # Adam steps per edit (BalancEdit's)
    lr: float = 1.0  # Adam's learning rate for the vector, GRACE's default
    cache: bool = True  # train on cached activations: the same values, faster


class Grace(Editor):
    """GRACE (Hartvigsen et al. 2023) at the same layer: a Euclidean codebook of vectors with a
    FIXED initial radius eps0. No key within eps0 + eps_j: a new entry; the same target: that ball
    grows to cover the key; another target: a new entry, and both radii become half the
    distance (the old one TIE less, as in GRACE's code). eps0 = 1 and lr = 1 are GRACE's
    defaults.

    GRACE grows a ball to exactly d(k_j, k), which leaves the new key on its boundary: whether
    the edit's own prompt then hits depends on the last bits of a forward pass (another batch,
    another thread count). The ball grows TIE beyond the key instead, so the key is inside."""

    def __init__(self, backbone, config: GraceConfig = GraceConfig()):
        self.backbone = backbone
        self.config = config
        self.eps0 = config.eps0
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
        tail = self.backbone.tail(batch, self.layer_path) if cfg.cache else None
        losses = train_value(self.backbone, self.layer_path, vector, batch, cfg.steps, cfg.lr, tail)
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

    def remove(self, j: int) -> None:
        """Remove entry j: the edit that made it, and any later edit of the same target that
        grew its ball instead of adding an entry."""
        self.codebook.remove(j)

    def save(self, path) -> None:
        """Write ``path/codebook.safetensors`` (keys, radii, vectors) and ``path/codebook.json``."""
        meta = {**GRACE_HEADER, "config": asdict(self.config), "targets": self.codebook.targets}
        checkpoint.save(path, "codebook", self.codebook.state_dict(), meta)

    @classmethod
    def load(cls, path, backbone) -> "Grace":
        """Read what ``save`` wrote; a bad file is one ValueError naming the file and the fault."""
        meta, state = checkpoint.load(path, "codebook", GRACE_HEADER, {"config", "targets"})
        try:
            editor = cls(backbone, GraceConfig(**meta["config"]))
            device = editor.layer.weight.device
            for j, target in enumerate(meta["targets"]):
                vector = Vector(editor.layer, state[f"values.{j}.v"].to(device))
                editor.codebook.add(state["keys"][j], vector, float(state["radii"][j]), target)
        except (TypeError, KeyError, IndexError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot load a GRACE codebook: {e}") from e
        return editor
