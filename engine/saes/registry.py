"""SAELens' pretrained-SAE registry, read offline: does a release exist, and is it for this model?

SAELens ships its release directory (`pretrained_saes.yaml`) inside the package; each release names
the model its SAEs were trained on, as a TransformerLens alias (`gemma-2-2b`) or a Hugging Face id
(`meta-llama/Llama-3.1-8B`). A release matches a study model when both name the same checkpoint
family: organisation, letter case and the chat/base variant words (`it`, `instruct`, `chat`, `base`,
`pt`) are ignored, everything else (size, version) must agree. So Gemma Scope's `gemma-2-2b` SAEs
fit `google/gemma-2-2b-it` (the usual practice: Gemma Scope was trained on the base model and
transfers to the chat model), while `Mistral-7B-v0.1` SAEs do not fit `Mistral-7B-Instruct-v0.2`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens.loading_from_pretrained import get_official_model_name

from engine.errors import ExplorerError

logger = logging.getLogger(__name__)

VARIANT_WORDS = frozenset({"it", "instruct", "chat", "base", "pt"})


def model_family(name: str) -> str:
    """The checkpoint family of a model name: `google/gemma-2-2b-it` -> `gemma-2-2b`,
    `mistralai/Mistral-7B-Instruct-v0.2` -> `mistral-7b-v0.2`. A local folder counts by its name."""
    words = Path(name.rstrip("/")).name.lower().split("-")
    return "-".join(word for word in words if word not in VARIANT_WORDS)


def official_model_name(name: str) -> str:
    """A TransformerLens alias as its Hugging Face id (`mistral-7b` -> `mistralai/Mistral-7B-v0.1`);
    other names unchanged."""
    try:
        return get_official_model_name(name)
    except ValueError:
        return name


@dataclass(frozen=True)
class ReleaseCheck:
    release: str
    sae_id: str
    release_model: str  # as the registry names it; "" for a Hugging Face repo outside the registry
    exact: bool  # same checkpoint, not only the same family


def check_release(release: str, sae_id: str, model: str) -> ReleaseCheck:
    """Check a pretrained SAE entry against the registry and the study model it will read."""
    directory = get_pretrained_saes_directory()
    lookup = directory.get(release)
    if lookup is None:
        if "/" in release:  # SAELens loads a plain hub repo too; its model is only known once loaded
            logger.info("SAE repo %s is not in SAELens' registry: its model is checked when it loads.", release)
            return ReleaseCheck(release, sae_id, "", exact=False)
        family = model_family(model)
        known = sorted(name for name, entry in directory.items()
                       if model_family(official_model_name(entry.model)) == family)
        raise ExplorerError(
            f"saes.pretrained release {release!r} is not in SAELens' registry.",
            f"releases for {family}: {', '.join(known)}." if known else
            "check the name against sae_lens/pretrained_saes.yaml, or train SAEs (saes.hooks or layer_offsets).")
    if sae_id not in lookup.saes_map:
        examples = ", ".join(list(lookup.saes_map)[:3])
        raise ExplorerError(f"saes.pretrained release {release!r} has no SAE {sae_id!r}.",
                            f"use one of its {len(lookup.saes_map)} ids, e.g. {examples}.")
    release_model = official_model_name(lookup.model)
    if model_family(release_model) != model_family(model):
        raise ExplorerError(
            f"saes.pretrained release {release!r} holds SAEs of {lookup.model}, but the SAE model is {model} "
            f"({model_family(release_model)} is not {model_family(model)}).",
            "pick a release trained on this model or its base model, or train SAEs here "
            "(drop `pretrained`, set saes.hooks or layer_offsets). A local model folder is matched by its name.")
    exact = release_model.rsplit("/", 1)[-1].lower() == Path(model.rstrip("/")).name.lower()
    if not exact:
        logger.info("SAE release %s (%s) is used on %s, a variant of the same model.", release, lookup.model, model)
    return ReleaseCheck(release, sae_id, lookup.model, exact=exact)
