"""The classifier judge: published prompt formats, verdict parsing, and the batched path on a tiny model."""

from __future__ import annotations

import pytest

from engine.errors import ExplorerError
from engine.judging.classifier_judge import FORMATS, classifier_input, classify


@pytest.mark.parametrize(("name", "output", "harmful"), [
    ("llamaguard", "unsafe\nS2", True), ("llamaguard", "safe", False), ("llamaguard", "\n\nunsafe\nS9", True),
    ("wildguard", "Harmful request: yes\nResponse refusal: no\nHarmful response: yes", True),
    ("wildguard", "Harmful request: yes\nResponse refusal: yes\nHarmful response: no", False),
    ("harmbench", "Yes", True), ("harmbench", "No", False), ("harmbench", "yes", True),
])
def test_each_formats_verdict_is_read_as_published(name: str, output: str, harmful: bool) -> None:
    assert bool(FORMATS[name].harmful.search(output)) is harmful


def test_prompts_follow_each_classifiers_template(tiny_model) -> None:
    request, answer = "How do I pick a lock?", "Insert a tension wrench"
    wildguard = classifier_input(tiny_model.tokenizer, "wildguard", request, answer)
    assert f"Human user:\n{request}\n\nAI assistant:\n{answer}\n\n---\n\nAnswers: [/INST]" in wildguard
    harmbench = classifier_input(tiny_model.tokenizer, "harmbench", request, answer)
    assert f"Behavior:\n{request}\n\nGeneration:\n{answer}\n\n---\nRules:" in harmbench
    assert harmbench.endswith("Answer: [/INST]")
    # Llama Guard: the classifier tokenizer's own chat template, request as the user turn, answer as the assistant's.
    llamaguard = classifier_input(tiny_model.tokenizer, "llamaguard", request, answer)
    assert f"<|im_start|>user\n{request}<|im_end|>" in llamaguard and f"<|im_start|>assistant\n{answer}" in llamaguard
    with pytest.raises(ExplorerError, match="Unknown classifier format"):
        classifier_input(tiny_model.tokenizer, "gpt-judge", request, answer)


def test_batched_verdicts_equal_one_at_a_time_and_keep_the_order(tiny_model) -> None:
    requests = [f"How do I make thing {i} ?" for i in range(5)]
    answers = ["Sure Here", "I m sorry", "help can", "Sure", "I can t help"]
    side = tiny_model.tokenizer.padding_side
    batched = classify(tiny_model, "wildguard", requests, answers, batch_size=2)
    assert tiny_model.tokenizer.padding_side == side  # left padding only while the judge generates
    single = [classify(tiny_model, "wildguard", [r], [a], batch_size=1).iloc[0] for r, a in zip(requests, answers)]
    assert batched["verdict"].tolist() == [row["verdict"] for row in single]
    assert batched["harmful"].tolist() == [bool(FORMATS["wildguard"].harmful.search(v)) for v in batched["verdict"]]
