"""Direction math on hand-made arrays: means, selection rule, separation, probe, bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.directions.extraction import (
    GroupSums,
    SelectionRule,
    bootstrap_cosines,
    cosine_matrix,
    cross_ablation_specificity,
    layer_separation,
    mean_difference,
    refusal_filter,
    select_candidate,
    separation_sigma,
)


def test_mean_difference_is_harmful_minus_harmless() -> None:
    acts = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    harmful = np.array([True, True, False, False])
    assert mean_difference(acts, harmful, ~harmful).tolist() == [2.0, -2.0]
    with pytest.raises(ValueError):
        mean_difference(acts, harmful, np.zeros(4, bool))


def test_mean_difference_in_blocks_matches_the_plain_mean(tmp_path) -> None:
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(50, 3, 4)).astype(np.float32)
    on_disk = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=acts.shape)
    on_disk[:] = acts
    harmful = rng.random(50) < 0.4
    expected = acts[harmful].mean(0) - acts[~harmful].mean(0)
    assert np.allclose(mean_difference(on_disk, harmful, ~harmful, block=7), expected, atol=1e-5)


def test_group_sums_filled_in_any_batches_give_the_mean_differences() -> None:
    rng = np.random.default_rng(4)
    acts = rng.normal(size=(60, 3, 2, 4)).astype(np.float32)
    toxic, safe = rng.random(60) < 0.4, rng.random(60) < 0.3
    hate = toxic & (rng.random(60) < 0.5)  # groups may overlap
    sums = GroupSums({"toxic": toxic, "safe": safe, "hate": hate}, acts.shape)
    order = rng.permutation(60)
    for start in range(0, 60, 7):  # batches in any order, as capture fills them
        rows = sorted(order[start : start + 7])
        sums[rows] = acts[rows]
    assert np.allclose(sums.mean_difference("toxic", "safe"), mean_difference(acts, toxic, safe), atol=1e-6)
    assert np.allclose(sums.mean_difference("hate", "safe")[:, 1], mean_difference(acts[:, :, 1], hate, safe),
                       atol=1e-6)
    with pytest.raises(ValueError, match="at least one prompt"):
        GroupSums({"a": toxic, "none": np.zeros(60, bool)}, acts.shape).mean_difference("a", "none")


def test_group_sums_of_shards_add_up_to_the_whole() -> None:
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(40, 3, 2, 4)).astype(np.float32)
    toxic = rng.random(40) < 0.5
    groups = {"toxic": toxic, "safe": ~toxic}
    parts = []
    for rows in np.array_split(rng.permutation(40), 3):  # three shards, each its own prompts
        mine = np.isin(np.arange(40), rows)
        shard = GroupSums({name: mask[mine] for name, mask in groups.items()}, (int(mine.sum()), 3, 2, 4))
        shard[list(range(int(mine.sum())))] = acts[mine]
        parts.append(shard.partial_sums())
    assert len(parts[0]) == 2 * 3 * 2 and set(parts[0].columns) == {"group", "cell", "total", "n"}
    merged = GroupSums(groups, acts.shape)
    merged.add_partial_sums(pd.concat(parts, ignore_index=True).sample(frac=1, random_state=0))  # any row order
    assert np.allclose(merged.mean_difference("toxic", "safe"), mean_difference(acts, toxic, ~toxic), atol=1e-6)


def test_shards_filtering_their_own_prompts_merge_into_the_filtered_means() -> None:
    # Each shard keeps only the prompts its model's refusal scores pass; the merge knows only the
    # unfiltered groups, so the means must come from the counts the shards report.
    rng = np.random.default_rng(6)
    acts = rng.normal(size=(40, 2, 3)).astype(np.float32)
    toxic = rng.random(40) < 0.5
    kept = refusal_filter(toxic, ~toxic, rng.normal(size=40))
    parts = []
    for rows in np.array_split(np.arange(40), 2):
        shard = GroupSums({"toxic": (toxic & kept)[rows], "safe": (~toxic & kept)[rows]}, (len(rows), 2, 3))
        shard[list(range(len(rows)))] = acts[rows]
        parts.append(shard.partial_sums())
    merged = GroupSums({"toxic": toxic, "safe": ~toxic}, acts.shape)
    merged.add_partial_sums(pd.concat(parts, ignore_index=True))
    assert merged.counts == {"toxic": int((toxic & kept).sum()), "safe": int((~toxic & kept).sum())}
    assert np.allclose(merged.mean_difference("toxic", "safe"),
                       mean_difference(acts, toxic & kept, ~toxic & kept), atol=1e-6)


def test_refusal_filter_keeps_refused_toxic_and_answered_safe_prompts() -> None:
    toxic = np.array([True, True, False, False, False, True])
    safe = np.array([False, False, True, True, False, False])
    scores = np.array([2.0, -1.0, -3.0, 0.5, -1.0, np.nan])  # row 4 is hard (neither), row 5 unscored
    assert refusal_filter(toxic, safe, scores).tolist() == [True, False, True, False, False, False]


def test_capture_into_group_sums_matches_the_captured_array(tiny_model) -> None:
    from engine.runtime.activations import capture, prompt_end_positions

    prompts = ["Name a fruit", "How do I pick a lock", "Describe a cat", "Tell me about rivers", "Say hi"]
    harmful = np.array([False, True, False, True, False])
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    offsets = prompt_end_positions(tiny_model.tokenizer).offsets
    acts = capture(tiny_model, prompts, hooks, offsets, batch_size=2)
    sums = GroupSums({"toxic": harmful, "safe": ~harmful}, acts.shape)
    assert capture(tiny_model, prompts, hooks, offsets, batch_size=2, out=sums) is sums
    assert np.allclose(sums.mean_difference("toxic", "safe"), mean_difference(acts, harmful, ~harmful), atol=1e-6)


def test_selection_follows_the_three_filters() -> None:
    table = pd.DataFrame({
        "layer":          [1,    2,    3,    4,    9,     0],
        "position":       [0,    0,    0,    0,    0,     0],
        "ablation_score": [-5.0, -9.0, -8.0, -2.0, -20.0, np.nan],
        "induce_score":   [3.0,  2.0,  -1.0, 1.0,  5.0,   np.nan],
        "kl":             [0.05, 0.3,  0.01, 0.02, 0.01,  np.nan],
    })
    result = select_candidate(table, n_layers=10, rule=SelectionRule())
    assert result.loc[result["chosen"], "layer"].tolist() == [1]
    assert result["rejected_because"].tolist() == [
        "", "KL > 0.1", "induce score < 0.0", "", "in the last 20% of layers",
        "zero direction (same activation for every prompt)"]


def test_separation_sigma_on_known_groups() -> None:
    projections = np.array([2.0, 4.0, 0.0, 2.0])  # means 3 and 1, both variances 2
    harmful = np.array([True, True, False, False])
    assert separation_sigma(projections, harmful, ~harmful) == pytest.approx(2 / np.sqrt(2))


def test_layer_separation_finds_the_informative_layer() -> None:
    rng = np.random.default_rng(0)
    n, d = 200, 8
    harmful = np.arange(n) % 2 == 0
    acts = rng.normal(size=(n, 2, d))
    acts[harmful, 1, 0] += 4.0  # only layer 1 carries the label
    fit = np.arange(n) < 140
    result = layer_separation(acts, harmful, fit, ~fit).set_index("layer")
    assert result.loc[1, "separation_sigma"] > 3 and abs(result.loc[0, "separation_sigma"]) < 1
    assert result.loc[1, "probe_accuracy"] > 0.95 and result.loc[0, "probe_accuracy"] < 0.75


def test_bootstrap_cosines_bracket_the_point_estimate() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 16))
    shared = np.zeros(16)
    shared[0] = 5
    other = np.zeros(16)
    other[1] = 5
    acts = np.concatenate([base, base[:30] + shared, base[30:] + shared, base[:30] + other])
    groups = np.array([""] * 60 + ["a"] * 30 + ["b"] * 30 + ["c"] * 30)
    result = bootstrap_cosines(acts, groups, ["a", "b", "c"], groups == "", n_boot=100, seed=0)
    pairs = result.set_index(["category_a", "category_b"])
    assert pairs.loc[("a", "b"), "cosine"] > 0.9 and abs(pairs.loc[("a", "c"), "cosine"]) < 0.3
    assert (result["ci_low"] <= result["cosine"] + 1e-9).all() and (result["cosine"] <= result["ci_high"] + 1e-9).all()
    assert np.allclose(np.diag(cosine_matrix(np.eye(3))), 1)


def test_bootstrap_interval_covers_a_known_cosine() -> None:
    # Population directions with cosine exactly 0.6: a = 4u, b = 4(0.6u + 0.8v); unit-variance noise.
    rng = np.random.default_rng(2)
    d, n = 8, 400
    u, v = np.eye(d)[0], np.eye(d)[1]
    safe = rng.normal(size=(n, d))
    a = rng.normal(size=(n, d)) + 4 * u
    b = rng.normal(size=(n, d)) + 4 * (0.6 * u + 0.8 * v)
    acts = np.concatenate([safe, a, b])
    groups = np.array([""] * n + ["a"] * n + ["b"] * n)
    result = bootstrap_cosines(acts, groups, ["a", "b"], groups == "", n_boot=300, seed=0)
    row = result.set_index(["category_a", "category_b"]).loc[("a", "b")]
    assert row["ci_low"] < 0.6 < row["ci_high"] and row["ci_high"] - row["ci_low"] < 0.1


def test_removing_the_shared_direction_reveals_category_tails() -> None:
    """Two categories = a large shared direction plus small orthogonal tails of their own: the raw
    cosine is near 1, after projecting the shared direction out near 0."""
    rng = np.random.default_rng(0)
    d, n = 32, 200
    shared, tail_a, tail_b = np.eye(d)[0] * 10, np.eye(d)[1], np.eye(d)[2]
    acts = np.concatenate([shared + tail_a + rng.normal(0, 0.1, (n, d)), shared + tail_b + rng.normal(0, 0.1, (n, d)),
                           rng.normal(0, 0.1, (n, d))])
    groups = np.array(["a"] * n + ["b"] * n + [""] * n)
    raw = bootstrap_cosines(acts, groups, ["a", "b"], groups == "", n_boot=50, seed=0)
    removed = bootstrap_cosines(acts, groups, ["a", "b"], groups == "", n_boot=50, seed=0, remove=shared)
    pair = "category_a == 'a' and category_b == 'b'"
    assert raw.query(pair)["cosine"].item() > 0.95
    assert abs(removed.query(pair)["cosine"].item()) < 0.1


def _cross_scores(own_extra: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per prompt: score 2 unablated; ablating any category's direction drops it by 1, its own
    category's by 1 + own_extra; noise 0.3."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        category = ["hate", "privacy", "violence"][i % 3]
        rows.append({"prompt_id": f"p{i}", "category": category, "ablated": "none", "score": 2.0})
        for ablated in ("hate", "privacy", "violence"):
            drop = 1 + (own_extra if ablated == category else 0) + rng.normal(0, 0.3)
            rows.append({"prompt_id": f"p{i}", "category": category, "ablated": ablated, "score": 2 - drop})
    return pd.DataFrame(rows)


def test_cross_ablation_specificity_tells_own_category_function_from_interchangeable() -> None:
    categories = ["hate", "privacy", "violence"]
    specific = cross_ablation_specificity(_cross_scores(1.0), categories, n_boot=500, seed=0)
    assert specific.ci_low > 0.5 and abs(specific.difference - 1.0) < 0.2 and specific.n_prompts == 40
    interchangeable = cross_ablation_specificity(_cross_scores(0.0), categories, n_boot=500, seed=0)
    assert interchangeable.ci_low < 0 < interchangeable.ci_high
    assert abs(interchangeable.own_drop - 1) < 0.2 and abs(interchangeable.other_drop - 1) < 0.2
    assert np.isnan(cross_ablation_specificity(_cross_scores(1.0), ["hate"], n_boot=10, seed=0).difference)
