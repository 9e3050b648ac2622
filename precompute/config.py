"""Study configs: YAML files validated into dataclasses on load, with one clear error per problem."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml

from engine.circuits.refusal_metric import Metric
from engine.config_checks import Range, check_choice, check_ranges
from engine.config_keys import UNLESS_DEFAULT
from engine.data.paths import REPO_ROOT, stores_dir
from engine.data.prompts import check_category_names
from engine.data.schema import KINDS
from engine.errors import ExplorerError
from engine.runtime.models import (
    AUTOCAST_CHOICES,
    Auto,
    Dtype,
    LoadedModel,
    autocast_on,
    check_device_map,
    load_model,
    resolve_dtype,
)
from engine.saes.registry import check_release
from engine.saes.training import SaeTraining
from engine.tuning import TuneConfig

Method = Literal["attribution", "integrated_gradients"]  # circuits.method: how node effects are estimated


@dataclass(frozen=True)
class PromptConfig:
    RANGES: ClassVar[dict[str, Range]] = {"test_fraction": Range(0.05, 0.95)}

    sources: tuple[dict[str, Any], ...] = ({"type": "builtin"},)
    # The harm categories kept (safe prompts always are); None keeps every category the sources hold.
    categories: tuple[str, ...] | None = field(default=None, metadata={"cache_key": UNLESS_DEFAULT})
    test_fraction: float = 0.3

    def __post_init__(self) -> None:
        check_ranges("prompts", self, self.RANGES)
        if not self.sources:
            raise ExplorerError("prompts.sources is empty.", "list at least one source, e.g. - type: builtin.")
        if self.categories is not None:
            if not self.categories:
                raise ExplorerError("prompts.categories is empty.",
                                    "list the categories to keep, or leave the key out to keep them all.")
            check_category_names(list(self.categories), "prompts.categories of the config")


@dataclass(frozen=True)
class GenerationConfig:
    RANGES: ClassVar[dict[str, Range]] = {
        "max_new_tokens": Range(1, 2048),
        "batch_size": Range(1, 1024),
        "chunk_size": Range(1, 100_000),
    }

    max_new_tokens: int = 48
    batch_size: int = 32
    splits: tuple[str, ...] = ("test",)
    chunk_size: int = 128  # prompts per resumable chunk
    # Every forward pass and generation of every stage (the fine-tune always trains in float32).
    # bfloat16 is 2-3x faster on CPUs with AVX512-BF16 and on GPUs, 8x slower on AVX2-only CPUs;
    # auto picks it only where it is fast.
    dtype: Dtype = "float32"
    # Spread a model too large for one GPU over several (Hugging Face device_map: auto, balanced,
    # sequential or {module path: device}); None loads it whole on the GPU, or the CPU. Placement
    # does not change the numbers, so it is not part of any cache key.
    device_map: str | dict[str, str | int] | None = field(default=None, metadata={"cache_key": False})

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    @property
    def dtype_name(self) -> str:
        """The dtype this machine runs (auto resolved): part of every stage's cache key."""
        return str(self.torch_dtype).removeprefix("torch.")

    def load(self, spec: str) -> LoadedModel:
        """A study model as every stage runs it: in this dtype, placed by this device map if set."""
        return load_model(spec, dtype=self.torch_dtype, device_map=self.device_map)

    def __post_init__(self) -> None:
        if self.device_map is not None:
            check_device_map(self.device_map, "generation.device_map")
        check_choice("generation", "dtype", self.dtype, Dtype)
        check_ranges("generation", self, self.RANGES)
        if not self.splits or set(self.splits) - {"train", "test"}:
            raise ExplorerError(f"generation.splits = {list(self.splits)!r} is out of range.",
                                "use a list of train and/or test.")


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out prompt sets every model answers (stage `evaluation`): [{name, source: {type, ...}}]."""

    RANGES: ClassVar[dict[str, Range]] = {"max_new_tokens": Range(1, 2048)}

    sets: tuple[dict[str, Any], ...] = ()
    max_new_tokens: int = 24  # the judge reads the opening

    def __post_init__(self) -> None:
        if not self.sets:
            raise ExplorerError("evaluation.sets is empty.",
                                "list sets as - {name: plain_instructions, source: {type: ...}}, or drop the section.")
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in self.sets]
        for entry, name in zip(self.sets, names, strict=True):
            if not isinstance(name, str) or not name or not isinstance(entry.get("source"), dict) \
                    or "type" not in entry["source"]:
                raise ExplorerError(f"evaluation.sets entry {entry!r} lacks a name or a source with a type.",
                                    "write - {name: NAME, source: {type: refusal_direction, files: [harmless_val]}}.")
        if len(set(names)) != len(names):
            raise ExplorerError(f"evaluation.sets names repeat: {names}.", "give every set its own name.")
        check_ranges("evaluation", self, self.RANGES)


@dataclass(frozen=True)
class JudgeConfig:
    RANGES: ClassVar[dict[str, Range]] = {
        "min_share": Range(0, 1, low_open=True),
        "enrichment": Range(1),
    }

    min_share: float = 0.05
    enrichment: float = 2.0

    def __post_init__(self) -> None:
        check_ranges("judge", self, self.RANGES)


@dataclass(frozen=True)
class DirectionsConfig:
    RANGES: ClassVar[dict[str, Range]] = {
        "validation_fraction": Range(0.05, 0.5),
        "max_validation_prompts": Range(4, 10_000),
        "layer_stride": Range(1, 64),
        "max_kl": Range(0, 10, low_open=True),
        "prune_last_fraction": Range(0, 1, high_open=True),
        "addition_alpha": Range(0, 1000, low_open=True, optional=True),
        "bootstrap": Range(10, 100_000),
        "eval_max_new_tokens": Range(1, 2048),
        "rdo_steps": Range(0, 100_000),
    }

    model: str = "tuned"  # the role (in `models`) whose refusal directions are studied
    validation_fraction: float = 0.2  # of the train split, held out for choosing the direction
    max_validation_prompts: int = 32  # per kind, for scoring every candidate
    layer_stride: int = 1  # score every n-th layer's candidates (all layers on a GPU)
    max_kl: float = 0.1
    prune_last_fraction: float = 0.2
    addition_alpha: float | None = None  # times the unit direction; None: its own norm (Arditi)
    # Fit and validate on the toxic prompts the model refuses and the safe ones it does not, by its
    # refusal score (Arditi et al. 2024); false: every toxic and safe prompt.
    filter_by_refusal: bool = True
    bootstrap: int = 200
    eval_max_new_tokens: int = 48
    # Refusal direction optimisation (engine.directions.rdo) in the `tradeoff` stage: Adam steps per cone size k = 1-4,
    # fitted on train-split prompts, measured on test; 0 leaves it out (each step is a backward pass). Keyed by
    # the tradeoff stage alone (its inputs), so adding RDO to a built study re-runs that stage, not directions.
    rdo_steps: int = field(default=0, metadata={"cache_key": False})
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("directions", self, self.RANGES)
        if not isinstance(self.filter_by_refusal, bool):  # not check_choice: 1 == True
            raise ExplorerError(f"directions.filter_by_refusal = {self.filter_by_refusal!r} is out of range.",
                                "use true or false.")


@dataclass(frozen=True)
class SaesConfig(SaeTraining):
    """Sparse autoencoders: trained here with SAELens (the inherited SaeTraining settings: architecture,
    expansion, k, sparsity_coefficient, steps, batch_size, lr, seed), or loaded through its pretrained registry."""

    RANGES: ClassVar[dict[str, Range]] = {
        **SaeTraining.RANGES,
        "held_out_fraction": Range(0.01, 0.5),
        "top_examples": Range(1, 100),
        "top_logits": Range(1, 100),
        "histogram_bins": Range(4, 200),
        "attribution_prompts": Range(4, 100_000),
    }

    autocast: bool | Auto = False  # train in bfloat16 autocast (weights stay float32); auto: where it is fast
    model: str = "tuned"  # the role whose activations the SAEs read
    # Residual-stream SAEs at the chosen refusal layer plus these offsets (ignored if `hooks` is set).
    layer_offsets: tuple[int, ...] = (-4, 0)
    hooks: tuple[str, ...] = ()  # explicit TransformerLens hook names
    # Load instead of training: entries {release, sae_id} (SAELens registry) or {path} (a saved SAE).
    pretrained: tuple[dict[str, str], ...] = ()
    held_out_fraction: float = 0.1  # of the corpus texts, for quality numbers
    top_examples: int = 8  # texts shown per feature
    top_logits: int = 10
    histogram_bins: int = 24
    attribution_prompts: int = 64  # toxic prompts (and as many safe ones as the baseline)

    def __post_init__(self) -> None:
        super().__post_init__()  # the architecture, and every range in RANGES (the training ones and these)
        check_choice("saes", "autocast", self.autocast, AUTOCAST_CHOICES)
        if not (self.layer_offsets or self.hooks or self.pretrained):
            raise ExplorerError("saes names no SAE.", "set layer_offsets (e.g. [0]), hooks or pretrained.")
        for entry in self.pretrained:
            if not isinstance(entry, dict) or not ({"release", "sae_id"} <= set(entry) or "path" in entry):
                raise ExplorerError(f"saes.pretrained entry {entry!r} names no SAE.",
                                    "write {release: ..., sae_id: ...} or {path: a saved SAE folder}.")

    def training(self) -> SaeTraining:
        """The inherited training settings as a plain SaeTraining, autocast resolved on this machine."""
        settings = {item.name: getattr(self, item.name) for item in dataclasses.fields(SaeTraining)}
        settings["autocast"] = autocast_on(self.autocast)
        return SaeTraining(**settings)


@dataclass(frozen=True)
class SteeringConfig:
    """Batch steering on the test split: the global and category directions and the top features."""

    RANGES: ClassVar[dict[str, Range]] = {
        "top_features": Range(0, 100),
        "feature_force_multiple": Range(0, 100, low_open=True),
        "eval_max_new_tokens": Range(1, 2048),
        "answer_prompts": Range(1, 1_000_000, optional=True),
    }

    model: str = "tuned"
    top_features: int = 3  # features with the largest attribution at the refusal layer's SAE
    feature_force_multiple: float = 2.0  # force refusal: set a feature to this x its corpus maximum
    eval_max_new_tokens: int = 32  # answers generated for the features (the global direction's come from directions)
    # The features' answers on a seeded sample of at most this many test prompts per kind (None: all of
    # them). Generation is most of the stage's time; the refusal score still reads every test prompt.
    answer_prompts: int | None = field(default=None, metadata={"cache_key": UNLESS_DEFAULT})
    seed: int = field(default=0, metadata={"cache_key": UNLESS_DEFAULT})

    def __post_init__(self) -> None:
        check_ranges("steering", self, self.RANGES)


@dataclass(frozen=True)
class CircuitsConfig:
    """Per-category sparse feature circuits over the `saes` stage's SAEs, and their comparison."""

    # Single settings; how some relate (min_prompts <= max_prompts, max_nodes <= stored_nodes,
    # modular_ratio < monolithic_ratio) is checked in __post_init__.
    RANGES: ClassVar[dict[str, Range]] = {
        "ig_steps": Range(1, 100),
        "max_prompts": Range(4, 100_000),
        "min_prompts": Range(4, 100_000),
        "node_threshold": Range(0),
        "max_nodes": Range(1, 100_000),
        "edge_threshold": Range(0),
        "edge_nodes": Range(1, 10_000),
        "stored_nodes": Range(1, 100_000),
        "subset_prompts": Range(2, 100_000),
        "core_share": Range(0, 1, low_open=True),
        "bootstrap": Range(10, 100_000),
        "permutations": Range(19, 100_000),
        "split_halves": Range(2, 10_000),
        "alpha": Range(0, 1, low_open=True, high_open=True),
        "monolithic_ratio": Range(0, 1.5, low_open=True),
        "modular_ratio": Range(0, 1.5, low_open=True, high_open=True),
        "decoding_folds": Range(2, 100),
        "decoding_permutations": Range(19, 100_000),
        "calibration_simulations": Range(5, 10_000),
        "calibration_permutations": Range(19, 100_000),
        "patch_prompts": Range(2, 10_000),
        "exact_sites": Range(0, 1000),
    }

    model: str = "tuned"
    metric: Metric = "refusal_score"  # or logit_diff: refusal minus compliance tokens
    method: Method = "attribution"  # or integrated_gradients
    ig_steps: int = 8
    kinds: tuple[str, ...] = KINDS
    max_prompts: int = 48  # per category and kind, from the prompts the fine-tune did not train on
    min_prompts: int = 8  # fewer and the category's statistics are not computed
    node_threshold: float = 0.0  # |mean effect| (metric units) a circuit node needs
    max_nodes: int = 30  # the circuit: at most this many top nodes
    edge_threshold: float = 0.0  # |mean effect| an edge between circuit nodes needs to be stored
    edge_nodes: int = 30  # edges are computed among the circuit's top nodes, at most this many
    stored_nodes: int = 150  # top nodes kept per circuit, for the app's threshold sliders
    faithfulness_sizes: tuple[int, ...] = (5, 10, 20, 50, 100)
    subset_prompts: int = 16  # of each circuit's prompts, for faithfulness and edges (passes per size / node)
    core_share: float = 0.7  # in at least this share of a kind's circuits: the shared core
    bootstrap: int = 200
    permutations: int = 999
    split_halves: int = 50
    alpha: float = 0.05
    monolithic_ratio: float = 0.8  # between-category similarity / within-category ceiling
    modular_ratio: float = 0.5
    decoding_folds: int = 5  # category decodability: cross-validation folds
    decoding_permutations: int = 199  # and label shuffles for its null
    calibration_shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)  # planted category shares q
    calibration_simulations: int = 24  # simulated studies per share
    calibration_permutations: int = 199  # per simulated study's permutation test
    calibration_scales: tuple[int, ...] = (2, 4, 8)  # prompts x this, tried when a verdict is inconclusive
    patch_prompts: int = 16  # safe prompts that receive toxic activations (and toxic donors) in head/MLP patching
    exact_sites: int = 5  # per category, the strongest heads / layer outputs re-checked by exact patching
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("circuits", "metric", self.metric, Metric)
        check_choice("circuits", "method", self.method, Method)
        check_ranges("circuits", self, self.RANGES)
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ExplorerError(f"circuits.kinds = {list(self.kinds)!r} is out of range.",
                                "use a list of toxic, hard and/or safe.")
        if self.min_prompts > self.max_prompts:
            raise ExplorerError(f"circuits.min_prompts = {self.min_prompts!r} is above circuits.max_prompts = "
                                f"{self.max_prompts!r}.", "use min_prompts <= max_prompts.")
        if self.max_nodes > self.stored_nodes:
            raise ExplorerError(f"circuits.max_nodes = {self.max_nodes!r} is above circuits.stored_nodes = "
                                f"{self.stored_nodes!r}.", "use max_nodes <= stored_nodes.")
        if not self.modular_ratio < self.monolithic_ratio:
            raise ExplorerError(f"circuits.modular_ratio = {self.modular_ratio!r} is not below "
                                f"circuits.monolithic_ratio = {self.monolithic_ratio!r}.",
                                "use modular_ratio < monolithic_ratio.")
        if not self.faithfulness_sizes or min(self.faithfulness_sizes) < 1:
            raise ExplorerError(f"circuits.faithfulness_sizes = {list(self.faithfulness_sizes)!r} is out of range.",
                                "use sizes >= 1.")
        if not self.calibration_shares or not all(0 <= q <= 1 for q in self.calibration_shares) \
                or list(self.calibration_shares) != sorted(set(self.calibration_shares)):
            raise ExplorerError(f"circuits.calibration_shares = {list(self.calibration_shares)!r} is out of range.",
                                "use increasing shares in [0, 1], e.g. [0, 0.1, 0.2, 0.4, 0.8].")
        if list(self.calibration_scales) != sorted(set(self.calibration_scales)) \
                or not all(2 <= s <= 100 for s in self.calibration_scales):
            raise ExplorerError(f"circuits.calibration_scales = {list(self.calibration_scales)!r} is out of range.",
                                "use increasing whole multiples 2-100, or [] to skip.")


@dataclass(frozen=True)
class StudyConfig:
    study: str
    models: dict[str, str]  # role (e.g. base, tuned) -> model spec
    store: Path
    prompts: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tune: TuneConfig | None = None  # set: build the embedded tuned model before generating
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    evaluation: EvaluationConfig | None = None  # set: answer held-out prompt sets (over-refusal)
    directions: DirectionsConfig | None = None  # set: find and test refusal directions
    saes: SaesConfig | None = None  # set: train or load SAEs and compute feature statistics
    steering: SteeringConfig | None = None  # set: measure steering in batch (needs directions)
    circuits: CircuitsConfig | None = None  # set: per-category feature circuits (needs saes)

    def __post_init__(self) -> None:
        if not self.study or not self.study.replace("-", "").replace("_", "").isalnum():
            raise ExplorerError(f"study name {self.study!r} is not usable as a file name.",
                                "use letters, digits, - and _.")
        if not self.models:
            raise ExplorerError("models is empty.", "name at least one model, e.g. base: smollm2-135m-instruct.")
        if self.directions is not None and self.directions.model not in self.models:
            raise ExplorerError(
                f"directions.model = {self.directions.model!r} is not one of the study's models.",
                f"use one of {', '.join(self.models)}.",
            )
        if self.saes is not None and self.saes.model not in self.models:
            raise ExplorerError(f"saes.model = {self.saes.model!r} is not one of the study's models.",
                                f"use one of {', '.join(self.models)}.")
        if self.steering is not None and (self.directions is None or self.steering.model not in self.models):
            raise ExplorerError("steering needs a `directions:` section and one of the study's models.",
                                f"add directions, and set steering.model to one of {', '.join(self.models)}.")
        if self.circuits is not None and (self.saes is None or self.circuits.model != self.saes.model):
            raise ExplorerError("circuits need a `saes:` section on the same model.",
                                "add saes, and set circuits.model to saes.model.")
        if self.saes is not None:
            for entry in self.saes.pretrained:
                if "path" not in entry:  # a registry release must be for the SAE model (a folder is checked on load)
                    check_release(str(entry["release"]), str(entry["sae_id"]), self.models[self.saes.model])
        if self.saes is not None and not self.saes.hooks and not self.saes.pretrained and self.directions is None:
            raise ExplorerError("saes.layer_offsets count from the refusal layer, but the config has no "
                                "`directions:` section.", "add one, or list the SAE hooks under saes.hooks.")

    def section(self, name: str) -> dict[str, Any] | None:
        """One section as plain data, for content hashes and the runs table; None for an optional
        section the config leaves out."""
        value = getattr(self, name)
        if value is None:
            return None
        data = dataclasses.asdict(value)
        for item in dataclasses.fields(value):
            keyed = item.metadata.get("cache_key", True)
            if not keyed or keyed == UNLESS_DEFAULT and data[item.name] == _default(item):  # e.g. where a model is placed
                data.pop(item.name)
        return data


def _default(item: dataclasses.Field) -> Any:
    return item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default


SECTIONS: dict[str, type] = {
    "prompts": PromptConfig,
    "generation": GenerationConfig,
    "tune": TuneConfig,
    "judge": JudgeConfig,
    "evaluation": EvaluationConfig,
    "directions": DirectionsConfig,
    "saes": SaesConfig,
    "steering": SteeringConfig,
    "circuits": CircuitsConfig,
}
TOP_LEVEL_KEYS = {"study", "models", "store", *SECTIONS}


def _build_section(name: str, cls: type, raw: object) -> Any:
    if not isinstance(raw, dict):
        raise ExplorerError(f"Config section {name!r} must be a mapping.", f"write `{name}:` with keys under it.")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ExplorerError(
            f"Unknown key(s) {unknown} in config section {name!r}.",
            f"valid keys are {', '.join(sorted(valid))}.",
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ExplorerError(f"Bad value in config section {name!r}: {exc}.", "check the value types.") from exc


def parse_config(raw: dict[str, Any], *, store_override: Path | None = None) -> StudyConfig:
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise ExplorerError(f"Unknown top-level config key(s) {unknown}.",
                            f"valid keys are {', '.join(sorted(TOP_LEVEL_KEYS))}.")
    if "study" not in raw or "models" not in raw:
        raise ExplorerError("The config needs `study:` and `models:`.", "see precompute/configs/demo.yaml.")
    if not isinstance(raw["models"], dict):
        raise ExplorerError("`models:` must map a role to a model spec.", "e.g. base: smollm2-135m-instruct.")
    study = str(raw["study"])
    store = store_override or Path(raw.get("store") or stores_dir() / f"{study}.duckdb")
    if not store.is_absolute():
        store = REPO_ROOT / store
    sections = {
        name: _build_section(name, cls, raw[name]) for name, cls in SECTIONS.items() if raw.get(name) is not None
    }
    return StudyConfig(study=study, models={str(k): str(v) for k, v in raw["models"].items()},
                       store=store, **sections)


def load_config(path: str | Path, *, store_override: Path | None = None) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(f"Config file {path} does not exist.", "pass e.g. --config precompute/configs/demo.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExplorerError(f"Config {path} is not valid YAML: {exc}", "fix the YAML syntax.") from exc
    if not isinstance(raw, dict):
        raise ExplorerError(f"Config {path} is not a mapping.", "see precompute/configs/demo.yaml.")
    return parse_config(raw, store_override=store_override)
