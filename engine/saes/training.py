"""Sparse autoencoders through SAELens: build, train, save, load, and measure quality.

A small registry maps an architecture name to SAELens' training config and class, in the
SAELens manner. Training runs SAELens' own `SAETrainer`, fed by a plain iterator over captured
activations; pretrained SAEs (Gemma Scope, Llama Scope, ...) load through `SAE.from_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from engine.config_checks import Range, check_choice, check_ranges
from engine.errors import ExplorerError
from engine.runtime.activations import kept_token_mask
from engine.runtime.generation import map_right_padded
from engine.runtime.interventions import applied
from engine.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

Architecture = Literal["topk", "jumprelu", "standard"]
# SAELens' training config and class per architecture (the keys are Architecture's choices).
ARCHITECTURES: dict[Architecture, tuple[type, type]] = {
    "topk": (TopKTrainingSAEConfig, TopKTrainingSAE),
    "jumprelu": (JumpReLUTrainingSAEConfig, JumpReLUTrainingSAE),
    "standard": (StandardTrainingSAEConfig, StandardTrainingSAE),
}


@dataclass(frozen=True)
class SaeTraining:
    """What to train: architecture, width, sparsity and the optimisation budget (the study config's
    `saes:` settings, precompute.config.SaesConfig, extend these)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "expansion": Range(1, 256),
        "k": Range(1, 4096),
        "steps": Range(1, 10_000_000),
        "batch_size": Range(1, 1_000_000),
        "lr": Range(0, 1, low_open=True, high_open=True),
    }

    architecture: Architecture = "topk"
    expansion: int = 4  # d_sae = expansion * d_in
    k: int = 32  # topk only
    sparsity_coefficient: float = 5.0  # l1 (standard) or l0 (jumprelu) coefficient
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 4e-4
    seed: int = 0
    autocast: bool = False  # bfloat16 matmuls (weights stay float32): ~2.5x faster on CPUs with AVX512-BF16

    def __post_init__(self) -> None:
        # Errors name the settings as the study config's `saes:` section does; SaesConfig's RANGES add its own.
        check_choice("saes", "architecture", self.architecture, Architecture)
        check_ranges("saes", self, self.RANGES)


def build_training_sae(training: SaeTraining, d_in: int, hook_name: str, model_name: str, device: str = "cpu"):
    config_class, sae_class = ARCHITECTURES[training.architecture]
    options: dict = {"d_in": d_in, "d_sae": training.expansion * d_in, "device": device}
    if training.architecture == "topk":
        options["k"] = training.k
    elif training.architecture == "jumprelu":
        options["l0_coefficient"] = training.sparsity_coefficient
    else:
        options["l1_coefficient"] = training.sparsity_coefficient
    sae = sae_class(config_class(**options))
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.model_name = model_name
    return sae


@dataclass(frozen=True)
class ActivationRows:
    """Some rows of one hook's activations in a [n_tokens, n_hooks, d_in] array, in memory or
    memory-mapped (`capture_tokens(spill=...)`): an SAE's training or held-out tokens, read a batch
    at a time, so they never have to fit in memory at once."""

    values: np.ndarray  # [n_tokens, n_hooks, d_in]
    hook: int  # which hook's activations
    rows: np.ndarray  # [n] row indices into values

    @classmethod
    def of(cls, activations: torch.Tensor | ActivationRows) -> ActivationRows:
        """Every row of an in-memory [n, d_in] tensor (an ActivationRows as it is)."""
        if isinstance(activations, ActivationRows):
            return activations
        return cls(activations.detach().cpu().numpy()[:, None, :], 0, np.arange(len(activations)))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def d_in(self) -> int:
        return int(self.values.shape[2])

    def read(self, index: np.ndarray) -> torch.Tensor:
        """Rows `index` (positions in `rows`), as float32 [len(index), d_in]."""
        return torch.from_numpy(np.ascontiguousarray(self.values[self.rows[index], self.hook], dtype=np.float32))

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))


def _batches(activations: ActivationRows, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(activations), generator=generator).split(batch_size):
            if len(index) == batch_size:
                yield activations.read(index.numpy())


def train_sae(training: SaeTraining, activations: torch.Tensor | ActivationRows, hook_name: str, model_name: str,
              *, device: str | torch.device = "cpu") -> SAE:
    """Train with SAELens' SAETrainer on `device`, on [n_tokens, d_in] activations read one random
    batch at a time (from disk, for memory-mapped rows); return the inference SAE, on `device`."""
    device = str(torch.device(device))
    activations = ActivationRows.of(activations)
    if len(activations) < training.batch_size:
        raise ExplorerError(f"Only {len(activations)} activation rows for SAE batches of {training.batch_size}.",
                            "capture more tokens or lower the SAE batch_size.")
    torch.manual_seed(training.seed)
    sae = build_training_sae(training, activations.d_in, hook_name, model_name, device)
    trainer_config = SAETrainerConfig(
        total_training_samples=training.steps * training.batch_size,
        train_batch_size_samples=training.batch_size,
        lr=training.lr, lr_end=training.lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, training.steps // 10), device=device, n_checkpoints=0,
        # A latent silent for a twentieth of the run counts as dead, so the TopK auxiliary loss (Gao et
        # al. 2024) starts pulling it back early; with a quarter, 20% of the demo's latents stayed dead.
        dead_feature_window=max(1, training.steps // 20), feature_sampling_window=max(1, training.steps // 4),
        n_batches_for_norm_estimate=1, autocast=training.autocast,
    )
    trained = SAETrainer(trainer_config, sae, _batches(activations, training.batch_size, training.seed)).fit()
    return inference_copy(trained, device)


def inference_copy(training_sae, device: str = "cpu") -> SAE:
    """The inference SAE (SAELens' own conversion, through its save format)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        training_sae.save_inference_model(folder)
        return SAE.load_from_disk(folder, device=device)


def save_sae(sae: SAE, folder: Path) -> Path:
    partial = folder.with_name(folder.name + ".partial")
    sae.save_model(partial)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    partial.replace(folder)
    return folder


def load_sae(source: str, sae_id: str | None = None, *, device: str | torch.device = "cpu") -> SAE:
    """A saved SAE folder, or `release` + `sae_id` from SAELens' pretrained registry, on `device`
    (the model's, where it meets live activations)."""
    path, device = Path(source), str(torch.device(device))
    if sae_id is None:
        if not (path / "cfg.json").is_file():
            raise ExplorerError(f"No SAE at {path} (cfg.json missing).",
                                "train one with `python -m precompute run` or pass a release and sae_id.")
        return SAE.load_from_disk(str(path), device=device)
    try:
        return SAE.from_pretrained(source, sae_id, device=device)
    except (ValueError, KeyError, OSError) as exc:
        raise ExplorerError(f"Could not load pretrained SAE {source}/{sae_id}: {exc}",
                            "check the release and sae_id against SAELens' pretrained_saes.yaml; "
                            "the hub must be reachable.") from exc


def stored_sae_source(store: Path, row: dict) -> tuple[str, str | None]:
    """`load_sae` arguments for a row of a store's `saes` table: a registry entry (release,
    sae_id), or a folder; a relative folder lies beside the store (where the stage saves them)."""
    if isinstance(row.get("release"), str):
        return row["release"], row["sae_id"]
    path = Path(row["path"])
    return str(path if path.is_absolute() else Path(store).parent / path), None


@dataclass(frozen=True)
class SaeQuality:
    l0: float  # mean number of active latents per token
    fraction_variance_unexplained: float
    dead_fraction: float  # latents that never fire on the held-out tokens


def sae_quality(sae: SAE, activations: torch.Tensor | ActivationRows, batch_size: int = 4096) -> SaeQuality:
    """Reconstruction and sparsity on held-out activations [n_tokens, d_in], read `batch_size` rows
    at a time (twice: the variance needs the mean first)."""
    activations = ActivationRows.of(activations)
    l0_total, squared_error, fired = 0.0, 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    total = torch.zeros(activations.d_in, dtype=torch.float64)
    with torch.inference_mode():
        for chunk in activations.chunks(batch_size):
            total += chunk.sum(0, dtype=torch.float64)
            chunk = chunk.to(sae.device)
            codes = sae.encode(chunk)
            reconstruction = sae.decode(codes)
            l0_total += float((codes > 0).sum())
            squared_error += float(((reconstruction - chunk) ** 2).sum())
            fired |= (codes > 0).any(dim=0)
    mean = total / len(activations)
    total_variance = sum(float(((chunk - mean) ** 2).sum()) for chunk in activations.chunks(batch_size))
    return SaeQuality(
        l0=l0_total / len(activations),
        fraction_variance_unexplained=squared_error / total_variance,
        dead_fraction=float(1 - fired.float().mean()),
    )


def check_sae_fits(sae: SAE, model: LoadedModel) -> str:
    """The SAE's hook name, after checking the model has that hook with the SAE's width."""
    hook_name = sae.cfg.metadata.hook_name
    if hook_name not in model.bridge.hook_dict:
        raise ExplorerError(f"The SAE reads hook {hook_name!r}, which {model.name} does not have.",
                            "use an SAE trained on this model (TransformerLens hook names, e.g. "
                            "blocks.3.hook_resid_pre).")
    if sae.cfg.d_in != model.d_model:
        raise ExplorerError(f"The SAE at {hook_name} has d_in={sae.cfg.d_in}, but {model.name} has "
                            f"d_model={model.d_model}.", "use an SAE trained on this model.")
    return hook_name


@dataclass(frozen=True)
class CeRecovered:
    """Next-token cross-entropy with the SAE spliced in, against the clean model and zero ablation."""

    clean: float
    spliced: float
    zero_ablated: float

    @property
    def recovered(self) -> float:
        """1 when splicing costs nothing, 0 when it is as bad as zeroing the site."""
        return (self.zero_ablated - self.spliced) / (self.zero_ablated - self.clean)


def ce_loss_recovered(model: LoadedModel, sae: SAE, sequences: Sequence[Sequence[int]], *, batch_size: int,
                      skip_token_ids: Sequence[int] = (), skip_first: int = 1) -> CeRecovered:
    """Mean next-token cross-entropy over `sequences` (token ids) three ways. The splice replaces
    the activation only at the tokens the SAE was trained on (`kept_token_mask`)."""
    hook_name = check_sae_fits(sae, model)
    kept: list[torch.Tensor] = []

    def replace(by: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            where = kept[0].to(activation.device)[..., None]
            if by == "zero":
                return torch.where(where, torch.zeros_like(activation), activation)
            reconstruction = sae(activation.float().to(sae.device)).to(activation.device, activation.dtype)
            return torch.where(where, reconstruction, activation)
        return hook

    def losses(batch: list[int], ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, float], int]:
        kept[:] = [kept_token_mask(ids, mask, skip_token_ids, skip_first=skip_first)]
        targets = ids[:, 1:].to(model.device)
        real = mask[:, 1:].bool().to(model.device)
        sums = {}
        for condition in ("clean", "sae", "zero"):
            hooks = [] if condition == "clean" else [(hook_name, replace(condition))]
            with applied(model, hooks), torch.inference_mode():
                logits = model.hf_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                          reduction="none")
            sums[condition] = float(per_token[real].sum())
        return sums, int(real.sum())

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_tokens = 0
    for _, (sums, n_real) in map_right_padded(sequences, batch_size, model.tokenizer.pad_token_id, losses,
                                              desc="CE loss recovered"):
        for condition in totals:
            totals[condition] += sums[condition]
        n_tokens += n_real
    return CeRecovered(clean=totals["clean"] / n_tokens, spliced=totals["sae"] / n_tokens,
                       zero_ablated=totals["zero"] / n_tokens)
