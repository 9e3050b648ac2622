"""Read-only access to a study store for the app: SQL constants, `?` parameters, cached results.

Results are cached per (store file, its modification time): when precompute swaps in a new
store, the next rerun reads the new file. The app keeps one read-only snapshot of each of the
last few file versions open; precompute's atomic rename never waits for it.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st

from engine.data import store

PROMPT_COUNTS_SQL = """
SELECT kind, split, count(*) AS n FROM prompts GROUP BY kind, split ORDER BY kind, split
"""
RATES_SQL = """
SELECT model, category, kind, n, n_refused, rate, ci_low, ci_high, mean_refusal_score
FROM refusal_rates ORDER BY model, kind, category
"""
AGREEMENT_SQL = """
SELECT model, kind, n, n_refused_substring, n_refused_score, accuracy, cohen_kappa, auroc
FROM judge_agreement ORDER BY model, kind
"""
REFUSAL_TOKENS_SQL = "SELECT model, token, token_id, share_of_refusals, source FROM refusal_tokens"
MODELS_SQL = "SELECT DISTINCT model, model_spec FROM generations ORDER BY model"
TUNE_STEPS_SQL = "SELECT step, loss FROM tune_steps ORDER BY step"
EVALUATION_RATES_SQL = """
SELECT "set", model, kind, n, n_refused, rate, ci_low, ci_high, n_left_out FROM evaluation_rates ORDER BY "set", model
"""
BENCHMARK_SETS_SQL = 'SELECT DISTINCT "set" FROM benchmark_rates ORDER BY "set"'
BENCHMARK_RATES_SQL = """
SELECT model, condition, kind, category, n, n_refused, n_degenerate, n_coherent, rate, ci_low, ci_high,
       coherent_rate, coherent_rate_low, coherent_rate_high
FROM (SELECT *, rate_low AS ci_low, rate_high AS ci_high FROM benchmark_rates) WHERE "set" = ?
ORDER BY model, condition, kind, category
"""
BENCHMARK_ANSWERS_SQL = """
SELECT model, condition, kind, category, text, response, refused, degenerate, repetition, cross_entropy,
       refusal_score, source
FROM benchmark_generations WHERE "set" = ? AND condition = ? ORDER BY kind, category, text, model
"""
TUNE_DATA_SUMMARY_SQL = "SELECT kind, source, count(*) AS n FROM tune_data GROUP BY kind, source ORDER BY kind, source"
CATEGORIES_SQL = "SELECT DISTINCT category FROM prompts ORDER BY category"
# Prompt browser: one row per prompt with each model's verdict; filters are parameters.
BROWSE_SQL = """
SELECT p.id, p.text, p.category, p.kind, p.split,
       string_agg(g.model || ': ' || CASE WHEN g.refused THEN 'refused' ELSE 'complied' END, ', '
                  ORDER BY g.model) AS verdicts
FROM prompts p LEFT JOIN generations g ON g.prompt_id = p.id
WHERE list_contains(?, p.category) AND list_contains(?, p.kind) AND list_contains(?, p.split)
  AND p.text ILIKE '%' || ? || '%'
GROUP BY p.id, p.text, p.category, p.kind, p.split
ORDER BY p.category, p.kind, p.text
LIMIT ?
"""
# Every judge's label per answer (one column per judge), under the prompt browser's filters.
JUDGE_LABELS_SQL = """
SELECT g.model, g.condition, p.category, p.kind, p.text, g.response, g.refused AS substring_judge,
       g.refused_by_score AS refusal_score_judge, g.refusal_score
FROM generations g JOIN prompts p ON g.prompt_id = p.id
WHERE list_contains(?, p.category) AND list_contains(?, p.kind) AND list_contains(?, p.split)
  AND p.text ILIKE '%' || ? || '%'
ORDER BY g.model, p.category, p.kind, p.text
"""
PROMPT_GENERATIONS_SQL = """
SELECT model, model_spec, condition, response, refused, refusal_score, refused_by_score, n_new_tokens
FROM generations WHERE prompt_id = ? ORDER BY model, condition
"""

SAES_SQL = """
SELECT hook, layer, source, path, release, sae_id, architecture, d_in, d_sae, n_corpus_tokens, n_train_tokens, n_held_out_tokens,
       l0, fraction_variance_unexplained, dead_fraction, ce_clean, ce_spliced, ce_zero_ablated, ce_loss_recovered,
       model
FROM saes ORDER BY layer, hook
"""
# The feature table: one row per feature of one SAE; the page filters and sorts it in memory.
FEATURES_SQL = """
SELECT feature, refusal_cosine, attribution, attribution_se, toxic_rate, safe_rate, hard_rate, toxic_safe_ratio,
       n_toxic_fired, n_toxic, n_safe_fired, n_safe, density, max_activation, top_category, top_category_share,
       array_to_string(top_tokens[1:5], ' | ') AS top_tokens
FROM features WHERE hook = ? ORDER BY feature
"""
FEATURE_SQL = """
SELECT feature, density, max_activation, mean_activation, histogram, refusal_cosine, toxic_rate, hard_rate,
       safe_rate, n_toxic_fired, n_toxic, n_safe_fired, n_safe, top_category, top_category_share, attribution,
       attribution_se, error_attribution, top_tokens, bottom_tokens
FROM features WHERE hook = ? AND feature = ?
"""
FEATURE_EXAMPLES_SQL = """
SELECT e.rank, e.activation, e.position, e.token_activations, c.tokens, c.prompt_tokens, c.source, c.category,
       c.kind, c.prompt_id
FROM feature_examples e JOIN sae_corpus c USING (text_id)
WHERE e.hook = ? AND e.feature = ? ORDER BY e.rank
"""
FEATURE_GROUPS_SQL = """
SELECT category, kind, n, mean_activation, firing_rate FROM feature_groups WHERE hook = ? AND feature = ?
"""
FEATURE_COSINES_SQL = """
SELECT scope, cosine FROM feature_direction_cosines WHERE hook = ? AND feature = ? ORDER BY scope
"""
MODEL_SPEC_SQL = "SELECT any_value(model_spec) AS model_spec FROM generations WHERE model = ?"
STUDY_DTYPE_SQL = """
SELECT coalesce(json_extract_string(config, '$.generation.dtype'), 'float32') AS dtype FROM runs
WHERE stage = 'generate' ORDER BY created_at DESC LIMIT 1
"""

STEERING_DIRECTIONS_SQL = "SELECT scope, layer, norm FROM refusal_directions WHERE chosen ORDER BY scope"
DIRECTION_AT_SQL = "SELECT norm, vector FROM refusal_directions WHERE scope = ? AND layer = ?"
N_LAYERS_SQL = "SELECT max(layer) + 1 AS n_layers FROM refusal_directions"
STEERING_FEATURES_SQL = """
SELECT feature, attribution, refusal_cosine, max_activation, array_to_string(top_tokens[1:4], ' | ') AS top_tokens
FROM features WHERE hook = ? AND density > 0 ORDER BY attribution DESC LIMIT 300
"""
TEST_PROMPTS_SQL = "SELECT id, text, category, kind FROM prompts WHERE split = 'test' ORDER BY kind, category, text"
STEERING_RATES_SQL = """
SELECT intervention, mode, n, n_refused, rate, ci_low, ci_high, mean_refusal_score FROM steering_rates
"""
STEERING_EFFECTS_SQL = """
SELECT intervention, type, mode, category, kind, n, n_refused_by_score, rate_by_score, baseline_rate_by_score
FROM steering_effects
"""
STEERING_HARMLESSNESS_SQL = """
SELECT intervention, type, n_safe, mean_kl, cross_entropy, baseline_cross_entropy FROM steering_harmlessness
ORDER BY type, intervention
"""

CIRCUITS_SQL = """
SELECT kind, category, n_prompts, status, message, n_nodes, faithfulness, metric_full, metric_empty,
       split_half_cosine, split_half_jaccard, split_half_centred, ceiling, error_share, metric_name, method
FROM circuits ORDER BY kind DESC, category
"""
CIRCUIT_VERDICTS_SQL = "SELECT * EXCLUDE (run_id) FROM circuit_verdicts ORDER BY kind DESC"
REPLICATION_SQL = "SELECT kind, seed, label FROM verdict_replication ORDER BY kind, seed"
CIRCUIT_NODES_SQL = """
SELECT hook, layer, feature, node, rank, effect, effect_se, share_positive, in_circuit, n_prompts,
       effect_held_out, n_held_out
FROM circuit_nodes WHERE kind = ? AND category = ? ORDER BY rank
"""
CIRCUIT_EDGES_SQL = """
SELECT upstream_hook, upstream_feature, downstream_hook, downstream_feature, effect
FROM circuit_edges WHERE kind = ? AND category = ?
"""
CIRCUIT_FAITHFULNESS_SQL = """
SELECT kind, category, n_nodes, faithfulness, metric, metric_full, metric_empty, is_circuit
FROM circuit_faithfulness ORDER BY kind, category, n_nodes
"""
CIRCUIT_SIMILARITY_SQL = """
SELECT kind_a, category_a, kind_b, category_b, cosine, cosine_low, cosine_high, jaccard, jaccard_low, jaccard_high,
       centred_cosine, p_value, p_holm, n_a, n_b
FROM circuit_similarity
"""
# The share of a kind's circuits a node must be in to count as shared core (a circuits setting).
CORE_SHARE_SQL = """
SELECT json_extract(config, '$.circuits.core_share')::DOUBLE AS core_share FROM runs WHERE stage = 'circuits'
ORDER BY created_at DESC LIMIT 1
"""
CIRCUIT_CORE_SQL = """
SELECT kind, hook, feature, n_circuits, share, in_core, mean_effect, categories FROM circuit_core
WHERE kind = ? ORDER BY n_circuits DESC, abs(mean_effect) DESC
"""
# The verdict rule on planted effects at the study's sizes (`grid`) and, for an inconclusive verdict,
# at more prompts (`sample size`).
CIRCUIT_CALIBRATION_SQL = """
SELECT kind, purpose, share, scale, prompts_per_category, n_simulations, true_ratio, truth, ratio_median,
       ratio_low_median, ratio_high_median, share_estimate_median, monolithic, partially_modular, modular,
       inconclusive, rejected, detected, correct
FROM circuit_calibration ORDER BY kind DESC, purpose, scale, share
"""
CIRCUIT_COMPONENTS_SQL = """
SELECT category, component, layer, head, method, effect, n_prompts, n_receivers, metric_safe, metric_toxic
FROM circuit_components
"""
# What a feature is about, in a few tokens: the tokens it promotes most and the token its top examples
# peak on most often (the most common one among its stored top activations).
FEATURE_LABELS_SQL = """
SELECT f.hook, f.feature, array_to_string(f.top_tokens[1:3], ' ') AS top_tokens, p.peak_token
FROM features f LEFT JOIN (
    SELECT e.hook, e.feature, mode(c.tokens[e.position + 1]) AS peak_token
    FROM feature_examples e JOIN sae_corpus c USING (text_id)
    WHERE list_contains(?, e.hook) AND list_contains(?, e.feature)
    GROUP BY e.hook, e.feature) p USING (hook, feature)
WHERE list_contains(?, f.hook) AND list_contains(?, f.feature)
"""


def store_version(path: str | Path) -> int:
    """Changes whenever precompute swaps in a new store file."""
    return Path(path).stat().st_mtime_ns


@st.cache_resource(show_spinner=False, max_entries=4)
def store_snapshot(path: str, version: int) -> duckdb.DuckDBPyConnection:
    """One read-only connection per store file version, shared by all sessions: opening one takes
    ~40 ms, several times a query's own time. A version that is evicted is closed once its last
    cursor is gone."""
    return store.connect_readonly(path)


@st.cache_data(show_spinner=False, max_entries=256)
def run_query(path: str, version: int, sql: str, params: tuple = ()) -> pd.DataFrame:
    """`version` is part of the cache key (see store_version) and picks the file's snapshot."""
    with store.snapshot_cursor(store_snapshot(path, version)) as cursor:
        # Tuples stand for SQL lists (they keep the cache key hashable).
        return cursor.execute(sql, [list(p) if isinstance(p, tuple) else p for p in params]).df()


@st.cache_data(show_spinner=False, max_entries=32)
def available_tables(path: str, version: int) -> frozenset[str]:
    with store.snapshot_cursor(store_snapshot(path, version)) as cursor:
        return frozenset(store.study_tables(cursor))


def query(path: str | Path, sql: str, params: tuple = ()) -> pd.DataFrame:
    return run_query(str(path), store_version(path), sql, params)


def tables(path: str | Path) -> frozenset[str]:
    return available_tables(str(path), store_version(path))


CANDIDATES_SQL = """
SELECT model, layer, position, position_label, ablation_score, induce_score, kl, eligible,
       rejected_because, chosen
FROM direction_candidates ORDER BY layer, position
"""
SEPARATION_SQL = "SELECT model, layer, separation_sigma, probe_accuracy FROM layer_separation ORDER BY model, layer"
PROJECTIONS_SQL = """
SELECT model, category, kind, projection FROM direction_projections
WHERE split = 'test' AND (? = 'all' OR category = ? OR kind = 'safe')
"""
COSINES_SQL = """
SELECT variant, category_a, category_b, cosine, ci_low, ci_high FROM category_cosines ORDER BY "order"
"""
SPECIFICITY_SQL = "SELECT * EXCLUDE (run_id) FROM cross_ablation_specificity"
TRADEOFF_SQL = """
SELECT * EXCLUDE (run_id),
       (SELECT json_extract(config, '$.directions.max_kl')::DOUBLE FROM runs WHERE stage = 'directions'
        ORDER BY created_at DESC LIMIT 1) AS max_kl
FROM ablation_tradeoff WHERE model = ? ORDER BY source, size
"""
ADDITION_TRADEOFF_SQL = """
SELECT * EXCLUDE (run_id, model) FROM addition_tradeoff WHERE model = ? ORDER BY strength, kind
"""
TRADEOFF_ANSWERS_SQL = """
SELECT kind, prompt, response, refused, refusal_score FROM tradeoff_answers
WHERE model = ? AND point = ? ORDER BY kind DESC, prompt
"""
BACKUP_RECOVERY_SQL = """
SELECT k, hook, removed, metric_before, metric_after, predicted_drop, actual_drop, recovered_share, n_prompts
FROM backup_recovery ORDER BY k
"""
BACKUP_GAINS_SQL = """
SELECT k, hook, feature, attribution_before, attribution_after, gain FROM backup_gains ORDER BY k, gain DESC
"""
INDEPENDENCE_SQL = """
SELECT a, b, dependence, ci_low, ci_high, induced, n FROM direction_independence WHERE model = ?
"""
CROSS_ABLATION_SQL = """
SELECT ablated, category, n, mean_refusal_score, refusal_rate_by_score FROM cross_ablation
"""
EFFECTS_SQL = """
SELECT condition, category, kind, n, n_refused, rate, ci_low, ci_high, mean_refusal_score
FROM direction_effects WHERE model = ? ORDER BY kind, category, condition
"""
HARMLESSNESS_SQL = """
SELECT condition, n, mean_kl, median_kl, n_not_leaning, mean_kl_not_leaning, mean_cross_entropy
FROM direction_harmlessness WHERE model = ?
"""
# One row per model: the direction's effect summed over categories (the headline numbers).
EFFECT_SUMMARY_SQL = """
SELECT e.model,
       sum(e.n_refused) FILTER (WHERE e.condition = 'baseline' AND e.kind = 'toxic') AS toxic_refused_baseline,
       sum(e.n_refused) FILTER (WHERE e.condition = 'ablation' AND e.kind = 'toxic') AS toxic_refused_ablated,
       sum(e.n) FILTER (WHERE e.condition = 'ablation' AND e.kind = 'toxic') AS toxic_n,
       sum(e.n_refused) FILTER (WHERE e.condition = 'baseline' AND e.kind = 'safe') AS safe_refused_baseline,
       sum(e.n_refused) FILTER (WHERE e.condition = 'addition' AND e.kind = 'safe') AS safe_refused_added,
       sum(e.n) FILTER (WHERE e.condition = 'addition' AND e.kind = 'safe') AS safe_n,
       any_value(h.mean_kl) AS kl_ablated, any_value(h.mean_kl_not_leaning) AS kl_ablated_not_leaning,
       any_value(h.n_not_leaning) AS n_not_leaning, any_value(h.n) AS n_kl
FROM direction_effects e JOIN direction_harmlessness h ON h.model = e.model AND h.condition = 'ablation'
GROUP BY e.model ORDER BY e.model
"""
FORM_PROBE_SQL = """
SELECT n_imperative, n_question, probe_accuracy, cosine_with_refusal, ci_low, ci_high, layer FROM form_probe
"""
HARD_DIRECTION_SQL = """
SELECT n_refused, n_answered, cosine_with_global, ci_low, ci_high, note FROM hard_prompt_direction
"""

# Findings: the study's answer in one place (see app/findings.py).
STUDY_SQL = "SELECT any_value(study) AS study, max(created_at) AS built_at FROM runs"
STAGES_SQL = "SELECT stage, finished_at FROM stages ORDER BY finished_at"
STUDY_STAGES_SQL = "SELECT value FROM store_meta WHERE key = 'study_stages'"
RATE_TOTALS_SQL = """
SELECT model, kind, sum(n)::INTEGER AS n, sum(n_refused)::INTEGER AS n_refused, min(n)::INTEGER AS smallest_group
FROM refusal_rates GROUP BY model, kind ORDER BY model, kind
"""
CHOSEN_DIRECTION_SQL = """
SELECT c.model, c.layer, c.position_label, c.ablation_score, c.induce_score, c.kl,
       (SELECT json_extract(config, '$.directions.max_kl')::DOUBLE FROM runs WHERE stage = 'directions'
        ORDER BY created_at DESC LIMIT 1) AS max_kl
FROM direction_candidates c WHERE c.chosen
"""
CORE_FEATURES_SQL = """
SELECT c.kind, c.hook, c.feature, c.n_circuits, c.mean_effect, len(c.categories) AS n_categories,
       array_to_string(f.top_tokens[1:3], ' ') AS top_tokens, f.refusal_cosine
FROM circuit_core c LEFT JOIN features f ON f.hook = c.hook AND f.feature = c.feature
WHERE c.in_core AND c.kind = ? ORDER BY abs(c.mean_effect) DESC LIMIT ?
"""
CIRCUIT_COVERAGE_SQL = """
SELECT kind, count(*) FILTER (WHERE status = 'ok') AS n_ok, count(*) FILTER (WHERE status <> 'ok') AS n_skipped,
       min(n_prompts) FILTER (WHERE status = 'ok') AS fewest_prompts,
       min(faithfulness) AS faithfulness_low, max(faithfulness) AS faithfulness_high, any_value(n_nodes) AS n_nodes
FROM circuits GROUP BY kind
"""
