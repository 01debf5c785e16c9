"""MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022), as EasyEdit runs it on
BLIP-2 OPT and MiniGPT-4: a trained editor network turns one fine-tuning gradient into an edit.

For an edited Linear W (out, in), the gradient of the edit loss is a sum of rank-one pieces, one
per position t whose logits enter the loss (u_t: W's input, delta_t: the gradient at W's output):

    grad_W L = sum_t delta_t u_t^T                      (MEND's Sec. 3.1)
    (u~_t, delta~_t) = g(u_t, delta_t)                  (the editor network, Eq. 3)
    W~ = W - alpha_l * sum_t delta~_t u~_t^T            (one learned step size per tensor)

One forward, one backward and one pass of g per edit. g is meta-trained (Sec. 3.2) on edits
nobody scores: L = c_edit * NLL(y^n | i, R(t)) + i_edit * NLL(y^n | i', t) + c_loc * KL(f || f~)
on out-of-scope probes. ``python mend.py train [--world tiny|easyvqa]`` trains the shipped
editors (assets/mend_tinyvlm, assets/mend_tinyvlm_easyvqa). Where we depart from EasyEdit:
- the step subtracts, as the paper writes (EasyEdit adds lr * g~, lr = +1e-4 at the start);
- g's ReLU sits between its two matrices (z + U relu(V z)): EasyEdit's follows U V z, so with
  U = 0 it sees exactly 0, where torch's clamp has a zero gradient, and g never trains;
- the weights are never written: W~ x = W x + B (A x) by forward hooks, an edit kept as its
  rank-P factors A (P, in), B (out, P) (a dense W~ - W of BLIP-2's six is 0.6 GB an edit).
"""

import contextlib
import hashlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import world
from data import Sample
from editor import Editor, EditReport
from models import ASSETS, TinyVLM, lm_loss, loss_positions

HEADER = {"format": "mend-editor", "version": 1}  # a saved editor's first fields
RESERVED_SEEDS = range(0, 1003)  # the shipped sample (0), test worlds (1..1000), dev (1001, 1002)


class Layers(NamedTuple):
    """Where MEND edits a backbone: the Linears of its last decoder layers."""

    path: str  # the ModuleList of its decoder layers
    linears: tuple[str, ...]  # the Linears edited in each layer
    last: int  # how many of the last layers


LAYERS = {  # backbone class -> its Layers
    # TinyVLM (4 layers): its top half, as 29-31 are the top of BLIP-2's 32. Measured on a
    # held-out training world after 1000 steps: HM 97 with the last 2 layers, 80 with 3
    "TinyVLM": Layers("lm.model.decoder.layers", ("fc1", "fc2"), 2),
    "Blip2OPT": Layers("model.language_model.model.decoder.layers", ("fc1", "fc2"), 3),  # 29-31
    "MiniGPT4": Layers("llama_model.model.layers", ("mlp.up_proj", "mlp.down_proj"), 3),  # 29-31
}


@dataclass
class MENDConfig:
    """g's size and its meta-training: TinyVLM's values, picked by the HM of single edits on a
    held-out training world (EasyEdit's for BLIP-2 and MiniGPT-4 in brackets)."""

    rank: int = 128  # g's inner width [1920]: 1/5 of in + out = 640, as 1920 is of 12800
    n_hidden: int = 1  # g has n_hidden + 1 layers [1]
    alpha_init: float = 1e-2  # alpha_l at the start [1e-4, added]: the best plain gradient step
    lr: float = 1e-4  # Adam on g [1e-6, over 30000 steps]
    lr_alpha: float = 1e-3  # Adam on the alpha_l [1e-4]; lr 1e-3 with lr_alpha 1e-2: HM 1
    c_edit: float = 0.1  # weight of the rephrased question's NLL [0.1]
    i_edit: float = 0.1  # weight of the other image's NLL [0.1]
    c_loc: float = 1.0  # weight of the KL on the locality probes [1.0]
    clip: float = 100.0  # gradient norm clip [100]
    steps: int = 1500  # edits, one a step [30000 of 2]: HM 56, 97, 99, 99.8 after 500, 1k, 1.5k, 3k
    worlds: int = 25  # training worlds of 40 edits each

    def __post_init__(self):  # refuse a bad value before any work, naming the field
        for name, value in asdict(self).items():
            whole = name in ("rank", "n_hidden", "steps", "worlds")
            bad = type(value) is not int if whole else not isinstance(value, (int, float))
            if bad or not 0 <= value < math.inf or (value == 0 and name != "n_hidden"):
                raise ValueError(f"MENDConfig.{name}: {value!r} is not a positive number")


def layer_shapes(backbone: nn.Module) -> dict[str, tuple[int, int]]:
    """The Linears MEND edits on this backbone (its LAYERS preset): dotted path -> (in, out)."""
    kind = type(backbone).__name__
    if kind not in LAYERS:
        raise ValueError(f"MEND has no layer preset for a {kind}; known: {sorted(LAYERS)}")
    edited = LAYERS[kind]
    n = len(backbone.get_submodule(edited.path))
    first = n - edited.last
    names = [f"{edited.path}.{i}.{linear}" for i in range(first, n) for linear in edited.linears]
    return {name: tuple(backbone.get_submodule(name).weight.shape[::-1]) for name in names}


# ---------------- The editor network g, one per weight shape (in, out)
class Norm(nn.Module):
    """u or delta -> (x - mean) / std per feature, the statistics running over every piece seen
    in meta-training and frozen at edit time. Before any, the identity."""

    def __init__(self, D: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("var", torch.ones(D))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of x (N, D): Chan et al.'s merge of two (count, mean, variance)."""
        n = len(x)
        total = self.count + n
        d = x.mean(dim=0) - self.mean  # (D,)
        spread = self.count * self.var + n * x.var(dim=0, unbiased=False)  # (D,)
        self.var.copy_((spread + d**2 * self.count * n / total) / total)
        self.mean.add_(d * n / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var.sqrt() + 1e-7)  # EasyEdit's epsilon


class Transform(nn.Module):
    """g of one weight shape: (u, delta) -> (u~, delta~), each normalised, then together
    (EasyEdit's "combine") through n_hidden + 1 layers z <- z + s_m * U relu(V z + b) + o_m, with a
    scale s_m and a shift o_m for each tensor m that shares g (MEND's "shared" mode). U = 0: g
    starts as the identity, and U's gradient, relu(V z + b), is not 0 (see the module docstring).
    """

    def __init__(self, d_in: int, d_out: int, n_modes: int, cfg: MENDConfig):
        super().__init__()
        self.u_norm = Norm(d_in)
        self.delta_norm = Norm(d_out)
        D = d_in + d_out
        r = min(cfg.rank, D)
        L = cfg.n_hidden + 1
        self.V = nn.Parameter(torch.randn(L, r, D) / math.sqrt(D))  # (L, r, D)
        self.b = nn.Parameter(torch.zeros(L, r))  # (L, r)
        self.U = nn.Parameter(torch.zeros(L, D, r))  # (L, D, r)
        self.scale = nn.Parameter(torch.ones(L, n_modes, D))  # s_m of each layer
        self.shift = nn.Parameter(torch.zeros(L, n_modes, D))  # o_m of each layer

    def forward(self, u: torch.Tensor, delta: torch.Tensor, m: int):
        z = torch.cat([self.u_norm(u), self.delta_norm(delta)], dim=-1)  # (P, in + out)
        for i in range(len(self.V)):  # layer i: z + s_m * U relu(V z + b) + o_m
            hidden = F.relu(F.linear(z, self.V[i], self.b[i]))  # (P, r)
            z = z + self.scale[i, m] * F.linear(hidden, self.U[i]) + self.shift[i, m]  # (P, D)
        return z.split([u.shape[-1], delta.shape[-1]], dim=-1)  # u~ (P, in), delta~ (P, out)


class MENDNet(nn.Module):
    """Everything MEND learns: g for each weight shape, and the step sizes alpha_l."""

    def __init__(self, shapes: dict[str, tuple[int, int]], cfg: MENDConfig):
        super().__init__()
        self.shapes = shapes  # edited layer path -> its (in, out)
        self.cfg = cfg
        self.key = {n: f"{i}x{o}" for n, (i, o) in shapes.items()}  # the g each layer uses
        same = {k: [n for n in shapes if self.key[n] == k] for k in self.key.values()}
        self.mode = {n: same[self.key[n]].index(n) for n in shapes}  # m: its scale and shift
        g = {k: Transform(*shapes[names[0]], len(names), cfg) for k, names in same.items()}
        self.g = nn.ModuleDict(g)
        self.alpha = nn.Parameter(torch.full((len(shapes),), cfg.alpha_init))  # alpha_l

    def forward(self, pieces: dict, learn: bool = False) -> dict:
        """{layer: (u (P, in), delta (P, out))} -> the update {layer: (A (P, in), B (out, P))},
        W~ - W = B A = -alpha_l * sum_t delta~_t u~_t^T. ``learn``: the statistics first take
        in the pieces (meta-training)."""
        update = {}
        for alpha, name in zip(self.alpha, self.shapes):
            u, delta = pieces[name]
            g = self.g[self.key[name]]
            if learn:
                g.u_norm.update(u)
                g.delta_norm.update(delta)
            u_t, delta_t = g(u, delta, self.mode[name])
            update[name] = (u_t, -alpha * delta_t.T)
        return update


# ---------------- An edit: the rank-one pieces, and the update added by hooks
def rank_one_pieces(backbone, layers: list[str], batch: dict) -> dict:
    """One forward and one backward of ``batch``: each edited Linear's input u_t and the loss's
    gradient delta_t at its output, at the P positions t whose logits enter the loss,
    {layer: (u (P, in), delta (P, out))}. No gradient is written into the model."""
    inputs = {}
    outputs = {}

    def keep(name):
        def hook(layer, args, out):
            inputs[name] = args[0]
            if not out.requires_grad:  # a frozen backbone: the gradient is still wanted here
                out.requires_grad_()
            outputs[name] = out

        return hook

    with contextlib.ExitStack() as hooks, torch.enable_grad():
        for n in layers:
            hooks.enter_context(backbone.get_submodule(n).register_forward_hook(keep(n)))
        loss = backbone(**batch).loss
    deltas = torch.autograd.grad(loss, [outputs[n] for n in layers])
    at = loss_positions(batch["labels"])[0].flatten()  # (B*T,): OPT's fc1, fc2 see B*T rows
    pieces = {}
    for name, delta in zip(layers, deltas):
        u = inputs[name].detach().reshape(-1, inputs[name].shape[-1])[at].float()  # (P, in)
        pieces[name] = (u, delta.reshape(-1, delta.shape[-1])[at].float())  # delta: (P, out)
    return pieces


def added(backbone, update: dict) -> contextlib.ExitStack:
    """Each edited Linear computes W x + B (A x) ({layer: (A, B)}) until the returned stack
    closes (a ``with`` block's end): forward hooks, so the model's weights are never written."""

    def hook_of(A, B):
        def hook(layer, args, out):
            return out + F.linear(F.linear(args[0].to(A.dtype), A), B).to(out.dtype)

        return hook

    hooks = contextlib.ExitStack()  # each hook's handle removes it when the stack closes
    for name, (A, B) in update.items():
        hooks.enter_context(backbone.get_submodule(name).register_forward_hook(hook_of(A, B)))
    return hooks


def encode(backbone, samples: list[Sample]) -> dict:
    """A batch of (image, question, answer) samples on the backbone's device."""
    images = [s.image for s in samples]
    questions = [s.question for s in samples]
    return backbone.to_device(backbone.encode(images, questions, [s.answer for s in samples]))


def weights_sha1(backbone, layers: list[str]) -> str:
    """A fingerprint of the edited weights: an editor is trained for one model."""
    sha1 = hashlib.sha1()
    for n in layers:
        sha1.update(backbone.get_submodule(n).weight.detach().float().cpu().numpy().tobytes())
    return sha1.hexdigest()


class MEND(Editor):
    """MEND's edits of a backbone with a trained ``MENDNet``. Edits accumulate: each one's
    gradient is taken on the model holding the earlier ones."""

    def __init__(self, backbone, net: MENDNet):
        self.backbone = backbone
        self.net = net.to(backbone.device)
        self.edits = []  # per edit: {layer: (A (P, in), B (out, P))}

    def __len__(self) -> int:
        return len(self.edits)

    def edit(self, record) -> EditReport:
        """The edit (i, t) -> y^n: one forward and backward, one pass of g."""
        start = time.perf_counter()
        batch = encode(self.backbone, [Sample(record.image, record.question, record.target)])
        with self.attached():  # the gradient on the model with the earlier edits
            pieces = rank_one_pieces(self.backbone, list(self.net.shapes), batch)
        with torch.no_grad():
            self.edits.append(self.net(pieces))
        seconds = time.perf_counter() - start
        return EditReport(len(self) - 1, "mend", [], math.nan, math.nan, math.nan, [], seconds)

    def attached(self):
        """``with editor.attached(): ...`` runs the edited model; with no edit, the plain one.
        The edits add up: their factors side by side, A (sum P, in), B (out, sum P)."""
        if not self.edits:
            return contextlib.nullcontext()
        A = {n: torch.cat([e[n][0] for e in self.edits]) for n in self.net.shapes}
        B = {n: torch.cat([e[n][1] for e in self.edits], dim=1) for n in self.net.shapes}
        return added(self.backbone, {n: (A[n], B[n]) for n in self.net.shapes})

    def remove(self, j: int) -> None:
        """Undo edit j alone (the later edits keep the updates they were given)."""
        if not 0 <= j < len(self):
            raise IndexError(f"edit {j} out of range for {len(self)} edits")
        del self.edits[j]

    def save(self, path, training: dict) -> None:
        """Write ``path/mend.safetensors`` (g, its statistics, alpha_l) and ``path/mend.json``."""
        layers = list(self.net.shapes)
        meta = {**HEADER, "backbone": type(self.backbone).__name__, "layers": layers}
        meta["shapes"] = [list(self.net.shapes[n]) for n in layers]
        meta["weights_sha1"] = weights_sha1(self.backbone, layers)
        meta |= {"config": asdict(self.net.cfg), "training": training}
        checkpoint.save(path, "mend", self.net.state_dict(), meta)

    @classmethod
    def load(cls, path, backbone) -> "MEND":
        """Read what ``save`` wrote, for this backbone only: a bad file, or one for another
        backbone, layer set or weights, is one ValueError naming the file."""
        fields = {"backbone", "layers", "shapes", "weights_sha1", "config", "training"}
        meta, state = checkpoint.load(path, "mend", HEADER, fields)
        shapes = layer_shapes(backbone)
        mine = [type(backbone).__name__, list(shapes), [list(s) for s in shapes.values()]]
        saved = [meta["backbone"], meta["layers"], meta["shapes"]]
        if saved != mine:
            raise ValueError(f"{path}/mend.json: an editor for {saved}, not {mine}")
        if meta["weights_sha1"] != weights_sha1(backbone, list(shapes)):
            raise ValueError(f"{path}/mend.json: an editor for other weights of a {mine[0]}")
        try:
            net = MENDNet(shapes, MENDConfig(**meta["config"]))
            net.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as e:
            why = " ".join(str(e).split())  # load_state_dict's message spans lines
            raise ValueError(f"{path}/mend.safetensors does not fit mend.json: {why}") from e
        return cls(backbone, net)


def shipped(backbone) -> MEND:
    """The shipped editor trained for this backbone's weights (either TinyVLM of assets/)."""
    return MEND.load(world_of(backbone).editor, backbone)


def world_of(backbone) -> "World":
    """The shipped world whose TinyVLM this is: the one whose MEND editor fits its weights."""
    for shipped_world in WORLDS.values():
        with contextlib.suppress(ValueError):  # another model's editor: try the next
            MEND.load(shipped_world.editor, backbone)
            return shipped_world
    raise ValueError(
        "no shipped MEND editor was trained for this model (MEND and IKE run on the shipped "
        "TinyVLMs, IKE with the demonstrations of their worlds): see python mend.py train"
    )


# ---------------- Meta-training (the paper's Sec. 3.2)
@dataclass
class Example:
    """One meta-training edit: its gradient comes from ``edit``, its loss from the others."""

    edit: Sample  # (i, t, y^n)
    rephrase: Sample  # (i, R(t), y^n): a training rephrasing, never one that scores T-Gen
    image: Sample  # (i', t, y^n): another image of the edit's scope
    locality: list[Sample]  # out of scope: the edit must leave their answers as they were


def example(record, image) -> Example:
    """An EditRecord's edit as an Example, with ``image`` as i' (never one it scores)."""
    y = record.target
    edit = Sample(record.image, record.question, y)
    rephrase = Sample(record.image, record.train_rephrases[0], y)
    locality = [*record.locality, *record.m_locality, *record.q_locality[:1]]  # [:1]: image i's
    return Example(edit, rephrase, Sample(image, record.question, y), locality)


def check_seeds(seeds) -> None:
    """Refuse a training world that the sample, the study's tests or its dev worlds use."""
    taken = [s for s in seeds if s in RESERVED_SEEDS]
    if taken:
        raise ValueError(f"seed {taken[0]}: worlds 0..1002 are scored (sample, study); use 1003+")


def world_examples(seed: int, n: int = 40) -> list[Example]:
    """A training world's records; i' is a fresh rendering of the record's scope (its kind, or
    its shape in a random colour) by the world's own renderer."""
    check_seeds([seed])
    rng = random.Random(f"mend {seed}")
    kind_of = {name: kind for kind, name in world.KIND_NAMES.items()}
    examples = []
    for r in world.make_records(seed, n):
        colour = rng.choice(sorted(world.COLOURS))
        kind = kind_of[r.answer] if r.category == "kind" else (r.answer, colour)
        examples.append(example(r, world.render(kind, rng, "eval")))
    return examples


def easyvqa_examples(seed: int, n: int = 40) -> list[Example]:
    """Edits of easy-VQA's train images (its scored edits use test images only), alternately of
    a shape (on every colour of it) and of a colour (on one kind), as easyvqa.make_records."""
    import easyvqa as ev  # the package brings the images; only this world needs it

    check_seeds([seed])
    rng = random.Random(f"mend {seed}")
    kinds = ev.kinds("train")
    ids = {k: [i for i in sorted(kinds) if kinds[i] == k] for k in ev.KINDS}
    image = ev.images("train")
    examples = []
    for r in range(n):
        kind = rng.choice(ev.KINDS)
        family, other = ("shape", "colour") if r % 2 == 0 else ("colour", "shape")
        scope = [k for k in ev.KINDS if k[0] == kind[0]] if family == "shape" else [kind]
        y = rng.choice([a for a in (ev.SHAPES, ev.COLOURS)[r % 2] if a != kind[r % 2]])
        asks = [t.format(shape=kind[0], colour=kind[1]) for t in ev.WHAT[family]]
        t, rephrase = rng.sample(asks, 2)
        i = rng.choice(ids[kind])
        i_other = rng.choice([j for k in scope for j in ids[k] if j != i])
        # Locality: asks[0] names no colour, so every kind out of scope that it fits answers it
        near = [k for k in ev.KINDS if k not in scope and ev.answer(asks[0], k)]
        locality = []
        for k in rng.sample(near, 3):
            locality.append(Sample(image[rng.choice(ids[k])], asks[0], ev.answer(asks[0], k)))
        q = ev.WHAT[other][0].format(shape=kind[0])
        locality.append(Sample(image[i], q, ev.answer(q, kind)))  # the edit's image, asked else
        edit = Sample(image[i], t, y)
        rephrased = Sample(image[i], rephrase, y)
        examples.append(Example(edit, rephrased, Sample(image[i_other], t, y), locality))
    return examples


class World(NamedTuple):
    """A shipped TinyVLM and its MEND editor."""

    model: Path  # the TinyVLM
    editor: Path  # where its editor goes
    examples: Callable  # seed -> that world's training edits


WORLDS = {  # --world -> its World
    "tiny": World(ASSETS / "tinyvlm", ASSETS / "mend_tinyvlm", world_examples),
    "easyvqa": World(ASSETS / "tinyvlm_easyvqa", ASSETS / "mend_tinyvlm_easyvqa", easyvqa_examples),
}


def meta_loss(backbone, net: MENDNet, ex: Example) -> tuple[torch.Tensor, dict]:
    """The edit of ``ex`` by ``net`` (whose statistics learn), and MEND's loss on the edited
    model f~: c_edit * NLL(rephrase) + i_edit * NLL(other image) + c_loc * KL(f || f~) on the
    locality probes, at the positions whose logits predict their answers."""
    pieces = rank_one_pieces(backbone, list(net.shapes), encode(backbone, [ex.edit]))
    update = net(pieces, learn=True)
    batch = encode(backbone, [ex.rephrase, ex.image, *ex.locality])
    labels = batch["labels"]  # (2 + L, T)
    with torch.no_grad():
        pre = backbone(**batch).logits  # (2 + L, T, V): the unedited model f
    with added(backbone, update):  # the graph runs through the update to g and alpha_l
        post = backbone(**batch).logits  # f~
    at = loss_positions(labels[2:])[0]  # (L, T)
    log_p = pre[2:][at].float().log_softmax(-1)  # (N, V)
    log_q = post[2:][at].float().log_softmax(-1)  # (N, V)
    parts = {
        "edit": lm_loss(post[:1], labels[:1]),
        "image": lm_loss(post[1:2], labels[1:2]),
        "loc": (log_p.exp() * (log_p - log_q)).sum(-1).mean(),
    }
    cfg = net.cfg
    loss = cfg.c_edit * parts["edit"] + cfg.i_edit * parts["image"] + cfg.c_loc * parts["loc"]
    return loss, {k: v.item() for k, v in parts.items()}


def train(backbone, examples: list[Example], cfg: MENDConfig, seed: int, progress: bool = True):
    """Meta-train a MENDNet for ``backbone`` on ``examples`` (of any EditRecords: ``example``),
    cfg.steps of them in a seeded order. Returns it and each step's loss parts."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    net = MENDNet(layer_shapes(backbone), cfg).to(backbone.device)
    alpha = {"params": [net.alpha], "lr": cfg.lr_alpha}  # Adam is per number: one Adam each
    opt = torch.optim.Adam([{"params": list(net.g.parameters())}, alpha], lr=cfg.lr)
    rng = random.Random(seed)
    order = []
    history = []
    for _ in (bar := tqdm(range(cfg.steps), desc="meta-train MEND", disable=not progress)):
        if not order:  # a fresh shuffle of the examples each epoch
            order = rng.sample(range(len(examples)), len(examples))
        loss, parts = meta_loss(backbone, net, examples[order.pop()])
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(net.parameters()))  # no gradient into the backbone
        nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
        opt.step()
        history.append(parts)
        bar.set_postfix(edit=f"{parts['edit']:.3f}", loc=f"{parts['loc']:.4f}", refresh=False)
    return net, history


# ---------------- Command line: python mend.py train
def main(argv=None) -> int:
    """Check the seeds, the output and the model before any work; then train and save."""
    import cli  # the shared command-line machinery, only when run as one

    parser = cli.Parser(prog="mend.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="meta-train MEND's editor for a shipped TinyVLM (seeded)")
    t.add_argument("--world", choices=sorted(WORLDS), default="tiny", help="and its TinyVLM (tiny)")
    t.add_argument("--out", help="the editor's folder (default: assets/mend_tinyvlm[_easyvqa])")
    steps = f"meta-training steps, an edit each (default {MENDConfig.steps})"
    t.add_argument("--steps", type=cli.POSITIVE_INT, default=MENDConfig.steps, help=steps)
    seed = f"the first of the {MENDConfig.worlds} training worlds (default 2001; not 0..1002)"
    t.add_argument("--seed", type=int, default=2001, help=seed)
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no bar")
    cli.add_threads(t)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    chosen = WORLDS[args.world]
    out = args.out or chosen.editor
    cfg = MENDConfig(steps=args.steps)
    seeds = range(args.seed, args.seed + cfg.worlds)
    try:
        check_seeds(seeds)
        cli.claim_output(out, folder=True)
        backbone = TinyVLM.from_pretrained(chosen.model)
        examples = [e for s in seeds for e in chosen.examples(s)]
    except (ValueError, OSError, RuntimeError) as e:  # easy-VQA missing: a RuntimeError
        parser.exit(2, f"mend.py train: error: {e}\n")
    torch.set_num_threads(args.threads)
    start = time.time()
    net, history = train(backbone, examples, cfg, args.seed, args.progress)
    seconds = time.time() - start
    last = {k: sum(h[k] for h in history[-100:]) / len(history[-100:]) for k in history[0]}
    training = dict(world=args.world, seeds=[seeds[0], seeds[-1]], examples=len(examples))
    MEND(backbone, net).save(out, training | dict(seconds=round(seconds), last_100=last))
    losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"trained {cfg.steps} steps in {seconds:.0f} s (last 100: {losses}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
