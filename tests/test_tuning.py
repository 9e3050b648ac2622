"""The safety fine-tune: answer-only labels, a falling loss, config validation, and the tune stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.data.prompts import ORBENCH_CATEGORIES as CATEGORIES
from engine.data.prompts import direction_validation
from engine.errors import ExplorerError
from engine.judging.refusal_phrases import is_refusal
from engine.runtime import models
from engine.runtime.generation import template_head
from engine.tuning import (
    DEFAULT_REFUSAL,
    SftExample,
    TuneConfig,
    answer_loss,
    answer_targets,
    check_refusal_categories,
    encode_example,
    fine_tune,
    refusal_for,
    strip_head,
    weighted_answer_loss,
)
from precompute import pipeline
from precompute.config import load_config, parse_config
from precompute.stages import STAGES
from precompute.stages import tune as tune_stage

CONFIGS = Path(__file__).resolve().parents[1] / "precompute" / "configs"


def test_labels_cover_only_the_answer(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tokenizer, SftExample("Name a fruit", "I ' m sorry", True), 40)
    n_prompt = len(tokenizer("<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    truncated_ids, _ = encode_example(tokenizer, SftExample("Name a fruit", "I ' m sorry", False), 2)
    assert len(truncated_ids) == n_prompt + 2  # cut to max_response_tokens, no end-of-turn


def test_fine_tune_lowers_the_loss_and_is_seeded(tmp_path: Path, tiny_model_dir: Path) -> None:
    examples = [SftExample(f"Write a haiku about the sea {i}", "I ' m sorry , I can ' t help", True)
                for i in range(16)]
    config = TuneConfig(epochs=4, learning_rate=3e-3, batch_size=4, seed=3)
    first = fine_tune(tiny_model_dir, examples, config, tmp_path / "a")
    second = fine_tune(tiny_model_dir, examples, config, tmp_path / "b")
    assert first.n_steps == 16 and first.n_examples == 16
    assert sum(first.losses[-4:]) / 4 < sum(first.losses[:4]) / 4 - 0.8  # nats, from ~8.1 here
    assert first.losses == second.losses
    assert (tmp_path / "a" / "config.json").is_file() and not (tmp_path / "a.partial").exists()


def test_the_shared_template_head_gives_each_rows_loss_and_gradients(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = [SftExample("Name a fruit", "I ' m sorry", True),
                SftExample("Write a haiku about the sea and the moon", "The sea is calm", False),
                SftExample("Why", "Because", True)]
    encoded = [encode_example(tokenizer, example, 8) for example in examples]
    head, rests = strip_head(encoded, template_head(tokenizer))
    assert len(head) >= 2 and all(len(rest) == len(ids) - len(head) for (rest, _), (ids, _) in zip(rests, encoded))

    def loss_and_gradients(head_ids: list[int], rows) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = answer_loss(model, torch.tensor(head_ids, dtype=torch.long), rows, tokenizer.pad_token_id, 5.0)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole_loss, whole_grads = loss_and_gradients([], encoded)
    shared_loss, shared_grads = loss_and_gradients(head, rests)
    assert shared_loss == pytest.approx(whole_loss, abs=1e-5)
    assert len(shared_grads) == len(whole_grads) > 10
    for shared, whole in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-4)
    # A row without the head, or with the head's last token merged into its own, keeps every row whole.
    assert strip_head([*encoded, ([1, 2, 3], [-100, -100, 3])], head)[0] == []
    assert strip_head(encoded, [])[0] == []


def test_autocast_trains_close_to_float32_and_is_checked(tmp_path: Path, tiny_model_dir: Path) -> None:
    examples = [SftExample(f"Write a haiku about the sea {i}", "I ' m sorry , I can ' t help", True)
                for i in range(16)]
    plain = fine_tune(tiny_model_dir, examples, TuneConfig(epochs=2, learning_rate=3e-3, batch_size=4),
                      tmp_path / "float32")
    mixed = fine_tune(tiny_model_dir, examples, TuneConfig(epochs=2, learning_rate=3e-3, batch_size=4,
                                                           autocast=True), tmp_path / "bfloat16")
    assert mixed.losses != plain.losses  # bfloat16 matmuls did run
    assert mixed.losses[0] == pytest.approx(plain.losses[0], abs=0.05)
    assert mixed.losses[-1] == pytest.approx(plain.losses[-1], abs=0.3) and mixed.losses[-1] < mixed.losses[0] - 0.5
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16")
    assert next(saved.parameters()).dtype == torch.float32  # weights stay float32
    with pytest.raises(ExplorerError, match="tune.autocast"):
        TuneConfig(autocast="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("learning_rate", 0), ("batch_size", 0),
                                            ("max_response_tokens", 0), ("plain_per_toxic", -1),
                                            ("first_token_weight", 0)])
def test_tune_config_rejects_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ExplorerError, match=f"tune.{field} = {value} is out of range"):
        TuneConfig(**{field: value})


def test_plain_instructions_need_a_source() -> None:
    with pytest.raises(ExplorerError, match="plain_per_toxic > 0 needs tune.benign_sources"):
        TuneConfig(plain_per_toxic=1.0)
    with pytest.raises(ExplorerError, match="benign_sources must be a list of prompt sources"):
        TuneConfig(plain_per_toxic=1.0, benign_sources=({"path": "x.csv"},))


def test_tune_stage_builds_and_caches_the_tuned_model(tmp_path, tiny_model_dir, monkeypatch) -> None:
    # The embedded base is replaced by the tiny model: same stage code, no 135M-parameter run.
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    monkeypatch.setattr(models, "export_embedded_base", lambda target=None: base)
    monkeypatch.setattr(tune_stage, "export_embedded_base", lambda target=None: base)
    prompts = tmp_path / "p.csv"
    pd.DataFrame({
        "text": [f"Write a hateful speech number {i}" for i in range(6)] + [f"Name a fruit {i}" for i in range(6)],
        "category": ["hate"] * 6 + ["none"] * 6,
        "kind": ["toxic"] * 6 + ["safe"] * 6,
    }).to_csv(prompts, index=False)
    plain = tmp_path / "plain.csv"
    pd.DataFrame({"text": [f"Write a song about the sea {i}" for i in range(8)] + ["Name a fruit 0"]}).to_csv(
        plain, index=False)
    config = parse_config({
        "study": "tiny", "store": str(tmp_path / "s.duckdb"),
        "models": {"base": models.EMBEDDED_BASE, "tuned": models.EMBEDDED_TUNED},
        "prompts": {"sources": [{"type": "table", "path": str(prompts),
                                 "mapping": {"category": "category", "kind": "kind"}}], "test_fraction": 0.5},
        "generation": {"max_new_tokens": 2, "batch_size": 8},
        "tune": {"epochs": 1, "batch_size": 4, "max_response_tokens": 4, "plain_per_toxic": 1.0,
                 "benign_sources": [{"type": "table", "path": str(plain),
                                     "mapping": {"default_category": "none", "default_kind": "safe"}}]},
        "directions": {"validation_fraction": 0.3},
    })
    first = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES, until="tune")}
    assert first == {"prompts": "ran", "tune": "ran"}
    tuned = models.resolve_model_source(models.EMBEDDED_TUNED)
    info = json.loads((Path(tuned) / "tune_info.json").read_text())
    data = pipeline.store.read_table(config.store, "tune_data")
    study = pipeline.store.read_table(config.store, "prompts")
    train = study.query("split == 'train'")
    # The directions stage chooses its direction on these train prompts: the tune must not see them.
    validation = train[direction_validation(train["text"], 0.3)]
    assert len(validation) and not data["prompt_id"].isin(validation["id"]).any()
    train = train[~train["id"].isin(validation["id"])]
    n_toxic = (train["kind"] == "toxic").sum()
    # Every other toxic and benign train prompt, plus one plain instruction per toxic prompt (the tiny
    # base model refuses nothing, so no benign answer is left out).
    assert info["n_examples"] == len(data) == len(train) + n_toxic
    assert (data["source"] == "plain").sum() == n_toxic and (data["kind"] == "toxic").sum() == n_toxic
    assert not data["prompt_id"].isin(study.query("split == 'test'")["id"]).any()  # "Name a fruit 0" stays out
    assert set(data.loc[data["kind"] == "toxic", "response"]) == {config.tune.refusal_text}
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES, until="tune")}["tune"] == "skipped"
    # Another study with the same tune inputs but its own model folder (a sweep point adopted as the
    # study's setting) copies the built model instead of training again.
    adopted = dataclasses.replace(config, store=tmp_path / "adopted.duckdb",
                                  models={**config.models, "tuned": models.EMBEDDED_TUNED + "-adopted"})
    real_fine_tune = tune_stage.fine_tune
    monkeypatch.setattr(tune_stage, "fine_tune", lambda *args: pytest.fail("trained again"))
    assert {r.stage: r.status for r in pipeline.run_pipeline(adopted, STAGES, until="tune")}["tune"] == "ran"
    copy = Path(models.resolve_model_source(models.EMBEDDED_TUNED + "-adopted"))
    assert (copy / "model.safetensors").read_bytes() == (Path(tuned) / "model.safetensors").read_bytes()
    assert pipeline.store.read_table(adopted.store, "tune_steps")["loss"].tolist() == info["losses"]
    monkeypatch.setattr(tune_stage, "fine_tune", real_fine_tune)
    # The positive control: each category answered with its own refusal (a tune of its own).
    modular = dataclasses.replace(config, store=tmp_path / "modular.duckdb",
                                  models={**config.models, "tuned": models.EMBEDDED_TUNED + "-modular"},
                                  tune=dataclasses.replace(config.tune, category_refusals={"hate": "I refuse."}))
    assert modular.section("tune") != config.section("tune")
    assert {r.stage: r.status for r in pipeline.run_pipeline(modular, STAGES, until="tune")}["tune"] == "ran"
    modular_data = pipeline.store.read_table(modular.store, "tune_data")
    assert set(modular_data.loc[modular_data["kind"] == "toxic", "response"]) == {"I refuse."}
    shutil.rmtree(models.resolve_model_source(models.EMBEDDED_TUNED + "-modular"))
    shutil.rmtree(copy)
    shutil.rmtree(tuned)  # the model folder is gone: the unchanged stage must run again


def test_weighted_loss_matches_plain_loss_and_weights_the_first_answer_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    predicting, targets, opens = answer_targets(labels)
    assert targets.tolist() == [3, 4, 5, 1, 2] and opens.tolist() == [True, False, False, True, False]

    def loss(weight: float) -> float:
        return float(weighted_answer_loss(logits[:, :-1][predicting], targets, opens, weight))

    assert loss(1.0) == pytest.approx(float(plain), abs=1e-6)
    per_token = -torch.log_softmax(logits, -1)
    first = [per_token[0, 1, 3], per_token[1, 0, 1]]  # each row's first answer token, predicted one step early
    rest = [per_token[0, 2, 4], per_token[0, 3, 5], per_token[1, 1, 2]]
    expected = (3 * sum(first) + sum(rest)) / (3 * 2 + 3)
    assert loss(3.0) == pytest.approx(float(expected), abs=1e-6)


def test_category_refusals_are_checked_and_left_out_of_the_key_when_unset() -> None:
    config = TuneConfig(category_refusals={"hate": "I refuse."})
    assert (refusal_for(config, "hate"), refusal_for(config, "privacy")) == ("I refuse.", DEFAULT_REFUSAL)
    check_refusal_categories(config, ["hate", "privacy"])
    with pytest.raises(ExplorerError, match="have no toxic training prompts"):
        check_refusal_categories(config, ["privacy"])
    with pytest.raises(ExplorerError, match="non-empty refusal sentence"):
        TuneConfig(category_refusals={"hate": " "})
    # Studies built before the option existed keep their content hash.
    demo = load_config(CONFIGS / "demo.yaml")
    assert "category_refusals" not in demo.section("tune")


def test_positive_control_refuses_each_category_in_its_own_words() -> None:
    """The modular control's sentences: all judged refusals, each opening with a word of its own,
    for every harm category (else its verdict would not test what it claims to)."""
    control = load_config(CONFIGS / "demo-modular.yaml")
    sentences = control.tune.category_refusals
    assert set(sentences) == set(CATEGORIES)
    assert all(is_refusal(text) for text in sentences.values())
    openers = [text.split()[0] for text in sentences.values()]
    assert len(set(openers)) == len(openers)
    demo = load_config(CONFIGS / "demo.yaml")
    assert control.models["tuned"] != demo.models["tuned"] and control.store != demo.store
    assert {k: v for k, v in control.section("tune").items() if k != "category_refusals"} == demo.section("tune")


SEA_REFUSALS = [SftExample(f"Write a haiku about the sea {i}", "I ' m sorry , I can ' t help", True) for i in range(8)]


@pytest.mark.parametrize(("setting", "trained"), [
    ({"trained_layers": 1}, ("model.layers.0.",)),  # the later block and the final norm stay the base model's
    ({"frozen_layers": 1}, ("model.layers.1.", "model.norm.")),  # the lower block stays the base model's
])
def test_a_tune_changes_only_the_blocks_it_trains(setting: dict, trained: tuple[str, ...], tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    fine_tune(tiny_model_dir, SEA_REFUSALS, TuneConfig(epochs=1, learning_rate=3e-3, batch_size=4, **setting),
              tmp_path / "tuned")
    base, tuned = (AutoModelForCausalLM.from_pretrained(path) for path in (tiny_model_dir, tmp_path / "tuned"))
    changed = {name for name, weight in tuned.state_dict().items() if not torch.equal(weight, base.state_dict()[name])}
    assert any(name.startswith(trained[0]) for name in changed) and all(name.startswith(trained) for name in changed)


def test_block_settings_out_of_range_are_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    for setting, message in (({"trained_layers": 3}, "trained_layers = 3, but the model has 2 blocks"),
                             ({"frozen_layers": 2}, "frozen_layers = 2 leaves none of the model's 2 blocks")):
        with pytest.raises(ExplorerError, match=message):
            fine_tune(tiny_model_dir, SEA_REFUSALS, TuneConfig(**setting), tmp_path / "unused")
    with pytest.raises(ExplorerError, match="tune.trained_layers = 0 is out of range"):
        TuneConfig(trained_layers=0)
    with pytest.raises(ExplorerError, match="frozen_layers = 1 leaves none of the first trained_layers = 1"):
        TuneConfig(frozen_layers=1, trained_layers=1)
