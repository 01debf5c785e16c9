"""Write the student starter: a copy of the project in which the body of every task function is
``raise NotImplementedError("Task N: ...")``, its signature and docstring kept.

    python assignments/release.py --out DIR     # DIR must not exist, or be empty

DIR is made and a file written and deleted in it before any work (only trying tells: root passes
every permission check); if the run fails, what it made is removed again.

The project's own tests/ are left out: they test the finished method and would fail on the stubs;
the graders in assignments/ take their place (the starter's pytest.ini points at them).
The routing hook is Router.route and the parts it ties together (query, hold, rewrite), all
stubbed; GraceRouter.rewrite (the GRACE baseline's hook) is stubbed too, as part of Task 3: GRACE's
router is a Router with its own rewrite, so leaving it would hand out half of Router.rewrite.
After writing, every non-trivial statement of a removed body is looked for among the statements
of the starter's .py files; one found is an error (exit 1) and the starter is deleted. Statements
are compared as ``ast.unparse`` writes them, so line breaks and comments do not matter.
"""

import argparse
import ast
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# file -> function ("Class.method") -> (task, what to implement). A function is looked for in the
# file that names it: if one moves to another file, move its entry here (and in the handout).
TASKS = {
    "balancedit.py": {
        "distance": (
            2,
            "d(q, k) for every pair, (B, D), (N, D) -> (B, N) float32: 1 - cos(q, k), "
            "clamped at 0, or ||q - k||_2 (exact: d(k, k) == 0)",
        ),
        "radius": (
            1,
            "Eq. 3 as in Appendix D (Eq. 10): eps = alpha * d_pos + (1 - alpha) * d_neg, "
            "kept between the two",
        ),
        "Codebook.lookup": (
            2,
            "Eq. 1's decision: j = argmin_k d(q, k), dist = d(q, k_j), hit = dist <= eps_j",
        ),
        "prompt_key": (
            3,
            "the key: the mean of h over each row's prompt positions (pool='last': h at its "
            "last prompt position), (B, T, D), (B, T) -> (B, D) float32",
        ),
        "Router.query": (
            3,
            "q of Eq. 1 for each row, (B, D) float32: the key of h over the row's prompt "
            "positions, pooled with self.pool",
        ),
        "Router.hold": (
            3,
            "the route of each row, (B,): a row without prompt positions (a decoding step) "
            "keeps its prompt's route, held per row in self.held by the handout's four rules",
        ),
        "Router.rewrite": (
            3,
            "Eq. 1's output: a row routed to entry j gets v_j(h) (in float32, cast back) at "
            "every position; every other row keeps out bit for bit",
        ),
        "Router.route": (
            3,
            "Eq. 1 per sample: the call's prompt (self.prompt), the query, the lookup, the held "
            "route; None if no row hits, else the rewritten output",
        ),
        "train_value": (
            4,
            "Eq. 2: Adam on the value's parameters only, loss = LM cross-entropy on the target "
            "tokens (on the tail's cached activations when one is given); return the loss of "
            "each step",
        ),
        "BalancEditor.keys_of": (
            5,
            "the key of each (image, question), (B, D), exactly as the routing hook computes "
            "it (pooled with self.config.pool)",
        ),
        "BalancEditor.positive_question": (
            5,
            "Pos's question R(t): the first training rephrasing, else the first of "
            "backbone.rephrase(question), that T-Gen does not score (not in record.rephrases)",
        ),
        "BalancEditor.probe": (
            5,
            "Eq. 3's probes in one batched forward of (i, t), (i, R(t)) and (the config's "
            "anchor image, t): Probe(k, d(Pos, k), d(Neg, k), the edit's row, its tail)",
        ),
    },
    "baselines.py": {
        "GraceRouter.rewrite": (
            3,
            "GRACE's output: a row routed to entry j gets the entry's vector v at its last "
            "prompt position only; a row with no prompt position, nothing",
        ),
    },
    "evaluate.py": {
        "token_accuracy": (
            6,
            "the mean over samples of the % of a sample's tokens where predicted == reference",
        ),
        "hm": (6, "HM = 3 / (1/T-Gen + 1/I-Gen + 1/Loc); 0 if any is 0, None if any is None"),
    },
}
# Docstrings for the stubs of functions that have none in the project.
DOCS = {
    "Router.route": (
        "The forward hook of layer l (Eq. 1): returns None (keep ``out``) or the new output.\n"
        "\n"
        "``self.prompt(h)`` is the call's prompt mask (B, T) or None; ties ``self.query``,\n"
        "``self.codebook.lookup``, ``self.hold`` and ``self.rewrite``; sets\n"
        "``self.last_index`` (B,) and ``self.last_query`` (B, D)."
    ),
    "GraceRouter.rewrite": (
        "GRACE's output: the entry's vector ``self.codebook.values[j].v`` at the last prompt\n"
        "position of each row routed to entry j (``index`` (B,)), layer l's ``out`` elsewhere."
    ),
}
# Statements that a removed body shares with code the students keep and that give nothing away.
IDIOMS = {
    # train.train_tiny's training loop
    "losses.append(loss.item())",
    "return losses",
    # Router.__init__ starts with no held route
    "self.held = None",
    # GraceRouter.hold (given) holds nothing
    "return index",
    # the batch's loss, as the handout's box gives it, in mend.py's edit gradient
    "loss = backbone(**batch).loss",
    # Codebook.__init__ refuses an unknown metric as distance does
    "raise ValueError(f\"unknown distance {metric!r}; allowed: {CHOICES['distance']}\")",
    # BalancEditor.train reads the config so too
    "cfg = self.config",
    # the batch on the model's device, as GRACE's edit (baselines.py) makes it
    "batch = self.backbone.to_device(self.backbone.encode(images, questions, answers))",
}
COPY = ["README.md", "requirements.txt", ".gitignore", "assets", "assignments"]
# Not in the starter: study.py (its editor with the authors' key restates the probe of Task 5 for
# an ablation), and the teachers' own files in assignments/.
LEFT_OUT = ["study.py", "release.py", "TEACHERS.md"]


def functions(tree: ast.Module):
    """(qualified name, node) of the module's functions and its classes' methods."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef):
                    yield f"{node.name}.{method.name}", method


def statements(nodes) -> set[str]:
    """The simple statements in ``nodes``, nested ones included, each as ``ast.unparse`` writes
    it (on one line, comments dropped). A compound statement (if, for, with, def, ...) does not
    count itself; the statements in its body do."""
    found = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.stmt) and not hasattr(node, "body"):
                found.add(ast.unparse(node))
    return found


def defined_in(name: str) -> list[str]:
    """The project's top-level .py files that define the function ``name`` ("Class.method")."""
    files = []
    for path in sorted(ROOT.glob("*.py")):
        if name in dict(functions(ast.parse(path.read_text()))):
            files.append(path.name)
    return files


def docstring(text: str, pad: str) -> str:
    """``text`` as a docstring, each line indented by ``pad`` (blank lines left blank)."""
    first, *rest = text.split("\n")
    lines = [f'{pad}"""{first}']
    for line in rest:
        lines.append(pad + line if line else "")
    return "\n".join(lines) + '"""\n'


def stub(source: str, table: dict, file: str = "the file") -> tuple[str, set[str]]:
    """The source with each function of ``table`` stubbed, and the statements removed."""
    lines = source.splitlines(keepends=True)
    found = dict(functions(ast.parse(source)))
    for name in table:
        if name not in found:
            elsewhere = ", ".join(defined_in(name)) or "no top-level .py file"
            sys.exit(
                f"release.py: {file} defines no {name} (defined in: {elsewhere}); TASKS must "
                "name the file each task function is in"
            )
    removed = set()
    # Bottom up, so that the line numbers of the functions above stay valid.
    for name in sorted(table, key=lambda n: -found[n].lineno):
        node = found[name]
        task, what = table[name]
        first = node.body[0]
        has_doc = ast.get_docstring(node, clean=False) is not None
        body = node.body[1:] if has_doc else node.body
        removed |= statements(body)
        if has_doc:
            start = first.end_lineno  # 0-based index of the first line after the docstring
        else:
            start = first.lineno - 1
            while lines[start - 1].strip().startswith("#"):
                start -= 1  # comments between the signature and the body go too
        pad = " " * first.col_offset
        new = []
        if not has_doc and name in DOCS:
            new.append(docstring(DOCS[name], pad))
        message = f"Task {task}: {what}"
        new.append(f"{pad}raise NotImplementedError({message!r})\n")
        lines[start : node.end_lineno] = new
    return "".join(lines), removed


def leaks(out: Path, removed: set[str]) -> list[str]:
    """The removed statements (12 characters or more, not IDIOMS) found among the statements of
    the starter's .py files."""
    wanted = {s for s in removed if len(s) >= 12} - IDIOMS
    kept = set()
    for path in out.rglob("*.py"):
        kept |= statements(ast.parse(path.read_text()).body)
    return sorted(wanted & kept)


def prepare(out: Path) -> Path | None:
    """Make ``out`` (new, or an empty folder) and write and delete a file in it, before any
    work: root passes every os.access check, so only trying tells. Returns the topmost folder
    this made (None if ``out`` was there), for ``undo``. Raises OSError, having undone it."""
    made = None
    for folder in [*reversed(out.parents), out]:
        if not folder.exists():
            made = made or folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".release-probe"
        probe.write_text("")
        probe.unlink()
    except OSError:
        undo(out, made)
        raise
    return made


def undo(out: Path, made: Path | None) -> None:
    """Remove what this run wrote: the folders it made, or what it put in a folder that was
    there (empty) before."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_starter(out: Path) -> set[str]:
    """Copy the project into ``out`` and stub the task functions; returns the removed
    statements."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", *LEFT_OUT)
    for name in [p.name for p in ROOT.glob("*.py") if p.name not in LEFT_OUT] + COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=skip)
        elif src.exists():
            shutil.copy2(src, out / name)
    ini = (ROOT / "pytest.ini").read_text()
    ini = re.sub(r"(?m)^testpaths\s*=.*$", "testpaths = assignments", ini)
    # The graders' own summary lists each failure with its message, above the grade table:
    # no tracebacks, and no pytest summary after the table.
    ini = re.sub(r"(?m)^addopts\s*=.*$", r"\g<0> --tb=no -rN", ini)
    (out / "pytest.ini").write_text(ini)
    removed = set()
    for name, table in TASKS.items():
        text, gone = stub((ROOT / name).read_text(), table, name)
        ast.parse(text)  # the starter must import
        (out / name).write_text(text)
        removed |= gone
    return removed


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
    try:
        made = prepare(out)
    except OSError as e:
        print(f"release.py: error: --out {out} cannot be written: {e}", file=sys.stderr)
        return 2
    try:
        removed = write_starter(out)
        found = leaks(out, removed)
    except BaseException:
        undo(out, made)
        raise
    if found:
        undo(out, made)
        print(
            "release.py: error: solution statements would survive in the starter (deleted it):\n  "
            + "\n  ".join(found),
            file=sys.stderr,
        )
        return 1
    n = sum(map(len, TASKS.values()))
    print(
        f"wrote the starter to {out}: {n} task functions stubbed in {', '.join(TASKS)}; "
        "no solution statement survives; the project's tests/ are left out (the graders are "
        "in assignments/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
