"""Pictures that teach Eq. 3: the alpha sweep, one edit against its radius, a codebook, the study.

The alpha sweep is paper Fig. 5 and the codebook's keys and balls in 2-D paper Fig. 7; the
study's curves show the scores as the codebook fills. Drawn with matplotlib (Agg, to PNG files);
``python evaluate.py sweep-alpha | show-edit | show-codebook`` and ``python study.py`` call them.
"""

import math
from pathlib import Path

import torch

import data
import journal
from balancedit import BalancEditor, distance

PLOTTED = {  # the scores the curves plot, and their labels
    "acc": "Acc",
    "t_gen": "T-Gen",
    "i_gen": "I-Gen",
    "loc": "Loc",
    "q_loc": "q_loc",
    "hm": "HM",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with journal.replacing(path) as temporary:  # a kill leaves the old picture or the new one
        fig.savefig(temporary, dpi=120, bbox_inches="tight")  # tight: a legend outside the axes
    _pyplot().close(fig)
    print(f"wrote {path}")


def plot_sweep(results: dict[str, dict], parameter: str, path: Path) -> None:
    """Paper Fig. 5: each metric against the swept parameter."""
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    for key, label in PLOTTED.items():
        ax.plot(
            [float(v) for v in results],
            [math.nan if r[key] is None else r[key] for r in results.values()],
            marker="o",
            label=label,
        )
    ax.set(
        xlabel=parameter,
        ylabel="%",
        ylim=(-2, 102),
        title=f"BalancEdit against {parameter} (paper Fig. 5)",
    )
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_study(result: dict, path: Path) -> None:
    """The study's curves: each metric against the edits in the codebook (1: single edits), one line
    per method, the mean over the test worlds with +- one standard deviation as error bars."""
    sizes = [1, *map(int, result["sequential"])]
    runs = [result["single"], *result["sequential"].values()]  # {method: {column: stats}} each
    panels = list(PLOTTED.items())[1:]  # Acc is 100 throughout: no panel
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(3 * len(panels), 3.2), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        for name in runs[-1]:
            cells = [r[name][key] for r in runs]
            ax.errorbar(
                sizes,
                [c["mean"] for c in cells],
                [c["std"] for c in cells],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.set(
            xscale="log",
            xticks=sizes,
            xticklabels=sizes,
            xlabel="edits in the codebook",
            title=label,
            ylim=(-2, 102),
        )
        ax.minorticks_off()
    axes[0].set_ylabel("% (mean +- std over test worlds)")
    axes[0].legend(fontsize="small", loc="lower left")
    _save(fig, path)


def edit_probes(editor: BalancEditor, record) -> tuple[dict, dict]:
    """Edit ``record`` and measure, for every probe, its distance to the new key and whether its
    generated answer changed. Returns the edit's report (as a dict) and {group: [(d, changed)]}."""
    backbone = editor.backbone
    anchor = editor.config.negative
    negative = data.anchor_image(anchor, record.image.size, seed=editor.config.seed)

    def split(samples):  # the images and the questions of samples
        return [s.image for s in samples], [s.question for s in samples]

    groups = {  # group -> (images, questions); in scope: the answer should change
        "positive (a training rephrasing)": ([record.image], [editor.positive_question(record)]),
        "rephrasings (T-Gen)": ([record.image] * len(record.rephrases), record.rephrases),
        "other images (I-Gen)": (
            record.rephrase_images,
            [record.question] * len(record.rephrase_images),
        ),
        "near misses (Loc)": split(record.locality),
        "same images, other questions (q_loc)": split(record.q_locality),
        "unrelated (m_loc)": split(record.m_locality),
        f"negative ({anchor} image)": ([negative], [record.question]),
    }
    # Only the groups that have samples, each sample with an image.
    groups = {g: v for g, v in groups.items() if v[0] and all(im is not None for im in v[0])}
    before = {g: backbone.generate(*v) for g, v in groups.items()}
    report = editor.edit(record)
    k = editor.codebook.keys[report.index]  # (D,)
    probes = {}
    with editor.attached():
        for g, (images, questions) in groups.items():
            q = editor.keys_of(images, questions)  # (B, D)
            d = distance(q, k[None], editor.config.distance)[:, 0].tolist()  # (B,)
            after = backbone.generate(images, questions)
            probes[g] = [(di, a != b) for di, a, b in zip(d, after, before[g])]
    drawn = {
        "d_pos": report.d_pos,
        "d_neg": report.d_neg,
        "radius": report.radius,
        "alpha": editor.config.alpha,
        "target": record.target,
    }
    return drawn, probes


def show_edit(report: dict, probes: dict, path: Path, title: str) -> None:
    """One edit on the distance axis: each probe at d(q, k), filled if its answer changed; the
    radius eps (Eq. 3) and the range it sweeps between d(Pos, k) (alpha = 1) and d(Neg, k)
    (alpha = 0), each end labelled. Green: as it should be (in scope and changed, or out of
    scope and kept); red: not. The legend sits below the axis, clear of the probes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(probes) + 1.6))
    alpha = report["alpha"]
    d_pos = report["d_pos"]
    d_neg = report["d_neg"]
    ax.axvspan(min(d_pos, d_neg), max(d_pos, d_neg), color="0.9", label="eps for alpha 1 -> 0")
    eq3 = f"eps = {alpha:g} d(Pos, k) + {1 - alpha:g} d(Neg, k) = {report['radius']:.3f} (Eq. 3)"
    ax.axvline(report["radius"], color="k", label=eq3)
    top = ax.get_xaxis_transform()  # x in data, y in axes: 1 is the top of the axis
    for x, name in ((d_pos, "d(Pos, k)"), (d_neg, "d(Neg, k)")):
        ax.text(x, 1.01, f"{name}\n{x:.3f}", transform=top, ha="center", va="bottom")
    for y, (group, points) in enumerate(probes.items()):
        in_scope = group.split(" ")[0] in ("positive", "rephrasings", "other")
        for d, changed in points:
            colour = "g" if changed == in_scope else "r"
            ax.scatter(
                [d],
                [y],
                s=60,
                edgecolors=colour,
                facecolors=colour if changed else "none",
                zorder=3,
            )
    # Legend entries for the markers (empty scatters draw nothing).
    ax.scatter([], [], s=60, color="0.4", label="filled: the answer changed")
    ax.scatter([], [], s=60, edgecolors="0.4", facecolors="none", label="hollow: it was kept")
    ax.scatter([], [], s=60, color="g", label="green: as it should be")
    ax.scatter([], [], s=60, color="r", label="red: not")
    ax.set_yticks(range(len(probes)), list(probes))
    ax.set(xlabel="d(q, k): the probe's distance to the edit's key", ylim=(-0.7, len(probes) - 0.3))
    ax.set_title(title, pad=30)
    ax.invert_yaxis()
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    _save(fig, path)


def show_codebook(editor: BalancEditor, records, path: Path) -> dict:
    """Paper Fig. 7: the keys of a codebook, projected on their first two principal directions,
    each with a circle of its ball's radius, coloured by the edit's scope. For the cosine distance
    the keys are normalised first (then 1 - cos = |u - v|^2 / 2, so a ball of radius eps has
    Euclidean radius sqrt(2 eps)). A projection only shrinks distances: circles that overlap need
    not be balls that do."""
    cb = editor.codebook
    keys = cb.keys  # (N, D)
    if cb.metric == "cos":
        keys = torch.nn.functional.normalize(keys, dim=-1)
    centred = keys - keys.mean(dim=0)
    directions = torch.linalg.svd(centred, full_matrices=False).Vh[:2]  # (2, D): the first two
    xy = (centred @ directions.T).cpu()  # (N, 2)
    radii = [math.sqrt(2 * r) if cb.metric == "cos" else r for r in cb.radii.tolist()]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    scope = {(r.question, r.target): r.category or "other" for r in records}  # of each edit
    scopes = []
    for asked, target in zip(cb.asked, cb.targets):  # asked: None for an entry added by hand
        question = asked.question if asked is not None else None
        scopes.append(scope.get((question, target), "other"))
    colours = {c: f"C{i}" for i, c in enumerate(sorted(set(scopes)))}
    for (x, y), r, c in zip(xy.tolist(), radii, scopes):
        ax.add_patch(plt.Circle((x, y), r, fill=False, color=colours[c], alpha=0.5))
        ax.scatter([x], [y], s=12, color=colours[c])
    for c, colour in colours.items():
        ax.scatter([], [], color=colour, label=f"{c}-scope edits")
    ax.set(
        aspect="equal",
        title=f"{len(cb)} entries after sequential edits (paper Fig. 7)",
        xlabel="first principal direction of the keys",
        ylabel="second",
    )
    ax.autoscale_view()
    ax.legend(fontsize="small")
    _save(fig, path)
    return {"xy": xy.tolist(), "radius_in_plane": radii, "targets": cb.targets}
