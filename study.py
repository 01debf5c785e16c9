"""Results that survive another world: the main comparison on fresh samples of the TinyVLM world.

A table from one sample, with alpha tuned on that same sample, proves little. Here each method's one
radius knob (BalancEdit's alpha, GRACE's eps0) is chosen by HM on dev worlds and then frozen, and every
method runs on test worlds it never saw: ``data.make_records(seed)`` for seeds 1..N, disjoint from the
shipped sample's seed 0 and from the dev seeds. Single edits, and sequential edits at 10, 20 and 40
(how generality and locality fall as the codebook fills); mean +- std over the test seeds.

    python evaluate.py study [--seeds 5] [--out results/study.json]   # also .md and .png beside it
    python evaluate.py ablate-key [--seeds 5]                         # three keys, tuned the same way
"""

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch

import data
import evaluate as ev
import pictures
from balancedit import BalancEditor, Router, prompt_mean

DEV_SEEDS = (1001, 1002)  # tuning worlds; the test worlds are 1..N (N <= 1000)
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # BalancEdit's grid for alpha (Eq. 3)
EPS0S = (0.5, 1.0, 2.0, 4.0, 8.0)  # GRACE's grid for eps0 (Euclidean, at TinyVLM's layer)
SIZES = (10, 20, 40)  # sequential: edits in the codebook
N_RECORDS = 40  # records per world (make_records' default)


# ---------------- The authors' key, for ablate-key only
class EveryPositionRouter(Router):
    """The query over every attended position of a full forward, the teacher-forced answer included;
    a KV-cache decoding step (prompt_mask of one False column) still holds its prompt's route."""

    def read_mask(self, model, args, kwargs):
        prompt, every = kwargs.get("prompt_mask"), kwargs.get("attention_mask")
        self.mask = every.bool() if prompt is not None and every.shape == prompt.shape else prompt


class EveryPosition(BalancEditor):
    """BalancEdit with the authors' key: the mean of h^{l-1} over every position of the edit's
    teacher-forced input, the target answer included (for k, Pos and Neg alike)."""

    def keys_of(self, images, questions) -> torch.Tensor:
        batch, seen = (
            self.backbone.to_device(
                self.backbone.encode(images, questions, [self.target] * len(questions))
            ),
            [],
        )
        with (
            torch.no_grad(),
            self.layer.register_forward_hook(lambda layer, args, out: seen.append(args[0])),
        ):
            self.backbone(**batch)
        every = batch["attention_mask"].bool()  # (B, T)
        return prompt_mean(seen[0].reshape(*every.shape, -1), every)  # (B, D)

    def edit(self, record):
        self.target = record.target
        return super().edit(record)

    def attached(self) -> Router:
        return EveryPositionRouter(self.backbone, self.layer_path, self.codebook)


# ---------------- The rows: name -> (the knob tuned on the dev worlds, its grid, make(backbone, cfg, value))
STUDY = {
    "base": (None, (None,), None),
    "ft": (None, (None,), lambda b, cfg, v: ev.FineTune(b, cfg)),
    "grace": ("eps0", EPS0S, lambda b, cfg, v: ev.Grace(b, cfg, eps0=v)),
    "balancedit": (
        "alpha",
        ALPHAS,
        lambda b, cfg, v: BalancEditor(b, replace(cfg, alpha=v, pool="mean")),
    ),
    "balancedit_last": (
        "alpha",
        ALPHAS,
        lambda b, cfg, v: BalancEditor(b, replace(cfg, alpha=v, pool="last")),
    ),
}
KEYS = {  # ablate-key: BalancEdit with each key
    "prompt mean (ours)": STUDY["balancedit"],
    "every position (authors' code)": (
        "alpha",
        ALPHAS,
        lambda b, cfg, v: EveryPosition(b, replace(cfg, alpha=v)),
    ),
    "last prompt token (GRACE's)": STUDY["balancedit_last"],
}


def stats(results: list[dict]) -> dict:
    """{column: {"mean", "std", "per_seed"}} over the test worlds (std: the sample's, 0 for one)."""
    out = {}
    for column in (*ev.COLUMNS, "seconds_per_edit"):
        xs = [r[column] for r in results]
        ok = [x for x in xs if x is not None]
        out[column] = {
            "mean": statistics.fmean(ok) if ok else None,
            "std": statistics.stdev(ok) if len(ok) > 1 else 0.0 if ok else None,
            "per_seed": xs,
        }
    return out


def compare(backbone, cfg, rows: dict, seeds: list[int], sizes, progress: bool = True) -> dict:
    """Tune each row's knob by mean HM over the dev worlds (single edits; ties: the first in the grid),
    freeze it, then run every row on the test worlds: single edits, and sequential at each of ``sizes``."""
    worlds = {}

    def world(seed):  # the records of a world and their pre-edit references, made once
        if seed not in worlds:
            records = data.make_records(seed, N_RECORDS)
            worlds[seed] = records, ev.references(backbone, records, progress=False)
        return worlds[seed]

    n_tune = sum(len(DEV_SEEDS) * len(grid) for knob, grid, _ in rows.values() if knob)
    n_test = len(seeds) * sum(1 + len(sizes) * (make is not None) for _, _, make in rows.values())
    bar = ev.progress_bar(range(n_tune + n_test), progress, "study")

    def run(name, seed, protocol, n, value):
        knob = f" {rows[name][0]}={value}" if value is not None else ""
        bar.set_description(
            f"world {seed}: {name}{knob}, "
            + ("single edits" if protocol == "single" else f"{n} edits")
        )
        records, refs = world(seed)
        make = rows[name][2]
        if make is None:
            result = ev.run_base(backbone, records, False, refs)
        else:
            result = ev.PROTOCOLS[protocol](
                make(backbone, cfg, value), backbone, records[:n], False, refs[:n]
            )
        bar.update()
        return result

    tuned = {}
    for name, (knob, grid, _) in rows.items():
        if knob:
            hm = {
                v: statistics.fmean(run(name, s, "single", N_RECORDS, v)["hm"] for s in DEV_SEEDS)
                for v in grid
            }
            tuned[name] = {
                knob: max(grid, key=hm.get),
                "dev_hm": {str(v): x for v, x in hm.items()},
            }
    knob = {name: tuned[name][rows[name][0]] if name in tuned else None for name in rows}
    single = {
        name: stats([run(name, s, "single", N_RECORDS, knob[name]) for s in seeds]) for name in rows
    }
    sequential = {
        str(n): {
            name: stats([run(name, s, "sequential", n, knob[name]) for s in seeds])
            for name, (_, _, make) in rows.items()
            if make is not None
        }
        for n in sizes
    }
    bar.close()
    return {
        "seeds": {"dev": list(DEV_SEEDS), "test": seeds},
        "tuned": tuned,
        "single": single,
        "sequential": sequential,
    }


def table(results: dict[str, dict], first: str = "Method") -> str:
    """Markdown: one row per method, mean +- std of each column over the test worlds."""
    lines = [f"| {first} | " + " | ".join(ev.HEADERS) + " |", "|" + "---|" * (len(ev.HEADERS) + 1)]
    for name, r in results.items():
        cells = [
            "-" if r[c]["mean"] is None else f"{r[c]['mean']:.1f} ± {r[c]['std']:.1f}"
            for c in ev.COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(result: dict, title: str) -> str:
    """The markdown of a comparison: the tuned knobs, single edits, then each sequential size."""
    knobs = ", ".join(
        f"{name} {k}={v[k]}" for name, v in result["tuned"].items() for k in v if k != "dev_hm"
    )
    parts = [
        f"# {title}",
        f"Test worlds (seeds) {result['seeds']['test']}; knobs tuned on the dev worlds "
        f"{result['seeds']['dev']} by HM: {knobs or 'none'}. Cells: mean ± std over the test worlds.",
        "## Single edits",
        table(result["single"]),
    ]
    for n, rows in result["sequential"].items():
        parts += [f"## Sequential, {n} edits", table(rows)]
    return "\n\n".join(parts) + "\n"


HELP = {
    "study": "FT, GRACE and BalancEdit (both keys) on fresh TinyVLM worlds, knobs tuned on dev worlds: "
    "mean +- std over test worlds, single and 10/20/40 sequential edits",
    "ablate-key": "BalancEdit's key three ways (prompt mean, every position as the authors' code, last prompt "
    "token), alpha tuned as in study: single and 40 sequential edits",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``study | ablate-key [options]``: bad options are one error line, exit 2."""
    command = argv[0]
    p = ev._Parser(
        prog=f"evaluate.py {command}",
        description=HELP[command] + ".\n\n" + __doc__.split("\n\n")[1],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--seeds",
        type=ev._number(int, lambda n: 1 <= n <= 1000, "an integer in 1..1000"),
        default=5,
        help=f"test worlds: seeds 1..N (default 5); the dev worlds are seeds {DEV_SEEDS}",
    )
    p.add_argument("--model", help="TinyVLM checkpoint dir (default assets/tinyvlm)")
    p.add_argument("--device", help="torch device (default: cpu)")
    default = f"results/{command.replace('-', '_')}.json"
    p.add_argument(
        "--out",
        default=default,
        help=f"JSON output; the .md (and .png) go beside it (default: {default})",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    c = p.add_argument_group("BalancEditConfig (alpha is tuned; each row sets its key)")
    for option, kwargs in ev.CONFIG_HELP.items():
        if option not in ("alpha", "pool"):
            c.add_argument(f"--{option}", **kwargs)
    args = p.parse_args(argv[1:])
    args.command, args.backbone = command, "tiny"
    return args


def main(args: argparse.Namespace) -> int:
    """Check the options, run the comparison, write the JSON, the .md (and, for study, the .png)."""
    command, out = args.command, Path(args.out)
    prog = f"evaluate.py {command}"
    try:
        ev.check_writable(out)
        ev.check_environment(args)
        cfg = ev.make_config(args)
        backbone = ev.load_backbone(args)
    except (ev.UsageError, OSError, ValueError, RuntimeError) as e:
        ev.build_parser().exit(2, f"{prog}: error: {e}\n")
    torch.manual_seed(cfg.seed)
    rows, sizes = (STUDY, SIZES) if command == "study" else (KEYS, SIZES[-1:])
    result = {
        "model": args.model,
        "config": asdict(cfg),
        **compare(backbone, cfg, rows, list(range(1, args.seeds + 1)), sizes, args.progress),
    }
    text = report(result, HELP[command][0].upper() + HELP[command][1:])
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    if command == "study":
        pictures.plot_study(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
