"""Slow checks on the real embedded model and the built demo study (`make test-slow`)."""

from __future__ import annotations

import pytest
import yaml

from engine.data import store
from engine.data.paths import REPO_ROOT
from engine.runtime.models import EMBEDDED_BASE, load_model
from precompute.config import load_config, parse_config
from precompute.pipeline import run_pipeline
from precompute.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_store(monkeypatch):
    """The real demo study (built here if missing: 25 minutes on 2 AVX512-BF16 cores, over an hour on AVX2)."""
    monkeypatch.delenv("REFUSAL_EXPLORER_DATA", raising=False)
    config = load_config(REPO_ROOT / "precompute" / "configs" / "demo.yaml")
    run_pipeline(config, STAGES)
    return config.store


def test_tuned_model_meets_refusal_targets(demo_store) -> None:
    rates = store.read_table(demo_store, "refusal_rates")
    by_kind = rates.groupby(["model", "kind"])[["n", "n_refused"]].sum()
    rate = (by_kind["n_refused"] / by_kind["n"]).to_dict()
    assert rate[("tuned", "toxic")] >= 0.90
    assert rate[("tuned", "safe")] <= 0.05
    assert rate[("base", "toxic")] < rate[("tuned", "toxic")]


def test_judges_agree_on_the_tuned_model(demo_store) -> None:
    agreement = store.read_table(demo_store, "judge_agreement").set_index(["model", "kind"])
    assert agreement.loc[("tuned", "all"), "auroc"] >= 0.9
    tokens = store.read_table(demo_store, "refusal_tokens")
    assert set(tokens.loc[tokens["model"] == "tuned", "source"]) == {"model-refusals"}


def test_embedded_model_answers_coherently(monkeypatch) -> None:
    monkeypatch.delenv("REFUSAL_EXPLORER_DATA", raising=False)
    from engine.runtime.generation import generate

    model = load_model(EMBEDDED_BASE, device="cpu")
    answer = generate(model, ["What is the capital of France?"], max_new_tokens=12, batch_size=1)[0]
    assert "Paris" in answer.text


def test_demo_saes_meet_quality_targets(demo_store) -> None:
    saes = store.read_table(demo_store, "saes")
    assert len(saes) == 2 and (saes["source"] == "trained").all()
    assert (saes["fraction_variance_unexplained"] <= 0.3).all()
    assert (saes["dead_fraction"] <= 0.2).all()
    assert (saes["ce_loss_recovered"] >= 0.8).all()


def test_a_refusal_aligned_feature_prefers_toxic_prompts(demo_store) -> None:
    features = store.read_table(demo_store, "features")
    layer = store.read_table(demo_store, "saes")["layer"].max()  # the refusal layer's SAE
    here = features[(features["hook"] == f"blocks.{layer}.hook_resid_pre") & (features["density"] > 0)]
    aligned = here.assign(alignment=here["refusal_cosine"].abs()).nlargest(20, "alignment")
    assert (aligned["toxic_safe_ratio"] >= 3).any()


def test_global_direction_suppresses_and_forces_refusal(demo_store) -> None:
    rates = store.read_table(demo_store, "steering_rates").query("intervention == 'global'").set_index("mode")
    assert 1 - rates.loc["suppress", "rate"] >= 0.8  # toxic prompts answered with the direction ablated
    assert rates.loc["force", "rate"] >= 0.8  # safe prompts refused with the direction added


def test_chosen_direction_is_causal_on_the_test_split(demo_store) -> None:
    """Issue 3's targets on the tuned model's test prompts (judged answers)."""
    from app.findings import study_findings

    direction = study_findings(demo_store).direction
    assert direction is not None and direction.model == "tuned"
    assert direction.toxic_ablated.rate <= 0.2  # bypass: toxic prompts still refused with it ablated
    assert direction.safe_added.rate >= 0.8  # induce: safe prompts refused with it added
    assert direction.separation_sigma >= 2 and direction.probe_accuracy >= 0.9
    # KL <= 0.1 on the safe prompts the model does not lean to refuse (Arditi et al.'s harmless
    # population, the one the direction is chosen on); over all of them, where ablation also undoes
    # the tuned model's few over-refusals, about 0.13 (see the README).
    assert direction.kl_answered <= 0.1 and direction.n_answered >= 0.9 * direction.n_safe
    assert direction.kl <= 0.15


def test_reduced_positive_control_is_not_called_monolithic(tmp_path, monkeypatch) -> None:
    """Issue 22's positive control, reduced: demo-modular.yaml's tune (each category refused in its own
    words) on fewer plain instructions, no feature steering and no held-out sets (the SAEs keep their
    1,500 steps: at 750 the demo's layer-14 SAE had 59% dead features).
    Refusal differs by category by construction, so the verdict must not say "one shared mechanism"."""
    monkeypatch.delenv("REFUSAL_EXPLORER_DATA", raising=False)
    raw = yaml.safe_load((REPO_ROOT / "precompute" / "configs" / "demo-modular.yaml").read_text(encoding="utf-8"))
    raw.pop("evaluation")
    raw["store"] = str(tmp_path / "control.duckdb")
    raw["models"]["tuned"] = "smollm2-135m-refusal-modular-reduced"  # not the full control's folder
    raw["tune"]["plain_per_toxic"] = 1.0
    raw["steering"]["top_features"] = 0
    config = parse_config(raw)
    run_pipeline(config, STAGES)
    verdicts = store.read_table(config.store, "circuit_verdicts").set_index("kind")
    assert verdicts.loc["toxic", "label"] != "monolithic", verdicts.loc["toxic", "reason"]
    assert verdicts.loc["toxic", "decoding_p"] <= 0.05  # categories told apart by their node effects
