"""The mistakes that the course kit's graders must catch, each one mistake in one task function,
as text to swap into its source (tests/mutants.py patches them into copies of the project and
grades each). Add one when a hand-in shows a mistake the graders missed: what to swap, the grader
named for it, and words its message must hold.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _release():
    spec = importlib.util.spec_from_file_location("release", ROOT / "assignments" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = _release()


@dataclass
class Mutant:
    """One mistake: the task function it is in, the text it swaps, and the grader that must
    catch it."""

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
    # Task 1: Eq. 3, the radius
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
    # Task 2: the distance and the lookup
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
                "        self.held = torch.where(prompt.any(dim=1), index, held)  # (B,)\n",
                "        index = torch.where(prompt.any(dim=1), index, held)  # (B,)\n"
                "        if (index >= 0).any():\n"
                "            self.held = index\n",
            ),
            ("        return self.held\n", "        return index\n"),
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
    Mutant(
        "pool-unknown-is-mean",
        "prompt_key",
        "an unknown pool (a typo such as 'Last') silently taken as the mean",
        [
            (
                '    if pool not in CHOICES["pool"]:\n'
                "        raise ValueError("
                "f\"unknown pool {pool!r}; allowed: {CHOICES['pool']}\")\n",
                "",
            )
        ],
        "test_an_unknown_pool_is_an_error",
        "an unknown pool is a ValueError",
    ),
    Mutant(
        "hold-kept-after-an-unmasked-call",
        "Router.hold",
        "a call without a mask leaves the held routes in place: the next decoding step follows "
        "an old prompt's route",
        [
            (
                "            self.held = None\n            return index\n",
                "            return index\n",
            )
        ],
        "test_a_call_without_a_mask_holds_nothing",
        "must clear the hold",
    ),
    Mutant(
        "hold-replaces-every-row",
        "Router.hold",
        "a new prompt replaces every row's held route, also of the rows without prompt positions",
        [("torch.where(prompt.any(dim=1), index, held)", "index if prompt.any() else held")],
        "test_a_new_prompt_replaces_the_held_routes_row_by_row",
        "replaced every row's route",
    ),
    Mutant(
        "hold-kept-across-batch-sizes",
        "Router.hold",
        "a call of a new batch size misses but keeps the old hold for later",
        [
            (
                "        if held is None or len(held) != len(index) or removed:\n",
                "        if held is not None and len(held) != len(index):\n"
                "            return torch.where(prompt.any(dim=1), index, -1)\n"
                "        if held is None or removed:\n",
            )
        ],
        "test_a_new_batch_size_starts_a_new_hold",
        "not kept for later",
    ),
    Mutant(
        "hold-after-removal-out-of-range",
        "Router.hold",
        "an entry removed between the prompt and decoding not checked: a held index runs past the "
        "codebook's end (IndexError)",
        [("len(held) != len(index) or removed:", "len(held) != len(index):")],
        "test_a_removed_entry_drops_the_held_routes",
        "IndexError",
    ),
    Mutant(
        "hold-follows-a-shifted-entry",
        "Router.hold",
        "only held indices past the codebook's end dropped: after a lower entry's removal a row "
        "follows the entry that moved into its index",
        [
            (
                "        if held is None or len(held) != len(index) or removed:\n"
                "            held = torch.full_like(index, -1)\n",
                "        if held is None or len(held) != len(index):\n"
                "            held = torch.full_like(index, -1)\n"
                "        held = held.masked_fill(held >= len(self.codebook), -1)  # (B,)\n",
            )
        ],
        "test_a_removed_entry_drops_the_held_routes",
        "now what was entry",
    ),
    # Task 4: Eq. 2, the value's training
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
    # Task 5: Eq. 3's probes: the key, the positive and the negative
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
        [
            (
                "unseen = [q for q in asked if q not in record.rephrases]",
                "unseen = [q for q in asked if q != record.question]",
            )
        ],
        "test_the_positive_is_a_training_rephrasing_never_a_scored_one",
        "T-Gen",
    ),
    Mutant(
        "positive-is-a-scored-rephrasing",
        "BalancEditor.positive_question",
        "the positive taken from the rephrasings that score T-Gen",
        [
            (
                "unseen = [q for q in record.train_rephrases if q not in record.rephrases]",
                "unseen = list(record.rephrases)",
            )
        ],
        "test_the_positive_is_a_training_rephrasing_never_a_scored_one",
        "first training rephrasing",
    ),
    Mutant(
        "positive-may-be-scored",
        "BalancEditor.positive_question",
        "the first training rephrasing taken even when T-Gen scores it",
        [
            (
                "unseen = [q for q in record.train_rephrases if q not in record.rephrases]",
                "unseen = list(record.train_rephrases)",
            )
        ],
        "test_the_positive_is_a_training_rephrasing_never_a_scored_one",
        "That one scores T-Gen here",
    ),
    Mutant(
        "probe-pos-neg-swapped",
        "BalancEditor.probe",
        "d(Pos, k) and d(Neg, k) swapped",
        [("float(d[0, 0]), float(d[1, 0])", "float(d[1, 0]), float(d[0, 0])")],
        "test_d_pos_is_the_same_image_with_a_rephrased_question",
        "d_pos and d_neg are swapped",
    ),
    Mutant(
        "probe-positive-is-the-question",
        "BalancEditor.probe",
        "the positive asks the edit's own question (Pos = (i, t), at distance 0)",
        [
            (
                "questions = [record.question, self.positive_question(record), record.question]",
                "questions = [record.question] * 3",
            )
        ],
        "test_d_pos_is_the_same_image_with_a_rephrased_question",
        "repeats the edit's own question",
    ),
    Mutant(
        "probe-white-negative",
        "BalancEditor.probe",
        "a white negative image where the config says black",
        [("anchor_image(cfg.negative,", 'anchor_image("white",')],
        "test_d_neg_is_the_configs_anchor_image_with_the_same_question",
        "distance of a white image, where config.negative is 'black'",
    ),
    Mutant(
        "probe-negative-ignores-the-config",
        "BalancEditor.probe",
        "always a black negative, whatever config.negative says (Table 7's ablation then "
        "compares black with black)",
        [("anchor_image(cfg.negative,", 'anchor_image("black",')],
        "test_d_neg_is_the_configs_anchor_image_with_the_same_question",
        "distance of a black image, where config.negative is 'white'",
    ),
    Mutant(
        "probe-negative-asks-the-positive",
        "BalancEditor.probe",
        "the negative asks the rephrased question on the black image",
        [
            (
                "questions = [record.question, self.positive_question(record), record.question]",
                "positive = self.positive_question(record)\n"
                "        questions = [record.question, positive, positive]",
            )
        ],
        "test_d_neg_is_the_configs_anchor_image_with_the_same_question",
        "Neg asks the rephrased question",
    ),
    Mutant(
        "probe-key-of-the-positive",
        "BalancEditor.probe",
        "the entry's key taken from Pos's row instead of the edit's",
        [("return Probe(keys[0],", "return Probe(keys[1],")],
        "test_the_key_is_the_edits_own_row",
        "That is Pos's key",
    ),
    Mutant(
        "probe-ignores-pool",
        "BalancEditor.probe",
        "the probe's keys always the prompt mean (config.pool not passed on)",
        [('prompt_key(h, batch["prompt_mask"], cfg.pool)', 'prompt_key(h, batch["prompt_mask"])')],
        "test_the_key_is_the_edits_own_row",
        "That is the mean over the prompt",
    ),
    Mutant(
        "probe-trains-on-every-row",
        "BalancEditor.probe",
        "Pos's and Neg's labels left on: Eq. 2 trains the value on all three rows",
        [('        batch["labels"][1:] = -100  # Eq. 2 learns the edit\'s row only\n', "")],
        "test_only_the_edits_row_trains",
        "set the labels of the Pos and Neg rows to -100",
    ),
    Mutant(
        "probe-forward-per-row",
        "BalancEditor.probe",
        "the keys from a second forward (keys_of) instead of the one that records the tail",
        [
            (
                'keys = prompt_key(h, batch["prompt_mask"], cfg.pool)',
                "keys = self.keys_of(images, questions)",
            )
        ],
        "test_the_probe_is_one_batched_forward_of_three_rows",
        "the model ran 2 time(s)",
    ),
    # Task 6: the metrics
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
