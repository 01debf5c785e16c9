"""Write the student starter: a copy of the project in which the body of every task function is
``raise NotImplementedError("Task N: ...")``, its signature and docstring kept.

    python assignments/release.py --out DIR     # DIR must not exist, or be empty

The project's own tests/ are left out: they test the finished method and would fail on the stubs;
the graders in assignments/ take their place (the starter's pytest.ini points at them).
GraceRouter.route (the GRACE baseline's hook) is stubbed too, as part of Task 3: it shares its
plumbing with Router.route, so leaving it would hand out half of that solution.
After writing, every non-trivial line of a removed body is looked for in the starter's .py files;
one found is an error (exit 1) and the starter is deleted.
"""

import argparse
import ast
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {  # file -> function ("Class.method") -> (task, what to implement)
    "balancedit.py": {
        "distance": (
            1,
            "d(q, k) for every pair, (B, D), (N, D) -> (B, N) float32: 1 - cos(q, k), clamped at 0, "
            "or ||q - k||_2 (exact: d(k, k) == 0)",
        ),
        "radius": (
            1,
            "Eq. 3 as in Appendix D (Eq. 10): eps = alpha * d_pos + (1 - alpha) * d_neg, kept between the two",
        ),
        "Codebook.lookup": (
            2,
            "Eq. 1's decision: j = argmin_k d(q, k), dist = d(q, k_j), hit = dist <= eps_j",
        ),
        "prompt_mean": (
            3,
            "the key: the mean of h over each row's prompt positions (pool='last': h at its last "
            "prompt position), (B, T, D), (B, T) -> (B, D) float32",
        ),
        "Router.route": (
            3,
            "Eq. 1 per sample: a row whose query hits entry j gets v_j(h), every other row layer l's "
            "output untouched; decoding steps keep their prompt's route",
        ),
        "train_value": (
            4,
            "Eq. 2: Adam on the value's parameters only, loss = LM cross-entropy on the target tokens "
            "(cached activations when cache); return the loss of each step",
        ),
        "BalancEditor.keys_of": (
            4,
            "the key of each (image, question), (B, D), exactly as the routing hook computes it "
            "(pooled with self.config.pool)",
        ),
        "BalancEditor.positive": (
            4,
            "Pos's question R(t): a training rephrasing, else the backbone's, never one T-Gen scores",
        ),
    },
    "evaluate.py": {
        "GraceRouter.route": (
            3,
            "GRACE's hook: the query is layer l's input at each row's last prompt position; a hit "
            "writes the entry's vector v at that position only",
        ),
        "token_accuracy": (
            5,
            "the mean over samples of the % of a sample's tokens where predicted == reference",
        ),
        "hm": (5, "HM = 3 / (1/T-Gen + 1/I-Gen + 1/Loc); 0 if any is 0, None if any is None"),
    },
}
DOCS = {  # docstrings for the stubs of hooks that have none in the project
    "Router.route": "The forward hook of layer l (Eq. 1): returns None (keep ``out``) or the new output.\n\n"
    "Sets ``self.last_index`` (B,) and ``self.last_query`` (B, D); ``self.mask`` is the backbone's\n"
    'prompt mask (B, T) or None; ``self.pool`` the key\'s pooling ("mean" or "last");\n'
    "``self.held`` is yours, to hold routes while decoding.",
    "GraceRouter.route": "GRACE's forward hook: returns None (keep ``out``) or the new output; sets ``self.last_index``.",
}
# Generic lines that a removed body shares with code the students keep and that give nothing away:
# models.train_tiny's training loop, and Grace.at_key, which runs the backbone under a recording hook.
IDIOMS = {"losses.append(loss.item())", "return losses", "self.backbone(**batch)"}
COPY = ["README.md", "requirements.txt", ".gitignore", "assets", "assignments"]


def functions(tree):
    """(qualified name, node) of the module's functions and its classes' methods."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from (
                (f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef)
            )


def stub(source: str, table: dict) -> tuple[str, list[str]]:
    """The source with each function of ``table`` stubbed, and the lines removed."""
    lines, found = source.splitlines(keepends=True), dict(functions(ast.parse(source)))
    if missing := set(table) - set(found):
        sys.exit(f"release.py: no function {sorted(missing)} to stub")
    removed = []
    for name in sorted(table, key=lambda n: -found[n].lineno):  # bottom up: line numbers stay valid
        node, (task, what) = found[name], table[name]
        first = node.body[0]
        has_doc = (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        )
        start = (
            first.end_lineno if has_doc else first.lineno - 1
        )  # 0-based index of the first line to replace
        while not has_doc and lines[start - 1].strip().startswith("#"):
            start -= 1  # comments between the signature and the body go too
        pad = " " * first.col_offset
        new = (
            []
            if has_doc or name not in DOCS
            else [
                pad
                + '"""'
                + DOCS[name].replace("\n", "\n" + pad).replace(pad + "\n", "\n")
                + '"""\n'
            ]
        )
        new.append(f"{pad}raise NotImplementedError({f'Task {task}: {what}'!r})\n")
        removed += lines[start : node.end_lineno]
        lines[start : node.end_lineno] = new
    return "".join(lines), removed


def code(line: str) -> str:
    """A line without its comment, whitespace collapsed."""
    return " ".join(re.sub(r"(^|\s)#.*$", "", line).split())


def leaks(out: Path, removed: list[str]) -> list[str]:
    """The removed lines (12 characters or more of code, not IDIOMS) found in the starter's .py files."""
    wanted = {code(r) for r in removed} - {""}
    wanted = {w for w in wanted if len(w) >= 12} - IDIOMS
    text = [code(line) for p in out.rglob("*.py") for line in p.read_text().splitlines()]
    return sorted(w for w in wanted if any(w in t for t in text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the BalancEdit assignment's student starter."
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="the starter's folder (new or empty)"
    )
    out = parser.parse_args(argv).out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(
            f"release.py: error: --out {out} exists and is not an empty folder; choose a new one",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for name in [p.name for p in ROOT.glob("*.py")] + COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src,
                out / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis"),
            )
        elif src.exists():
            shutil.copy2(src, out / name)
    ini = (ROOT / "pytest.ini").read_text()
    (out / "pytest.ini").write_text(
        re.sub(r"(?m)^testpaths\s*=.*$", "testpaths = assignments", ini)
    )
    removed = []
    for name, table in TASKS.items():
        text, lines = stub((ROOT / name).read_text(), table)
        ast.parse(text)  # the starter must import
        (out / name).write_text(text)
        removed += lines
    if found := leaks(out, removed):
        shutil.rmtree(out)
        print(
            "release.py: error: solution lines would survive in the starter (deleted it):\n  "
            + "\n  ".join(found),
            file=sys.stderr,
        )
        return 1
    n = sum(map(len, TASKS.values()))
    print(
        f"wrote the starter to {out}: {n} task functions stubbed in {', '.join(TASKS)}; no solution line survives; "
        "the project's tests/ are left out (the graders are in assignments/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
