"""The README is the front door and docs/ the rest: the README's Python example must run, every
command of the README and of docs/*.md must parse, the set-up/test commands must be what CI runs,
the file map must say what each module says of itself, the results table must be what `python
evaluate.py` measures (and tell the paper's story), and every link must lead somewhere."""

import ast
import re
import shlex
from pathlib import Path

import pytest

import bench
import cli
import easyvqa
import evaluate
import study
import train
import world

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {"README.md": README}  # the README and every docs/*.md, by path: where commands are read
DOCS.update({f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))})
PARSERS = {
    "evaluate.py": cli.parse_args,
    "world.py": lambda argv: world.build_parser().parse_args(argv),
    "train.py": lambda argv: train.build_parser().parse_args(argv),
    "bench.py": lambda argv: bench.build_parser().parse_args(argv),
    "study.py": study.parse_args,
    "easyvqa.py": lambda argv: easyvqa.build_parser().parse_args(argv),
}


def _commands():
    """Every `python X.py ...` line of the bash blocks of the README and docs/ (continuations
    joined)."""
    blocks = [b for text in DOCS.values() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("python ") and line.split()[1] in PARSERS:
                yield line


def test_readme_opens_with_a_python_example_that_runs():
    """Load TinyVLM and a record, edit, generate before and after, remove: the example's asserts."""
    example = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    assert README.index("```python") < README.index("```bash")  # the first thing a reader sees
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["before"] == [namespace["record"].answer] != [namespace["record"].target]
    assert namespace["report"].d_pos < namespace["report"].radius < namespace["report"].d_neg
    shape, colour = re.search(r"on an? (\w+) (\w+)\n", example).group(2, 1)  # "a green diamond"
    assert world.KIND_NAMES[(shape, colour)] == namespace["record"].answer  # what record 0 shows


def test_readme_commands_parse():
    commands = list(_commands())
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line)[2:]
        PARSERS[shlex.split(line)[1]](argv)  # exits (fails) on a bad option


def test_readme_file_map_says_what_each_module_says_first():
    """Every top-level module is in the file map, beside its docstring's opening sentence."""
    files = README.split("\n## Files\n")[1].split("\n## ")[0]
    said = dict(re.findall(r"^\| `(\w+\.py)` \| (.+?) \|$", files, flags=re.M))
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert sorted(said) == modules
    for name in modules:
        doc = ast.get_docstring(ast.parse((ROOT / name).read_text()))
        first = " ".join(doc.split("\n\n")[0].split())  # the opening paragraph, one line
        assert said[name] == first, name


def test_readme_setup_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("pip install -r requirements.txt", "python -m pytest"):
        assert command in README and command in ci


def _table_after(command):
    """The first markdown table after ``command`` (the start of a bash block) in the README or
    docs/: its header cells and {first cell: the numbers}."""
    text = next(text for text in DOCS.values() if command in text)
    lines = text[text.index(command) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, _, *rows = table  # the second row is the |---| line
    return header, {row[0]: [float(c) for c in row[1:]] for row in rows}


def _table(text, first):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0] in first:
            rows[cells[0]] = [float(c) if c not in ("-",) else None for c in cells[1:]]
    return rows


def test_readme_results_are_what_the_main_job_measures(readme_jobs):
    """`python evaluate.py` (~40 s), run as a command: the README's table, the paper's story,
    and no warning in its output."""
    output, result = readme_jobs["main"]
    assert "warn" not in output.lower(), output
    readme = _table(README, evaluate.METHODS)
    assert set(readme) == set(evaluate.METHODS)
    for method, row in readme.items():
        measured = [result[method][k] for k in evaluate.COLUMNS]
        assert row[:11] == pytest.approx(measured, abs=0.006), method  # to the printed digit
    be = result["balancedit"]
    ft = result["ft"]
    grace = result["grace"]
    assert be["acc"] == 100.0
    assert be["hm"] > ft["hm"] and be["hm"] > grace["hm"]
    assert ft["loc"] < be["loc"] - 20 and grace["i_gen"] < be["i_gen"]


def test_readme_sequential_table_is_what_the_sequential_protocol_measures(readme_jobs):
    """`python evaluate.py --protocol sequential`, run as a command: the README's table, to the
    printed digit. No score rests on a float tie (GRACE keeps a key its ball grows to cover
    inside the ball)."""
    output, result = readme_jobs["sequential"]
    assert "warn" not in output.lower(), output
    header, readme = _table_after("```bash\npython evaluate.py --protocol sequential ")
    assert header == ["Method", *evaluate.HEADERS.values()]
    assert list(readme) == ["ft", "grace", "balancedit", "mend", "ike"]
    for method, row in readme.items():
        measured = [result[method][k] for k in evaluate.COLUMNS]
        assert row == pytest.approx(measured, abs=0.006), method


OUTPUTS = {  # what each program's command line writes: (args -> a path or None, a folder?)
    "evaluate.py": (cli.output_path, False),
    "study.py": (lambda args: Path(args.out), False),
    "bench.py": (lambda args: Path(args.json), False),
    "world.py": (lambda args: Path(args.out), True),  # make-sample fills a folder
    "train.py": (lambda args: Path(args.out) if args.command != "check" else None, True),
    "easyvqa.py": (lambda args: Path(args.out) if args.command != "check" else None, True),
}


def test_readme_commands_can_write_their_outputs_in_a_fresh_clone(tmp_path, monkeypatch):
    """Run where a fresh clone has no results/ folder: every command's output path can
    be claimed by trying (its folders made, a file created in it), and the claim leaves
    nothing behind."""
    monkeypatch.chdir(tmp_path)
    claimed = []
    for line in _commands():
        argv = shlex.split(line)
        args = PARSERS[argv[1]](argv[2:])
        where, folder = OUTPUTS[argv[1]]
        path = where(args)
        if path is None:  # a command that writes nothing (train.py check)
            continue
        cleanup = cli.claim_output(path, folder=folder)
        assert (path if folder else path.parent).is_dir(), line
        cleanup()
        assert list(tmp_path.iterdir()) == [], line
        claimed.append(path)
    assert Path("results/main.json") in claimed and len(claimed) >= 10


def test_readme_picture_command_runs_in_a_fresh_clone(tmp_path, monkeypatch):
    """The quick picture command (docs/results.md), run whole where results/ does not exist
    yet."""
    monkeypatch.chdir(tmp_path)
    line = next(c for c in _commands() if " show-edit " in c)
    assert cli.main([*shlex.split(line)[2:], "--no-progress"]) == 0
    out = cli.output_path(cli.parse_args(shlex.split(line)[2:]))
    assert out.stat().st_size > 0 and out.with_suffix(".json").stat().st_size > 0


def test_readme_is_short_and_its_links_lead_somewhere():
    """The README is the front door (at most 300 lines); every relative link of the README and
    docs/ names a file that exists, and a #section of a markdown file one of its headings."""
    assert len(README.splitlines()) <= 300
    for where, text in DOCS.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            name, section = re.fullmatch(r"([^#]*)#?(.*)", target).groups()
            path = (ROOT / where).parent / name if name else ROOT / where
            assert path.exists(), (where, target)
            if section:
                headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
                assert section in [_anchor(h) for h in headings], (where, target)


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
