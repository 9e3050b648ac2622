"""Stages end to end on a tiny model: outputs, cache skip and invalidation, crash and resume."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.data import store
from engine.data.prompt_sources import load_builtin
from engine.data.prompts import seeded_sample
from precompute import pipeline
from precompute.config import parse_config
from precompute.stages import STAGES
from precompute.stages import directions as directions_stage
from precompute.stages import generate as generate_stage
from precompute.stages import steering as steering_stage


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    builtin = load_builtin()
    sample = pd.concat([
        builtin[builtin["kind"] == kind].groupby("category").head(2) for kind in ("toxic", "hard")
    ] + [builtin[builtin["kind"] == "safe"].head(12)])
    path = tmp_path / "prompts.csv"
    sample[["text", "category", "kind"]].to_csv(path, index=False)
    return path


def _config(tmp_path: Path, model_dir: Path, prompt_file: Path, **generation) -> object:
    return parse_config({
        "study": "tiny",
        "store": str(tmp_path / "tiny.duckdb"),
        "models": {"base": str(model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(prompt_file),
                                 "mapping": {"category": "category", "kind": "kind"}}],
                    "test_fraction": 0.5},
        "generation": {"max_new_tokens": 3, "batch_size": 8, "chunk_size": 8, **generation},
    })


def _statuses(reports) -> dict[str, str]:
    return {r.stage: r.status for r in reports if r.stage not in ("evaluation", "directions", "saes", "steering", "circuits", "tradeoff", "backup")}


def test_pipeline_writes_judged_generations(tmp_path, tiny_model_dir, prompt_file) -> None:
    config = _config(tmp_path, tiny_model_dir, prompt_file)
    reports = pipeline.run_pipeline(config, STAGES)
    assert _statuses(reports) == {"prompts": "ran", "tune": "not applicable", "generate": "ran"}
    prompts = store.read_table(config.store, "prompts")
    generations = store.read_table(config.store, "generations")
    test_ids = set(prompts.loc[prompts["split"] == "test", "id"])
    assert set(generations["prompt_id"]) == test_ids and len(generations) == len(test_ids)
    assert generations["refusal_score"].notna().all() and (generations["n_new_tokens"] <= 3).all()
    rates = store.read_table(config.store, "refusal_rates")
    assert rates["n"].sum() == len(test_ids)
    assert ((rates["ci_low"] <= rates["rate"]) & (rates["rate"] <= rates["ci_high"])).all()
    agreement = store.read_table(config.store, "judge_agreement")
    # agreement on the half of the answers the refusal tokens were not read off
    assert agreement.loc[agreement["kind"] == "all", "n"].item() == (~generations["token_fit"]).sum()
    # every row links to the run that made it
    with store.reading(config.store) as con:
        orphan = con.execute("SELECT count(*) FROM generations WHERE run_id NOT IN (SELECT run_id FROM runs)")
        assert orphan.fetchone() == (0,)


def test_unchanged_stages_are_skipped_and_changes_invalidate(tmp_path, tiny_model_dir, prompt_file) -> None:
    config = _config(tmp_path, tiny_model_dir, prompt_file)
    pipeline.run_pipeline(config, STAGES)
    assert _statuses(pipeline.run_pipeline(config, STAGES)) == {
        "prompts": "skipped", "tune": "not applicable", "generate": "skipped"}
    longer = _config(tmp_path, tiny_model_dir, prompt_file, max_new_tokens=4)
    assert _statuses(pipeline.run_pipeline(longer, STAGES))["generate"] == "ran"
    assert _statuses(pipeline.run_pipeline(longer, STAGES, force=frozenset({"prompts"}))) == {
        "prompts": "ran", "tune": "not applicable", "generate": "skipped"}  # same prompts, same hash
    with prompt_file.open("a") as handle:
        handle.write("Suggest a name for a goldfish,none,safe\n")
    assert _statuses(pipeline.run_pipeline(longer, STAGES)) == {
        "prompts": "ran", "tune": "not applicable", "generate": "ran"}


def test_where_a_model_is_placed_is_not_part_of_any_cache_key(tmp_path, tiny_model_dir, prompt_file) -> None:
    # A store built on one GPU stays up to date when the same study runs spread over several.
    plain = _config(tmp_path, tiny_model_dir, prompt_file)
    spread = _config(tmp_path, tiny_model_dir, prompt_file, device_map="auto")
    assert "device_map" not in plain.section("generation")
    for stage in [stage for stage in STAGES if stage.applies(plain)]:
        assert pipeline.input_hash(stage, plain, {}) == pipeline.input_hash(stage, spread, {}), stage.name
    assert pipeline.input_hash(STAGES[2], plain, {}) != pipeline.input_hash(
        STAGES[2], _config(tmp_path, tiny_model_dir, prompt_file, max_new_tokens=4), {})


def test_crashed_stage_resumes_from_finished_chunks(tmp_path, tiny_model_dir, prompt_file, monkeypatch) -> None:
    config = _config(tmp_path, tiny_model_dir, prompt_file, chunk_size=4)
    real_answer_table = generate_stage.answer_table
    calls: list[int] = []

    def crash_on_third_chunk(model, chunk, **kwargs):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real_answer_table(model, chunk, **kwargs)

    monkeypatch.setattr(generate_stage, "answer_table", crash_on_third_chunk)
    with pytest.raises(RuntimeError, match="power cut"):
        pipeline.run_pipeline(config, STAGES)
    assert store.stage_hash(config.store, "generate") is None  # nothing half-written
    assert store.stage_hash(config.store, "prompts") is not None  # finished stages are kept
    n_chunks = -(-len(store.read_table(config.store, "prompts").query("split == 'test'")) // 4)
    calls.clear()
    monkeypatch.setattr(generate_stage, "answer_table",
                        lambda *a, **k: (calls.append(1), real_answer_table(*a, **k))[1])
    reports = pipeline.run_pipeline(config, STAGES)
    assert _statuses(reports) == {"prompts": "skipped", "tune": "not applicable", "generate": "ran"}
    assert len(calls) == n_chunks - 2  # the two chunks finished before the crash are reused


def test_unknown_stage_name_is_rejected(tmp_path, tiny_model_dir, prompt_file) -> None:
    from engine.errors import ExplorerError

    with pytest.raises(ExplorerError, match="Unknown stage 'judge'.*prompts, tune, generate"):
        pipeline.run_pipeline(_config(tmp_path, tiny_model_dir, prompt_file), STAGES, force=frozenset({"judge"}))


def test_directions_stage_chooses_and_tests_a_direction(tmp_path, tiny_model_dir, monkeypatch,
                                                        isolated_data_dir) -> None:
    on_disk: list[tuple[int, ...]] = []
    open_memmap = np.lib.format.open_memmap

    def recorded(path, *args, shape, **kwargs):
        on_disk.append(shape)
        return open_memmap(path, *args, shape=shape, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", recorded)
    captured: dict[str, list[str]] = {}
    capture = directions_stage.capture

    def recorded_capture(model, instructions, *args, desc, **kwargs):
        captured[desc] = list(instructions)
        return capture(model, instructions, *args, desc=desc, **kwargs)

    monkeypatch.setattr(directions_stage, "capture", recorded_capture)
    config = parse_config({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"),
        "models": {"base": str(tiny_model_dir), "tuned": str(tiny_model_dir)},
        "prompts": {"test_fraction": 0.3},
        "generation": {"max_new_tokens": 2, "batch_size": 64, "chunk_size": 1024},
        "directions": {"model": "tuned", "max_validation_prompts": 8, "bootstrap": 20, "filter_by_refusal": False,
                       "eval_max_new_tokens": 2, "prune_last_fraction": 0.0, "max_kl": 10.0},
    })
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports["directions"] == "ran"
    # Candidates come from running sums; only the chosen position and the instruction's last token
    # go to disk (one array per model, and not for long): every prompt for the studied model, the
    # toxic and safe ones else.
    kinds = store.read_table(config.store, "prompts")["kind"]
    chosen = store.read_table(config.store, "direction_candidates").query("chosen")["position"].item()
    slots = 1 if chosen == 0 else 2
    assert sorted(on_disk) == [(int(kinds.isin(["toxic", "safe"]).sum()), 2, slots, 64), (len(kinds), 2, slots, 64)]
    # The candidates' sums read only the train split's toxic and safe prompts: only those are captured.
    prompts = store.read_table(config.store, "prompts").set_index("text")
    for role in ("base", "tuned"):
        seen = prompts.loc[captured[f"capture {role}"]]
        assert 0 < len(seen) < len(prompts) and set(seen["kind"]) == {"toxic", "safe"} and set(seen["split"]) == {"train"}
    assert not any((isolated_data_dir / "cache" / "tiny" / "activations").iterdir())
    read = lambda name: store.read_table(config.store, name)
    candidates = read("direction_candidates")
    assert len(candidates) == 2 * 4 and candidates["chosen"].sum() == 1  # 2 layers x 4 positions
    chosen = candidates[candidates["chosen"]].iloc[0]
    directions = read("refusal_directions")
    global_rows = directions[directions["scope"] == "global"]
    assert len(global_rows) == 2 and global_rows["chosen"].sum() == 1
    assert global_rows.loc[global_rows["chosen"], "layer"].item() == chosen["layer"]
    assert len(global_rows["vector"].iloc[0]) == 64
    effects = read("direction_effects")
    assert set(effects["condition"]) == {"baseline", "ablation", "addition"}
    assert set(effects.loc[effects["condition"] == "ablation", "kind"]) == {"toxic", "hard"}
    cross = read("cross_ablation")
    assert {"none", "global", "hate"} <= set(cross["ablated"]) and set(cross["category"]) >= {"hate", "violence"}
    cosines = read("category_cosines")
    assert cosines.groupby("variant").size().tolist() == [100] * 4
    assert np.allclose(cosines.query("category_a == category_b")["cosine"], 1, atol=1e-5)
    assert any("removed" in v for v in cosines["variant"]) and any("instruction" in v for v in cosines["variant"])
    specificity = read("cross_ablation_specificity").iloc[0]
    assert specificity["ci_low"] <= specificity["difference"] <= specificity["ci_high"]
    assert specificity["n_prompts"] == cross.query("ablated == 'none'")["n"].sum()  # every toxic test prompt
    separation = read("layer_separation")
    assert set(separation["model"]) == {"base", "tuned"} and len(separation) == 4
    assert set(read("direction_projections")["model"]) == {"base", "tuned"}
    harmlessness = read("direction_harmlessness")
    ablated = harmlessness.query("condition == 'ablation'")
    assert (ablated["n_not_leaning"] <= ablated["n"]).all() and (ablated["median_kl"] >= 0).all()
    assert harmlessness[["model", "condition"]].values.tolist() == [
        ["tuned", "baseline"], ["tuned", "ablation"], ["base", "baseline"], ["base", "ablation"]]
    assert set(effects["model"]) == {"base", "tuned"}  # the other model is tested at the same site


def test_directions_fit_and_validate_only_on_prompts_the_refusal_filter_keeps(tmp_path, tiny_model_dir,
                                                                               monkeypatch) -> None:
    """Arditi et al.'s filter: the chosen direction is the mean difference over the toxic fit prompts the
    model refuses and the safe ones it does not, and validation samples only such prompts."""
    from engine.data.prompts import stable_split
    from engine.directions.scoring import refusal_scores_under_ablation
    from engine.runtime.activations import capture, prompt_end_positions
    from engine.runtime.models import load_model
    from engine.runtime.scoring import next_token_logprobs

    # The random tiny model would refuse nothing. Counted as refusal tokens, its likeliest next tokens
    # up to half the probability mass on average make its refusal scores straddle 0, so the filter
    # keeps part of each kind.
    model = load_model(str(tiny_model_dir))
    mean_probs = np.exp(next_token_logprobs(model, list(load_builtin()["text"]), batch_size=64)).mean(0)
    order = np.argsort(-mean_probs)
    refusal_ids = order[: int(np.searchsorted(np.cumsum(mean_probs[order]), 0.5)) + 1].tolist()
    monkeypatch.setattr(directions_stage, "refusal_token_ids", lambda tokens, role: refusal_ids)
    validated: list[str] = []
    score_candidates = directions_stage.score_candidates
    monkeypatch.setattr(directions_stage, "score_candidates", lambda model, candidates, layers, labels, ids, toxic,
                        safe, **kwargs: (validated.extend([*toxic, *safe]),
                                         score_candidates(model, candidates, layers, labels, ids, toxic, safe,
                                                          **kwargs))[1])
    config = _study_with_directions(tmp_path, tiny_model_dir, 0.3, directions={
        "model": "base", "max_validation_prompts": 4, "bootstrap": 10, "eval_max_new_tokens": 2,
        "prune_last_fraction": 0.0, "max_kl": 10.0}, models={"base": str(tiny_model_dir), "other": str(tiny_model_dir)})
    assert config.directions.filter_by_refusal  # the default
    pipeline.run_pipeline(config, STAGES)
    # The other model (the same weights) fits its direction on the same, the studied model's, prompts,
    # so ablating it does exactly what ablating the studied model's does.
    kl = store.read_table(config.store, "direction_harmlessness").set_index(["model", "condition"])["mean_kl"]
    assert kl["other", "ablation"] == pytest.approx(kl["base", "ablation"], rel=1e-5) and kl["base", "ablation"] > 0
    prompts = store.read_table(config.store, "prompts")
    chosen = store.read_table(config.store, "refusal_directions").query("scope == 'global' and chosen").iloc[0]

    scores = refusal_scores_under_ablation(model, None, list(prompts["text"]), refusal_ids, batch_size=64)
    refused_kind = prompts["kind"].map({"toxic": True, "safe": False}).to_numpy()  # hard: NaN, never equal
    kept = prompts[refused_kind == (scores > 0)]
    assert set(validated) <= set(kept["text"]) and validated
    validation = kept["text"].map(lambda t: stable_split("validation:" + t, config.directions.validation_fraction))
    fit = kept[(kept["split"] == "train") & (validation == "train")]
    assert 0 < (fit["kind"] == "toxic").sum() < (prompts.query("split == 'train'")["kind"] == "toxic").sum() - 5
    offset = prompt_end_positions(model.tokenizer).offsets[int(chosen["position"])]
    acts = capture(model, list(fit["text"]), [f"blocks.{int(chosen['layer'])}.hook_resid_pre"], [offset],
                   batch_size=64)[:, 0, 0]
    toxic = (fit["kind"] == "toxic").to_numpy()
    expected = acts[toxic].mean(0) - acts[~toxic].mean(0)
    assert np.allclose(np.asarray(chosen["vector"]), expected, atol=1e-4)


def test_directions_stage_names_a_group_the_refusal_filter_empties(tmp_path, tiny_model_dir) -> None:
    from engine.errors import ExplorerError

    # The random tiny model refuses no toxic prompt by its refusal score: the filter keeps none.
    config = _study_with_directions(tmp_path, tiny_model_dir, 0.3, directions={"model": "base", "bootstrap": 10})
    with pytest.raises(ExplorerError, match=r"No prompts left in group\(s\) \['toxic'.*after the refusal filter.*"
                                            r"filter_by_refusal: false"):
        pipeline.run_pipeline(config, STAGES)


def test_directions_stage_names_an_empty_category(tmp_path, tiny_model_dir, prompt_file) -> None:
    from engine.errors import ExplorerError

    config = parse_config({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(tiny_model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(prompt_file),
                                 "mapping": {"category": "category", "kind": "kind"}}],
                    "test_fraction": 0.5, "categories": ["hate", "violence"]},
        "generation": {"max_new_tokens": 2, "batch_size": 64},
        "directions": {"model": "base", "bootstrap": 10, "eval_max_new_tokens": 2, "filter_by_refusal": False},
    })
    prompts = pd.read_csv(prompt_file)
    prompts[~((prompts["category"] == "violence") & (prompts["kind"] == "toxic"))].to_csv(prompt_file, index=False)
    with pytest.raises(ExplorerError, match=r"No toxic training prompts in category \['violence'\]"):
        pipeline.run_pipeline(config, STAGES)


def _study_with_directions(tmp_path: Path, model_dir: Path, test_fraction: float, **sections) -> object:
    """A tiny one-model study with a directions section, plus `sections`."""
    return parse_config({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(model_dir)},
        "prompts": {"test_fraction": test_fraction},
        "generation": {"max_new_tokens": 4, "batch_size": 64, "chunk_size": 1024},
        "directions": {"model": "base", "max_validation_prompts": 4, "bootstrap": 10, "eval_max_new_tokens": 2,
                       "filter_by_refusal": False,
                       "prune_last_fraction": 0.0, "max_kl": 10.0},
        **sections,
    })


def test_saes_stage_trains_and_describes_features(tmp_path, tiny_model_dir, monkeypatch, isolated_data_dir) -> None:
    from engine.saes.training import ActivationRows
    from precompute.stages import saes as saes_stage

    config = _study_with_directions(tmp_path, tiny_model_dir, 0.3, saes={
        "model": "base", "layer_offsets": [0], "expansion": 2, "k": 8, "steps": 60, "batch_size": 128,
        "lr": 3e-3, "attribution_prompts": 8, "top_examples": 3})
    sources = []
    train_sae = saes_stage.train_sae
    monkeypatch.setattr(saes_stage, "train_sae", lambda training, activations, *args, **kwargs: (
        sources.append(activations), train_sae(training, activations, *args, **kwargs))[1])
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports["saes"] == "ran"
    # trained from the corpus' activations on disk, read a batch at a time; the scratch file is gone
    assert len(sources) == 1 and isinstance(sources[0], ActivationRows) and isinstance(sources[0].values, np.memmap)
    assert not any((isolated_data_dir / "cache" / "tiny" / "sae_corpus").iterdir())
    read = lambda name: store.read_table(config.store, name)
    chosen = read("refusal_directions").query("scope == 'global' and chosen")["layer"].item()
    saes = read("saes")
    assert saes["hook"].tolist() == [f"blocks.{chosen}.hook_resid_pre"] and saes["d_sae"].item() == 128
    row = saes.iloc[0]
    assert row["l0"] == pytest.approx(8, abs=0.01) and 0 < row["fraction_variance_unexplained"] < 1
    assert row["ce_clean"] <= row["ce_spliced"] and row["n_train_tokens"] + row["n_held_out_tokens"] <= row[
        "n_corpus_tokens"]
    assert (config.store.parent / row["path"] / "cfg.json").is_file()
    features = read("features")
    assert len(features) == 128 and features["density"].between(0, 1).all()
    assert features["density"].sum() == pytest.approx(8, abs=0.01)  # top-k: k latents fire per token
    examples = read("feature_examples")
    corpus = read("sae_corpus")
    for example in examples.head(20).itertuples():
        tokens = corpus.loc[corpus["text_id"] == example.text_id, "tokens"].item()
        assert len(example.token_activations) == len(tokens)
        assert example.token_activations[example.position] == pytest.approx(example.activation, rel=1e-5)
        assert max(example.token_activations) == pytest.approx(example.activation, rel=1e-5)
    assert examples.groupby("feature")["rank"].max().max() <= 2
    groups = read("feature_groups")
    assert set(groups["kind"]) == {"toxic", "hard", "safe"} and groups["firing_rate"].between(0, 1).all()
    cosines = read("feature_direction_cosines")
    assert {"global", "hate"} <= set(cosines["scope"]) and cosines["cosine"].abs().max() <= 1 + 1e-6
    assert np.isfinite(features["attribution"]).all()
    # per-prompt statistics read each prompt's own decision token (the chosen direction's position)
    from engine.runtime.activations import capture, prompt_end_positions
    from engine.runtime.models import load_model
    from engine.saes.training import load_sae

    model, sae = load_model(str(tiny_model_dir)), load_sae(str(config.store.parent / row["path"]))
    position = read("refusal_directions").query("scope == 'global' and chosen")["position"].item()
    offset = prompt_end_positions(model.tokenizer).offsets[position]
    prompts = read("prompts").query("category == 'hate' and kind == 'toxic'")
    acts = capture(model, list(prompts["text"]), [row["hook"]], [offset], batch_size=8)[:, 0, 0]
    expected = sae.encode(torch.from_numpy(acts)).detach().numpy().mean(0)
    stored = groups.query("category == 'hate' and kind == 'toxic'").sort_values("feature")["mean_activation"]
    assert np.allclose(stored.to_numpy(), expected, atol=1e-4)
    assert all(len(t) == 10 for t in features["top_tokens"])
    # unchanged: skipped; trained SAE folder gone: re-run
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}["saes"] == "skipped"
    import shutil

    shutil.rmtree(config.store.parent / row["path"])
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}["saes"] == "ran"


def test_saes_stage_rerun_after_a_crash_loads_the_saes_it_had_trained(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from precompute.stages import saes as saes_stage

    config = _study_with_directions(tmp_path, tiny_model_dir, 0.3, saes={
        "model": "base", "layer_offsets": [-1, 0], "expansion": 2, "k": 8, "steps": 20, "batch_size": 128,
        "attribution_prompts": 8, "top_examples": 3})
    trained: list[str] = []
    train_sae = saes_stage.train_sae

    def second_crashes(training, activations, hook, *args, **kwargs):
        if len(trained) == 1:
            raise RuntimeError("power cut")
        trained.append(hook)
        return train_sae(training, activations, hook, *args, **kwargs)

    monkeypatch.setattr(saes_stage, "train_sae", second_crashes)
    with pytest.raises(RuntimeError, match="power cut"):
        pipeline.run_pipeline(config, STAGES, until="saes")
    assert store.stage_hash(config.store, "saes") is None and len(trained) == 1
    monkeypatch.setattr(saes_stage, "train_sae", lambda training, activations, hook, *args, **kwargs: (
        trained.append(hook), train_sae(training, activations, hook, *args, **kwargs))[1])
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES, until="saes")}["saes"] == "ran"
    saes = store.read_table(config.store, "saes")
    first, second = trained  # the re-run trained only the SAE the crash had left untrained
    assert sorted(saes["hook"]) == sorted([first, second]) and first != second
    assert (saes["path"].map(lambda path: (config.store.parent / path / "cfg.json").is_file())).all()


def test_saes_stage_loads_a_saved_sae_through_the_pretrained_path(tmp_path, tiny_model_dir, prompt_file) -> None:
    from engine.errors import ExplorerError
    from engine.saes.training import SaeTraining, save_sae, train_sae

    hook = "blocks.1.hook_resid_pre"
    training = SaeTraining(expansion=2, k=4, steps=20, batch_size=64)
    saved = save_sae(train_sae(training, torch.randn(256, 64), hook, "tiny"), tmp_path / "my_sae")
    raw = {
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(tiny_model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(prompt_file),
                                 "mapping": {"category": "category", "kind": "kind"}}], "test_fraction": 0.5},
        "generation": {"max_new_tokens": 3, "batch_size": 64},
        "saes": {"model": "base", "pretrained": [{"path": str(saved)}], "attribution_prompts": 4},
    }
    config = parse_config(raw)
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}["saes"] == "ran"
    row = store.read_table(config.store, "saes").iloc[0]
    assert (row["hook"], row["source"], row["path"], row["d_sae"]) == (hook, "pretrained", str(saved), 128)
    assert len(store.read_table(config.store, "features")) == 128

    narrow = save_sae(train_sae(training, torch.randn(256, 16), hook, "other"), tmp_path / "narrow")
    raw["saes"]["pretrained"] = [{"path": str(narrow)}]
    with pytest.raises(ExplorerError, match="d_in=16, but .* d_model=64"):
        pipeline.run_pipeline(parse_config(raw), STAGES)
    raw["saes"]["pretrained"] = [{"path": str(tmp_path / "missing")}]
    with pytest.raises(ExplorerError, match="No SAE at .*missing"):
        pipeline.run_pipeline(parse_config(raw), STAGES)


def test_steering_stage_measures_every_intervention_and_resumes(tmp_path, tiny_model_dir, monkeypatch,
                                                                caplog) -> None:
    config = _study_with_directions(
        tmp_path, tiny_model_dir, 0.2,
        saes={"model": "base", "layer_offsets": [0], "expansion": 2, "k": 8, "steps": 40, "batch_size": 128,
              "attribution_prompts": 8},
        steering={"model": "base", "top_features": 2, "eval_max_new_tokens": 2})
    real_kl_divergence = steering_stage.kl_divergence
    calls: list[int] = []

    def crash_in_the_second_intervention(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real_kl_divergence(*args)

    monkeypatch.setattr(steering_stage, "kl_divergence", crash_in_the_second_intervention)
    generated: list[str] = []
    real_judged_answers = steering_stage.judged_answers
    monkeypatch.setattr(steering_stage, "judged_answers",
                        lambda *args, **kwargs: generated.append(args[2]) or real_judged_answers(*args, **kwargs))
    with pytest.raises(RuntimeError, match="power cut"):
        pipeline.run_pipeline(config, STAGES)
    assert generated == []  # the global direction (measured before the crash) generated nothing itself
    assert store.stage_hash(config.store, "steering") is None  # nothing half-written
    monkeypatch.setattr(steering_stage, "kl_divergence", real_kl_divergence)
    with caplog.at_level(logging.INFO, logger=steering_stage.logger.name):
        reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports["steering"] == "ran"
    read = lambda name: store.read_table(config.store, name)
    effects = read("steering_effects")
    features = read("features").query("density > 0").nlargest(2, "attribution")["feature"]
    names = {"global", *read("prompts").query("kind == 'toxic'")["category"].unique(),
             *(f"feature {f}" for f in features)}
    assert set(effects["intervention"]) == names
    # the re-run measured every intervention but the one finished before the crash (the global direction)
    measured = [r.getMessage().removeprefix("Steering with ") for r in caplog.records
                if r.getMessage().startswith("Steering with ")]
    assert "global" not in measured and sorted(measured) == sorted(names - {"global"})
    prompts = read("prompts").query("split == 'test'")
    suppress = effects.query("intervention == 'global' and mode == 'suppress'")
    assert suppress["n"].sum() == len(prompts)  # every test prompt, once
    force = effects.query("intervention == 'global' and mode == 'force'")
    assert set(force["kind"]) == {"hard", "safe"} and force["n"].sum() == (prompts["kind"] != "toxic").sum()
    # the baseline column is the same for every intervention: one unsteered pass
    assert effects.groupby(["mode", "category", "kind"])["baseline_rate_by_score"].nunique().max() == 1
    harmlessness = read("steering_harmlessness").set_index("intervention")
    assert harmlessness.loc["global", "mean_kl"] > 0 and np.isfinite(harmlessness.loc["global", "cross_entropy"])
    assert np.isnan(harmlessness.loc["hate", "cross_entropy"])  # completions scored for global and features
    rates = read("steering_rates")
    assert set(rates["intervention"]) == {"global", *(f"feature {f}" for f in features)}
    toxic = (prompts["kind"] == "toxic").sum()
    assert rates.query("intervention == 'global' and mode == 'suppress'")["n"].item() == toxic
    # the global direction's answers are the directions stage's, not generated a second time
    steered = read("steering_generations").query("intervention == 'global'")
    directed = read("direction_generations").query("model == 'base' and condition in ('ablation', 'addition')")
    directed = directed[((directed["condition"] == "ablation") & (directed["kind"] == "toxic"))
                        | ((directed["condition"] == "addition") & (directed["kind"] == "safe"))]
    assert sorted(zip(steered["prompt_id"], steered["response"], strict=True)) == sorted(
        zip(directed["prompt_id"], directed["response"], strict=True))


def test_steering_another_model_generates_the_global_directions_answers_itself(tmp_path, tiny_model_dir,
                                                                              monkeypatch) -> None:
    """The directions stage answers each model under that model's own direction; steering applies the studied
    model's, so for another model it may not reuse those answers."""
    directions = {"model": "other", "max_validation_prompts": 4, "bootstrap": 10, "eval_max_new_tokens": 2,
                  "filter_by_refusal": False, "prune_last_fraction": 0.0, "max_kl": 10.0}
    config = _study_with_directions(tmp_path, tiny_model_dir, 0.2, models={"base": str(tiny_model_dir),
                                                                          "other": str(tiny_model_dir)},
                                    directions=directions, steering={"model": "base", "top_features": 0,
                                                                     "eval_max_new_tokens": 2})
    generated: list[str] = []
    real_judged_answers = steering_stage.judged_answers
    monkeypatch.setattr(steering_stage, "judged_answers",
                        lambda *args, **kwargs: generated.append(args[2]) or real_judged_answers(*args, **kwargs))
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports["steering"] == "ran" and generated == ["suppress", "force"]
    steered = store.read_table(config.store, "steering_generations").query("intervention == 'global'")
    assert set(steered["mode"]) == {"suppress", "force"}
    # answer_prompts: the answers cover a seeded sample per kind; the refusal score still reads every prompt
    sampled = dataclasses.replace(config, steering=dataclasses.replace(config.steering, answer_prompts=3))
    reports = {r.stage: r.status for r in pipeline.run_pipeline(sampled, STAGES)}
    assert reports["steering"] == "ran"
    read = lambda name: store.read_table(config.store, name)
    test = read("prompts").query("split == 'test'")
    steered = read("steering_generations")
    for mode, kind in (("suppress", "toxic"), ("force", "safe")):
        expected = seeded_sample(test, kind, 3, 0)["id"]
        assert sorted(steered.query("mode == @mode")["prompt_id"]) == sorted(expected) and len(expected) == 3
    assert read("steering_effects").query("intervention == 'global' and mode == 'suppress'")["n"].sum() == len(test)


def test_circuits_stage_builds_compares_and_names_a_small_category(tmp_path, tiny_model_dir) -> None:
    builtin = load_builtin()
    few_violence = builtin[(builtin["category"] == "violence") & (builtin["kind"] == "toxic")].head(3)
    prompts = pd.concat([builtin[~((builtin["category"] == "violence") & (builtin["kind"] == "toxic"))],
                         few_violence])
    path = tmp_path / "prompts.csv"
    prompts[["text", "category", "kind"]].to_csv(path, index=False)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    config = parse_config({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(tiny_model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(path),
                                 "mapping": {"category": "category", "kind": "kind"}}], "test_fraction": 0.3},
        "generation": {"max_new_tokens": 2, "batch_size": 64, "chunk_size": 1024},
        "saes": {"model": "base", "hooks": hooks, "expansion": 2, "k": 8, "steps": 40, "batch_size": 128,
                 "attribution_prompts": 8},
        "circuits": {"model": "base", "max_prompts": 10, "min_prompts": 8, "max_nodes": 6, "stored_nodes": 20,
                     "faithfulness_sizes": [2, 4], "bootstrap": 20, "permutations": 49, "split_halves": 5,
                     "patch_prompts": 4, "exact_sites": 2},
    })
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports["circuits"] == "ran"
    read = lambda name: store.read_table(config.store, name)
    summary = read("circuits").set_index(["kind", "category"])
    skipped = summary.loc[("toxic", "violence")]
    assert skipped["status"] == "skipped"
    assert "toxic/violence has 3 prompt(s); its statistics need at least 8" in skipped["message"]
    ok = summary[summary["status"] == "ok"]
    # 9 toxic and 10 hard categories; the built-in safe prompts have no category ("none")
    assert len(ok) == 20 and (ok["n_prompts"] == 10).all() and ok["faithfulness"].notna().all()
    assert ok["ceiling"].notna().all() and np.isnan(skipped["faithfulness"])

    nodes = read("circuit_nodes")
    per_circuit = nodes.groupby(["kind", "category"])
    assert per_circuit["in_circuit"].sum().eq(6).all() and per_circuit.size().eq(20).all()
    first = nodes.query("kind == 'toxic' and category == 'hate'").sort_values("rank")
    assert (np.diff(first["effect"].abs()) <= 1e-9).all()  # ranked by |effect|
    assert first["in_circuit"].tolist() == [True] * 6 + [False] * 14
    assert set(nodes["hook"]) == set(hooks) and set(nodes.query("feature == -1")["hook"]) <= set(hooks)

    faithfulness = read("circuit_faithfulness")
    stated = faithfulness.query("is_circuit")
    assert len(stated) == 20 and (stated["n_nodes"] == 6).all()
    assert set(faithfulness["n_nodes"]) == {2, 4, 6}
    assert (faithfulness["metric_full"] != faithfulness["metric_empty"]).all()

    edges = read("circuit_edges").query("kind == 'toxic' and category == 'hate'")
    hate = first[first["in_circuit"]]
    n_up, n_down = (hate["hook"] == hooks[0]).sum(), (hate["hook"] == hooks[1]).sum()
    assert len(edges) == n_up * n_down and np.isfinite(edges["effect"]).all()

    similarity = read("circuit_similarity")
    assert len(similarity) == 20 * 19 // 2 and similarity["cosine"].between(-1 - 1e-9, 1 + 1e-9).all()
    same = similarity["kind_a"] == similarity["kind_b"]
    assert similarity.loc[same, "p_value"].between(0, 1).all() and similarity.loc[~same, "p_value"].isna().all()
    verdicts = read("circuit_verdicts").set_index("kind")
    assert verdicts.loc["toxic", "n_categories"] == 9 and verdicts.loc["hard", "n_categories"] == 10
    assert "safe" not in verdicts.index  # one safe circuit: nothing to compare
    assert set(verdicts["label"]) <= {"monolithic", "partially modular", "modular", "inconclusive"}
    assert verdicts["p_value"].between(0, 1).all() and (verdicts["ratio_low"] <= verdicts["ratio_high"]).all()
    assert (similarity.loc[same, "p_holm"] >= similarity.loc[same, "p_value"]).all()
    calibration = read("circuit_calibration").query("purpose == 'grid'")
    assert calibration.groupby("kind")["share"].apply(list).to_dict() == {
        kind: [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8] for kind in ("toxic", "hard")}
    assert (calibration.query("share == 0")["truth"] == "monolithic").all()
    core = read("circuit_core").query("kind == 'toxic'")
    assert (core["share"] == core["n_circuits"] / 9).all()
    assert (core["categories"].map(len) == core["n_circuits"]).all()
    assert core["in_core"].tolist() == (core["share"] >= 0.7).tolist()

    components = read("circuit_components")
    assert "violence" not in set(components["category"]) and components["category"].nunique() == 9
    estimated = components.query("method == 'attribution'")
    assert len(estimated) == 9 * (2 * 2 + 2 * 4)  # 2 layers x (attn, mlp) + 2 layers x 4 heads
    assert set(estimated["component"]) == {"attn", "mlp", "head"}
    exact = components.query("method == 'exact'")
    assert len(exact) == 9 * 2 and np.isfinite(components["effect"]).all()
    # the exact re-checks are each category's two largest attribution estimates
    for category, rows in exact.groupby("category"):
        top = estimated[estimated["category"] == category].assign(size=lambda f: f["effect"].abs()).nlargest(2, "size")
        assert set(zip(rows["hook"], rows["head"], strict=True)) == set(zip(top["hook"], top["head"], strict=True))
