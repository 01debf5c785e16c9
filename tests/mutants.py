"""Not a test: the course kit's graders against wrong implementations. Each mutant is one
mistake that students make in one task function, patched into a copy of the project; the graders
of that function's task run on the copy (one pytest each, OMP_NUM_THREADS=1), and every mutant
must lose points there. Prints, for each, the score and the graders that caught it with their
messages. 9 minutes of CPU in all, two copies at a time (measured: 19 minutes of wall time on a
2-core machine busy with other jobs; one mutant alone, 20 to 80 s):

    python tests/mutants.py                       # every mutant, then a table
    python tests/mutants.py adam-without-lr       # some of them, by name
    python tests/mutants.py --list                # the names and the mistakes

tests/test_mutations.py checks in the suite that every mutant still applies to the code, and runs
a few of them against the grader that must catch each.
"""

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRADE = re.compile(r"^\s*(task\d)\s+\d+ pts\s+(\d+)/(\d+)\s+passed", re.M)


def _release():
    spec = importlib.util.spec_from_file_location("release", ROOT / "assignments" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = _release()


@dataclass
class Mutant:
    name: str
    function: str  # "Class.method", as release.TASKS names it
    mistake: str  # what the student did, in words
    swaps: list[tuple[str, str]]  # each old text occurs once in the function, and becomes new
    catcher: str  # the grader that must catch it
    says: str  # and a few words that its message must hold

    @property
    def file(self) -> str:
        return next(f for f, table in release.TASKS.items() if self.function in table)

    @property
    def task(self) -> int:
        return release.TASKS[self.file][self.function][0]


# The indentation of each new text is the function's own (it replaces text in place).
MUTANTS = [
    # Task 1: distance and radius
    Mutant(
        "cos-in-half",
        "distance",
        "cosine computed in the inputs' dtype (fp16), cast to float32 at the end",
        [
            ("queries.float(), dim=-1", "queries, dim=-1"),
            ("keys.float(), dim=-1", "keys, dim=-1"),
            (
                "(1.0 - q_hat @ k_hat.T).clamp(min=0.0)",
                "(1.0 - q_hat @ k_hat.T).clamp(min=0.0).float()",
            ),
        ],
        "test_half_precision_inputs_are_compared_in_float32",
        "computed in float32",
    ),
    Mutant(
        "cos-unclamped",
        "distance",
        "1 - cos not clamped at 0 (rounds to -1e-7 for a vector and itself)",
        [("(1.0 - q_hat @ k_hat.T).clamp(min=0.0)", "(1.0 - q_hat @ k_hat.T)")],
        "test_cosine_distance_is_never_negative",
        "clamp it at 0",
    ),
    Mutant(
        "cos-divides-by-norm",
        "distance",
        "normalised by dividing by the norm (a zero vector gives NaN)",
        [
            (
                "F.normalize(queries.float(), dim=-1, eps=1e-8)",
                "queries.float() / queries.float().norm(dim=-1, keepdim=True)",
            ),
            (
                "F.normalize(keys.float(), dim=-1, eps=1e-8)",
                "keys.float() / keys.float().norm(dim=-1, keepdim=True)",
            ),
        ],
        "test_a_zero_vector_is_at_cosine_distance_one_from_everything",
        "must not divide by 0",
    ),
    Mutant(
        "euc-by-matmul",
        "distance",
        "torch.cdist's default mode (a matrix product above 25 vectors: d(k, k) != 0)",
        [("compute_mode=mode", "compute_mode='use_mm_for_euclid_dist_if_necessary'")],
        "test_euclidean_distance_of_a_key_to_itself_is_exactly_zero",
        "exactly 0",
    ),
    Mutant(
        "eq3-main-text",
        "radius",
        "Eq. 3 as the main text prints it: eps = (1 - alpha) d_pos + alpha d_neg",
        [("eps = d_neg + alpha * (d_pos - d_neg)", "eps = d_pos + alpha * (d_neg - d_pos)")],
        "test_radius_on_a_hand_worked_case",
        "the other way round",
    ),
    Mutant(
        "eq3-two-products",
        "radius",
        "Eq. 3 as two products, alpha d_pos + (1 - alpha) d_neg (not monotone in floats)",
        [("eps = d_neg + alpha * (d_pos - d_neg)", "eps = alpha * d_pos + (1 - alpha) * d_neg")],
        "test_radius_shrinks_as_alpha_grows",
        "monotone in alpha",
    ),
    Mutant(
        "alpha-nan-accepted",
        "radius",
        "alpha checked with < and > (NaN passes)",
        [("if not 0.0 <= alpha <= 1.0:", "if alpha < 0.0 or alpha > 1.0:")],
        "test_radius_refuses_alpha_outside_0_1",
        "NaN < 0 and NaN > 1 are both False",
    ),
    # Task 2: the lookup
    Mutant(
        "argmax",
        "Codebook.lookup",
        "argmax instead of argmin: the farthest key",
        [(".min(dim=1)", ".max(dim=1)")],
        "test_lookup_on_a_hand_worked_2d_case",
        "argmax instead of argmin",
    ),
    Mutant(
        "strict-edge",
        "Codebook.lookup",
        "< instead of <=: a query on the edge (or on a radius-0 key) misses",
        [("dist <= self.radii[j]", "dist < self.radii[j]")],
        "test_a_query_on_the_edge_of_a_ball_is_inside",
        "< instead of <=",
    ),
    Mutant(
        "any-ball",
        "Codebook.lookup",
        "a hit if ANY ball holds the query, not the nearest key's",
        [
            (
                "return j, dist, dist <= self.radii[j]",
                "d = distance(queries, self.keys, self.metric)\n"
                "        return j, dist, (d <= self.radii).any(dim=1)",
            )
        ],
        "test_only_the_nearest_entrys_radius_counts",
        "ITS ball",
    ),
    Mutant(
        "nan-hits",
        "Codebook.lookup",
        "hit = not (dist > eps): a NaN query (a decoding step) hits",
        [("dist <= self.radii[j]", "~(dist > self.radii[j])")],
        "test_a_nan_query_never_hits",
        "must never hit",
    ),
    Mutant(
        "empty-at-zero",
        "Codebook.lookup",
        "an empty codebook answers distance 0 instead of inf",
        [
            (
                "torch.full((B,), math.inf, device=queries.device)",
                "torch.zeros(B, device=queries.device)",
            )
        ],
        "test_an_empty_codebook_misses_everything",
        "dist inf",
    ),
    # Task 3: the key and the hooks
    Mutant(
        "mean-with-padding",
        "prompt_key",
        "the mean over every position, padding and answer included",
        [
            (
                "weight = prompt[..., None].float()",
                "weight = torch.ones_like(prompt[..., None]).float()",
            )
        ],
        "test_prompt_key_on_a_hand_worked_case",
        "PROMPT positions only",
    ),
    Mutant(
        "last-is-position-minus-1",
        "prompt_key",
        "pool='last' takes position -1 (the answer, when one follows the prompt)",
        [
            (
                "prompt = prompt & (count == count[:, -1:])",
                "prompt = torch.zeros_like(prompt)\n        prompt[:, -1] = True",
            )
        ],
        "test_prompt_key_last_is_h_at_each_rows_last_prompt_position",
        "LAST PROMPT position",
    ),
    Mutant(
        "whole-batch-by-row-0",
        "Router.route",
        "the whole batch routed by row 0's decision",
        [("torch.where(hit, j, -1)", "torch.where(hit[0], j[0], -1).expand(B).clone()")],
        "test_each_sample_is_routed_on_its_own_key",
        "routed by row 0's decision",
    ),
    Mutant(
        "value-on-output",
        "Router.rewrite",
        "the value applied to the layer's output instead of its input",
        [("self.codebook.values[e](h[rows].float())", "self.codebook.values[e](y[rows].float())")],
        "test_a_hit_replaces_the_layer_by_the_value_of_its_input",
        "the layer's OUTPUT",
    ),
    Mutant(
        "value-in-model-dtype",
        "Router.rewrite",
        "the value called on h in the model's dtype, no float32 cast (fp16/bf16 BLIP-2 crashes)",
        [("self.codebook.values[e](h[rows].float())", "self.codebook.values[e](h[rows])")],
        "test_a_half_precision_model_routes_through_float32_values",
        "v_j(h.float())",
    ),
    Mutant(
        "hold-refreshed-only-on-a-hit",
        "Router.hold",
        "the held route stored only when some row hits: a later all-miss prompt decodes with "
        "a stale route",
        [
            (
                "        self.held = torch.where(prompt.any(dim=1), index, held)  # (B,)\n"
                "        return self.held\n",
                "        index = torch.where(prompt.any(dim=1), index, held)  # (B,)\n"
                "        if (index >= 0).any():\n"
                "            self.held = index\n"
                "        return index\n",
            )
        ],
        "test_a_new_prompt_replaces_the_held_route_even_when_no_row_hits",
        "the route of the earlier prompt",
    ),
    Mutant(
        "hold-per-batch",
        "Router.hold",
        "one held route for the batch (the largest entry) instead of one per row",
        [
            (
                "torch.where(prompt.any(dim=1), index, held)",
                "torch.where(prompt.any(dim=1), index, held.max().expand(len(index)))",
            )
        ],
        "test_the_route_is_held_during_kv_cache_decoding",
        "the hold is per row",
    ),
    Mutant(
        "no-hold",
        "Router.hold",
        "nothing held: each decoding step routes on its own (NaN) query",
        [("self.held = torch.where(prompt.any(dim=1), index, held)", "self.held = index.clone()")],
        "test_the_route_is_held_during_kv_cache_decoding",
        "keeps the route its prompt chose",
    ),
    Mutant(
        "router-ignores-pool",
        "Router.query",
        "the router's query always the mean (self.pool not passed on)",
        [("prompt_key(h, prompt, self.pool)", "prompt_key(h, prompt)")],
        "test_router_with_pool_last_routes_on_the_last_prompt_position",
        "pass self.pool on",
    ),
    Mutant(
        "router-ignores-mask",
        "Router.route",
        "the prompt mask ignored: the query averages every position, padding included",
        [
            (
                "prompt = self.prompt(h)\n",
                "prompt = self.prompt(h)\n"
                "        if prompt is not None:\n"
                "            prompt = torch.ones_like(prompt)\n",
            )
        ],
        "test_the_key_ignores_padding_and_batch_mates",
        "prompt positions only",
    ),
    Mutant(
        "grace-mean-key",
        "Router.route",
        "GRACE's query the mean over the prompt instead of the last prompt position (route "
        "pools the mean itself instead of asking self.query, which GraceRouter's pool sets)",
        [("q = self.query(h, prompt)", "q = prompt_key(h, prompt)")],
        "test_grace_keys_on_the_last_prompt_position_and_writes_there_only",
        "LAST prompt position",
    ),
    Mutant(
        "grace-writes-every-position",
        "GraceRouter.rewrite",
        "GRACE's vector written at every position of a hit row",
        [("new[b, last[b]] = ", "new[b, :] = ")],
        "test_grace_keys_on_the_last_prompt_position_and_writes_there_only",
        "at the key position only",
    ),
    # Task 4: the edit
    Mutant(
        "adam-without-lr",
        "train_value",
        "Adam created without the lr it was given (its default, 1e-3)",
        [("torch.optim.Adam(params, lr=lr, fused=True)", "torch.optim.Adam(params, fused=True)")],
        "test_train_value_is_adam_at_the_given_lr_with_fresh_gradients",
        "made without lr",
    ),
    Mutant(
        "gradients-accumulate",
        "train_value",
        "gradients never reset: each step adds to the last",
        [("        opt.zero_grad()\n", "")],
        "test_train_value_is_adam_at_the_given_lr_with_fresh_gradients",
        "accumulate over the steps",
    ),
    Mutant(
        "hook-left-on",
        "train_value",
        "the override's hook never removed after training (its handle dropped)",
        [
            (
                "with override(backbone, layer_path, value):",
                "if override(backbone, layer_path, value):",
            )
        ],
        "test_train_value_leaves_no_hook_on_the_model",
        "left",
    ),
    Mutant(
        "sgd",
        "train_value",
        "plain SGD instead of Adam",
        [("torch.optim.Adam", "torch.optim.SGD")],
        "test_adam_moves_each_weight_by_about_lr_at_the_first_step",
        "Plain SGD",
    ),
    Mutant(
        "no-minus-100-mask",
        "train_value",
        "the plain loop's loss over every position (-100 labels clamped to token 0)",
        [
            (
                "loss = backbone(**batch).loss",
                "logits = backbone(**batch).logits\n"
                "                labels = batch['labels'][:, 1:].flatten().clamp(min=0)\n"
                "                logits = logits[:, :-1].flatten(0, 1).float()\n"
                "                loss = F.cross_entropy(logits, labels)",
            )
        ],
        "test_the_first_loss_is_the_models_own_loss_on_the_target_tokens",
        "-100",
    ),
    Mutant(
        "model-gets-gradients",
        "train_value",
        "loss.backward() into every parameter, the model's included",
        [("loss.backward(inputs=params)", "loss.backward()")],
        "test_no_gradient_reaches_the_model",
        "no gradient may reach the model",
    ),
    Mutant(
        "keys-ignore-pool",
        "BalancEditor.keys_of",
        "keys always the prompt mean (self.config.pool not passed on)",
        [("self.config.pool", '"mean"')],
        "test_keys_with_pool_last_are_the_layer_input_at_the_last_prompt_position",
        "pass self.config.pool on",
    ),
    Mutant(
        "positive-among-the-scored",
        "BalancEditor.positive_question",
        "the backbone's first rephrasing taken even if T-Gen scores it",
        [("if q not in record.rephrases", "if q != record.question")],
        "test_the_positive_is_a_training_rephrasing_never_a_scored_one",
        "T-Gen",
    ),
    Mutant(
        "positive-is-a-scored-rephrasing",
        "BalancEditor.positive_question",
        "the positive taken from the rephrasings that score T-Gen",
        [("return record.train_rephrases[0]", "return record.rephrases[0]")],
        "test_the_positive_is_a_training_rephrasing_never_a_scored_one",
        "first training rephrasing",
    ),
    # Task 5: the metrics
    Mutant(
        "tokens-pooled",
        "token_accuracy",
        "accuracy pooled over all tokens instead of averaged over samples",
        [
            (
                "return 100.0 * sum(per_sample) / len(per_sample)",
                "pairs = zip(predicted, reference)\n"
                "    right = sum(sum(a == b for a, b in zip(p, r)) for p, r in pairs)\n"
                "    return 100.0 * right / sum(map(len, reference))",
            )
        ],
        "test_token_accuracy_averages_over_samples_not_tokens",
        "pooled over tokens",
    ),
    Mutant(
        "fraction-not-percent",
        "token_accuracy",
        "a fraction in [0, 1], not percent",
        [("return 100.0 * sum(per_sample)", "return sum(per_sample)")],
        "test_token_accuracy_is_in_percent",
        "percent",
    ),
    Mutant(
        "no-length-check",
        "token_accuracy",
        "no check that the token lists fit (zip drops the extra tokens)",
        [
            ("    assert len(predicted) == len(reference)\n", ""),
            ("    assert all(len(p) == len(r) > 0 for p, r in zip(predicted, reference))\n", ""),
        ],
        "test_token_accuracy_refuses_what_cannot_be_compared",
        "check with assert",
    ),
    Mutant(
        "hm-arithmetic",
        "hm",
        "the arithmetic mean instead of the harmonic",
        [("return len(xs) / sum(1.0 / x for x in xs)", "return sum(xs) / len(xs)")],
        "test_hm_on_a_hand_worked_case",
        "arithmetic mean",
    ),
    Mutant(
        "hm-zero-divides",
        "hm",
        "no case for a zero score (ZeroDivisionError)",
        [("    if any(x <= 0 for x in xs):\n        return 0.0\n", "")],
        "test_hm_of_a_zero_is_zero_and_of_a_missing_score_is_none",
        "check for a 0 before dividing",
    ),
]


class Stale(Exception):
    """A mutant's old text is no longer in its function: the reference changed."""


def mutated(mutant: Mutant, source: str | None = None) -> str:
    """The source of the mutant's file (or ``source``) with its function patched; Stale if a
    swap's old text is not in the function exactly once (the reference changed: update the
    mutant)."""
    if source is None:
        source = (ROOT / mutant.file).read_text()
    node = dict(release.functions(ast.parse(source)))[mutant.function]
    lines = source.splitlines(keepends=True)
    body = "".join(lines[node.lineno - 1 : node.end_lineno])
    for old, new in mutant.swaps:
        n = body.count(old)
        if n != 1:
            where = f"{mutant.file}: {mutant.function}"
            raise Stale(f"mutant {mutant.name}: {old!r} occurs {n} times in {where}, not once")
        body = body.replace(old, new)
    text = "".join(lines[: node.lineno - 1]) + body + "".join(lines[node.end_lineno :])
    ast.parse(text)
    return text


def copy_project(where: Path) -> Path:
    """A copy of the project's code and graders (assets/ linked, not copied: nothing writes it)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    where.mkdir(parents=True)
    for path in ROOT.glob("*.py"):
        shutil.copy2(path, where / path.name)
    shutil.copy2(ROOT / "pytest.ini", where / "pytest.ini")
    shutil.copytree(ROOT / "assignments", where / "assignments", ignore=skip)
    (where / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    return where


def failures(output: str) -> dict[str, str]:
    """test name -> message, from the graders' "What failed" list (names on lines that start
    with the task or with 4 spaces, the message on lines that start with 6)."""
    found = {}
    part = output.split("What failed, and why")[1:]
    if not part:
        return found
    names = []
    message = []
    for line in part[0].split("\n")[1:] + ["task"]:
        if line.startswith("task") or not line.strip():
            for name in names:
                found[name.split("[")[0]] = " ".join(message)
            names = [n.strip() for n in line[5:].split(",") if n.strip()] if line.strip() else []
            message = []
            if not line.strip():
                break
        elif line.startswith("      "):
            message.append(line.strip())
        else:
            names += [n.strip() for n in line.split(",") if n.strip()]
    return found


def grade(project: Path, tests: list[str]) -> tuple[dict[str, tuple[int, int]], str]:
    """Run the graders ``tests`` (pytest arguments) in ``project``: task -> (passed, total),
    and the output."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rN"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        command + tests, cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    output = run.stdout + run.stderr
    return {t: (int(p), int(n)) for t, p, n in GRADE.findall(output)}, output


def try_mutants(mutants: list[Mutant], where: Path, tests: list[str] | None = None) -> list:
    """Patch the mutants into one copy of the project at ``where`` and run ``tests`` (default:
    the graders of the first mutant's task). One result per mutant: its task's score, the
    graders that failed with their messages, and whether its own grader said ``says``."""
    project = copy_project(where)
    for m in mutants:
        path = project / m.file
        path.write_text(mutated(m, path.read_text()))
    tests = tests or ["assignments", "-m", f"task{mutants[0].task}"]
    start = time.perf_counter()
    scores, output = grade(project, tests)
    seconds = time.perf_counter() - start
    caught = failures(output)
    results = []
    for m in mutants:
        passed, total = scores.get(f"task{m.task}", (0, 0))
        says = m.says in caught.get(m.catcher, "")
        results.append(dict(mutant=m, passed=passed, total=total, caught=caught, as_expected=says))
        results[-1].update(seconds=seconds, output=output)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the graders against wrong implementations.")
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--jobs", type=int, default=2, help="copies graded at a time (2)")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"no mutant {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} task {m.task}  {m.function}: {m.mistake}")
        return 0
    try:
        for m in chosen:
            mutated(m)  # every patch applies, before any work
    except Stale as e:
        print(f"mutants.py: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            jobs = [pool.submit(try_mutants, [m], Path(tmp, m.name)) for m in chosen]
            results = [job.result()[0] for job in jobs]
    print("| mutant | task | score | s | caught by | the expected grader's message |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for r in results:
        m = r["mutant"]
        lost = r["passed"] < r["total"]
        bad += not lost or not r["as_expected"]
        mark = "" if r["as_expected"] else " (NOT the expected grader or words)"
        message = r["caught"].get(m.catcher, "-")
        print(
            f"| {m.name}: {m.mistake} | {m.task} | {r['passed']}/{r['total']} | "
            f"{r['seconds']:.0f} | "
            f"{', '.join(sorted(r['caught'])) or 'nothing'}{mark} | {message} |"
        )
    seconds = time.perf_counter() - start
    print(f"\n{len(results)} mutants, {len(results) - bad} caught as expected, in {seconds:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
