"""`python -m precompute bench`: speed figures measured on a built study, never asserted in tests.

- steering: one live answer of N new tokens, baseline and steered (the global direction
  ablated), as the Steering page runs them; seconds for the pair.
- capture: tokens per second of activation capture at every layer's residual stream next to a
  plain Hugging Face forward pass over the same prompts and batches; the ratio is the figure.
- generation: batched greedy answers (the study's batch size, N new tokens) to the first test prompts
  on the hook-free twin (engine.runtime.models.plain_twin, what stages use when no hook is attached) and on the
  bridged model (a hook attached, as under an intervention); tokens per second and the ratio.
- store: the study store's size on disk per 1,000 prompts: the DuckDB file, the shard partitions
  (parquet, `<store>.shards/`) and the trained SAEs (`<store>.saes/`, every run's), each apart.
- stages: each stage's time in its last full run on this machine (from the build's progress record,
  precompute.progress) next to the CPU's features (AVX2, AVX512-BF16, AMX), the dtype, the threads and
  the priority it ran with.
- steering during a build (only with `--only steering-during-build`): the steering figure idle, then
  with a build-like load beside it (batched forward passes of the study model in another process, at
  the priority and thread count `make demo` gives its build, precompute.demo); the ratio (target <= 3).
- tune (only with `--only tune`): seconds per fine-tune step (forward and backward, batches of the
  config's tune.batch_size drawn from the study's own training set, `tune_data`) with the chat template's
  head in every row against run once per batch (engine.tuning.answer_loss), in float32 and in bfloat16
  autocast; the ratios.
- app (only with `--only app`): every page's render time and a few interactions in headless
  Chromium, see tools/browser/bench.py.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from unittest.mock import patch

import numpy as np
import torch

from engine.data import store
from engine.errors import ExplorerError
from engine.judging.judge import refusal_token_ids
from engine.runtime import models
from engine.runtime.activations import capture, prompt_end_positions
from engine.runtime.generation import EncodedBatch, generate, map_encoded, template_head
from engine.runtime.interventions import applied, every_position
from engine.runtime.models import (
    LoadedModel,
    describe_machine,
    export_embedded_base,
    load_model,
    resolve_dtype,
)
from engine.steering.spec import Steering, compare_answers
from engine.tuning import SftExample, answer_loss, encode_example, strip_head
from precompute import demo
from precompute.config import StudyConfig
from precompute.progress import read_progress, record_path

logger = logging.getLogger("precompute.bench")


@dataclass(frozen=True)
class BenchResult:
    name: str
    value: float
    unit: str
    detail: str = ""


COUNT_PROMPTS = "SELECT count(*) FROM prompts"
MIB = 2 ** 20


@dataclass(frozen=True)
class StoreSize:
    """Bytes on disk of a study store and what lies beside it, and the prompts it holds."""

    n_prompts: int
    duckdb: int  # the store file and its write-ahead log, if any
    partitions: int  # `<store>.shards/`: parquet partitions written by `run --shard K/N`
    saes: int  # `<store>.saes/`: trained SAEs (every run's)

    def per_thousand_prompts(self, n_bytes: int) -> float:
        return n_bytes * 1000 / self.n_prompts if self.n_prompts else float("nan")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def store_size(path: Path) -> StoreSize:
    """The size on disk of the store at `path` (which must exist) and of the folders beside it."""
    n_prompts = 0
    with store.reading(path) as con:
        if "prompts" in store.study_tables(con):
            count = con.execute(COUNT_PROMPTS).fetchone()
            assert count is not None  # count(*) returns one row
            n_prompts = int(count[0])
    wal = path.with_name(path.name + ".wal")
    return StoreSize(
        n_prompts=n_prompts,
        duckdb=path.stat().st_size + (wal.stat().st_size if wal.is_file() else 0),
        partitions=_folder_bytes(path.with_name(f"{path.stem}.shards")),
        saes=_folder_bytes(path.with_name(f"{path.stem}.saes")),
    )


def bench_store(config: StudyConfig) -> list[BenchResult]:
    size = store_size(config.store)
    parts = (("DuckDB file", size.duckdb), ("shard partitions", size.partitions), ("SAE folders", size.saes))
    return [BenchResult(f"store: {name} per 1,000 prompts", size.per_thousand_prompts(n_bytes) / MIB, "MiB",
                        f"{n_bytes / MIB:.1f} MiB for {size.n_prompts} prompts") for name, n_bytes in parts]


def _studied_model(config: StudyConfig) -> tuple[str, LoadedModel]:
    if config.directions is None:
        raise ExplorerError("The config has no `directions:` section to benchmark.", "use a study with one.")
    role = config.directions.model
    return role, config.generation.load(config.models[role])


def steering_seconds(config: StudyConfig, model: LoadedModel, role: str, *, new_tokens: int, repeats: int
                     ) -> float:
    """Median seconds of one live answer pair (baseline + global direction ablated), as Steering runs it."""
    directions = store.read_table(config.store, "refusal_directions").query("scope == 'global' and chosen")
    tokens = refusal_token_ids(store.read_table(config.store, "refusal_tokens"), role)
    prompt = store.read_table(config.store, "prompts").query("split == 'test' and kind == 'toxic'")["text"].iloc[0]
    steering = Steering(ablate=(np.asarray(directions["vector"].iloc[0], np.float32),))
    compare_answers(model, prompt, steering, tokens, max_new_tokens=2)  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        # the full length, even after a short refusal
        compare_answers(model, prompt, steering, tokens, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def bench_steering(config: StudyConfig, model: LoadedModel, role: str, *, new_tokens: int, repeats: int
                   ) -> list[BenchResult]:
    return [BenchResult("steering: baseline + steered answer",
                        steering_seconds(config, model, role, new_tokens=new_tokens, repeats=repeats), "s",
                        f"exactly {new_tokens} new tokens each, median of {repeats}, {config.generation.dtype_name}")]


READY = "ready"
# The build-like load's process: `forward_load(store, spec, dtype, batch size)`.
LOAD_CODE = "import sys; from precompute.bench import forward_load; forward_load(*sys.argv[1:])"


def forward_load(store_path: str, spec: str, dtype: str, batch_size: str) -> None:
    """What a build spends most of its time on: batched forward passes of the study model over the
    study's prompts, round after round until stopped or the bench that started it is gone. Says READY on
    stdout once the first batch is done."""
    bench = os.getppid()
    model = load_model(spec, dtype=resolve_dtype(dtype))
    prompts = store.read_table(store_path, "prompts")["text"].tolist()

    def forward(_: list[int], encoded: EncodedBatch) -> None:
        with torch.inference_mode():
            model.hf_model(**encoded.forward_inputs())

    ready = False
    while True:
        for _ in map_encoded(model, prompts, int(batch_size), forward, desc="build-like load"):
            if os.getppid() != bench:
                return
            if not ready:
                sys.stdout.write(f"{READY}\n")
                sys.stdout.flush()
                ready = True


def _contents(file: IO[str]) -> str:
    file.seek(0)
    return file.read()


@contextmanager
def build_like_load(config: StudyConfig, role: str, threads: int) -> Iterator[None]:
    """`forward_load` running in the background as `make demo` runs its build (demo.start_background),
    from its first batch on."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as output:
        process = demo.start_background(
            [sys.executable, "-c", LOAD_CODE, str(config.store), config.models[role], config.generation.dtype,
             str(config.generation.batch_size)], threads=threads, stdout=output)
        try:
            while process.poll() is None and f"{READY}\n" not in _contents(output):
                time.sleep(0.5)
            if process.returncode is not None:
                raise ExplorerError(f"The build-like load stopped before its first batch: {_contents(output)[-2000:]}",
                                    "fix what the message says (the model loads as the study's stages load it).")
            yield
        finally:
            demo.stop(process)


def bench_steering_during_build(config: StudyConfig, model: LoadedModel, role: str, *, new_tokens: int,
                                repeats: int) -> list[BenchResult]:
    threads = demo.build_threads()
    idle = steering_seconds(config, model, role, new_tokens=new_tokens, repeats=repeats)
    with build_like_load(config, role, threads):
        busy = steering_seconds(config, model, role, new_tokens=new_tokens, repeats=repeats)
    detail = (f"{new_tokens} new tokens, median of {repeats}; load: {threads} thread(s) at nice "
              f"{demo.BUILD_NICENESS}, batch {config.generation.batch_size}")
    return [BenchResult("steering, no build beside it", idle, "s", detail),
            BenchResult("steering, build running beside it", busy, "s", detail),
            BenchResult("steering during build / idle", busy / idle, "x", "target <= 3")]


def bench_stages(config: StudyConfig) -> list[BenchResult]:
    """Each stage's last full run here, from the build's progress record, next to what decided its speed."""
    machine = describe_machine()
    results = [BenchResult(f"machine: {machine.kind}", machine.cores, "cores",
                           f"{machine.cpu}; {machine.features}; device {machine.device}")]
    progress = read_progress(config.store)
    if progress is None or not progress.timings:
        raise ExplorerError(f"No stage times for {config.store}: {record_path(config.store)} is missing or empty.",
                            "build the study (make demo, or python -m precompute run): each stage that runs "
                            "records its time there.")
    order = [stage.name for stage in progress.stages]
    for name in sorted(progress.timings, key=lambda n: order.index(n) if n in order else len(order)):
        timing = progress.timings[name]
        elsewhere = "" if timing["cpu"] == machine.processor else f", on {timing['cpu']}"
        results.append(BenchResult(f"stage: {name}", timing["seconds"] / 60, "min",
                                   f"{timing['dtype']} on {timing['device']}, {timing['threads']} threads, "
                                   f"nice {timing['niceness']}{elsewhere}"))
    total = sum(progress.timings[name]["seconds"] for name in progress.timings)
    results.append(BenchResult("stages: total", total / 60, "min", "the sum of the times above"))
    return results


def bench_capture(config: StudyConfig, model: LoadedModel, *, n_prompts: int) -> list[BenchResult]:
    prompts = store.read_table(config.store, "prompts")["text"].head(n_prompts).tolist()
    batch_size = config.generation.batch_size
    counted = map_encoded(model, prompts, batch_size, lambda _, encoded: int(encoded.attention_mask.sum()),
                          desc="count tokens")
    n_tokens = sum(count for _, count in counted)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]
    offsets = prompt_end_positions(model.tokenizer).offsets

    def forward(_: list[int], encoded: EncodedBatch) -> None:
        with torch.inference_mode():
            model.hf_model.base_model(**encoded.forward_inputs())

    def plain() -> None:
        for _ in map_encoded(model, prompts, batch_size, forward, desc="plain forward"):
            pass

    timings = {}
    for name, work in (("plain forward", plain),
                       ("capture", lambda: capture(model, prompts, hooks, offsets, batch_size=batch_size))):
        work()  # warm-up
        started = time.perf_counter()
        work()
        timings[name] = n_tokens / (time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [BenchResult("plain forward", timings["plain forward"], "tokens/s", f"{n_prompts} prompts"),
            BenchResult("capture, every layer", timings["capture"], "tokens/s",
                        f"{len(hooks)} hooks x {len(offsets)} positions"),
            BenchResult("capture / plain forward", timings["capture"] / timings["plain forward"], "x"),
            BenchResult("peak resident memory", peak, "MiB")]


def bench_generation(config: StudyConfig, model: LoadedModel, *, n_prompts: int, new_tokens: int) -> list[BenchResult]:
    prompts = store.read_table(config.store, "prompts").query("split == 'test'")["text"].head(n_prompts).tolist()
    batch_size = config.generation.batch_size
    # A hook that changes nothing, so the bridged model runs: what every intervention's generation pays.
    bridged = [("blocks.0.hook_resid_pre", every_position(lambda activation, hook: activation))]
    speed = {}
    for name, hooks, attention in (("hook-free twin", [], "sdpa"), ("bridged", bridged, "sdpa"),
                                   ("bridged, eager attention", bridged, "eager")):
        with applied(model, hooks), patch.object(models, "GENERATION_ATTENTION", attention):
            generate(model, prompts[:batch_size], max_new_tokens=4, batch_size=batch_size)  # warm-up
            started = time.perf_counter()
            answers = generate(model, prompts, max_new_tokens=new_tokens, batch_size=batch_size)
            speed[name] = sum(a.n_new_tokens for a in answers) / (time.perf_counter() - started)
    detail = f"{len(prompts)} test prompts, {new_tokens} new tokens, batches of {batch_size}"
    return [*(BenchResult(f"generation, {name}", value, "tokens/s", detail) for name, value in speed.items()),
            BenchResult("generation: twin / bridged", speed["hook-free twin"] / speed["bridged"], "x"),
            BenchResult("generation: SDPA / eager (bridged)", speed["bridged"] / speed["bridged, eager attention"], "x")]


def bench_tune(config: StudyConfig, *, n_prompts: int) -> list[BenchResult]:
    """Seconds per fine-tune step (forward + backward; the optimizer's step is the same in every variant)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.tune is None:
        raise ExplorerError("The config has no `tune:` section to benchmark.", "use a study that builds its tuned model.")
    tune = config.tune
    data = store.read_table(config.store, "tune_data").sample(frac=1.0, random_state=0).head(n_prompts)
    base = export_embedded_base()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # as the fine-tune does
    encoded = [encode_example(tokenizer, SftExample(text, response, bool(complete)), tune.max_response_tokens)
               for text, response, complete in data[["text", "response", "complete"]].itertuples(index=False)]
    head, rests = strip_head(encoded, template_head(tokenizer))
    batches = [range(i, min(i + tune.batch_size, len(encoded))) for i in range(0, len(encoded), tune.batch_size)]
    seconds = {}
    for name, head_ids, rows, autocast in (("float32, head in every row", [], encoded, False),
                                           ("float32, head once per batch", head, rests, False),
                                           ("bfloat16 autocast, head once per batch", head, rests, True)):
        started = None
        for batch in [batches[0], *batches]:  # the first one again, untimed: a warm-up
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = answer_loss(model, torch.tensor(head_ids, dtype=torch.long), [rows[i] for i in batch],
                                   tokenizer.pad_token_id, tune.first_token_weight)
            loss.backward()
            model.zero_grad(set_to_none=True)
            started = started or time.perf_counter()
        assert started is not None
        seconds[name] = (time.perf_counter() - started) / len(batches)
    detail = f"{len(batches)} steps of {tune.batch_size} from tune_data, head {len(head)} tokens, {torch.get_num_threads()} threads"
    whole, once, mixed = seconds.values()
    return [*(BenchResult(f"tune step, {name}", value, "s", detail) for name, value in seconds.items()),
            BenchResult("tune step: head in every row / once", whole / once, "x"),
            BenchResult("tune step: float32 / bfloat16 autocast", once / mixed, "x",
                        "bfloat16 is fast here" if resolve_dtype("auto") == torch.bfloat16 else
                        "no AVX512-BF16 or AMX here: autocast: auto trains in float32")]


def run_bench(config: StudyConfig, *, which: str, new_tokens: int, repeats: int, n_prompts: int) -> list[BenchResult]:
    if not config.store.is_file():
        raise ExplorerError(f"No study store at {config.store}.", "build it first: python -m precompute run.")
    if which == "app":  # no model in this process: the app loads its own
        from tools.browser.bench import run_app_bench

        pages, interactions = run_app_bench(config, repeats=repeats)
        return [BenchResult(f"app: {t.name}", t.median, "s", f"target {t.target:g} s, {'PASS' if t.passed else 'FAIL'}")
                for t in [*pages, *interactions]]
    results = bench_store(config) if which in ("all", "store") else []
    if which == "stages":
        results += bench_stages(config)
    if which == "tune":
        results += bench_tune(config, n_prompts=n_prompts)
    if which in ("all", "steering", "capture", "generation", "steering-during-build"):
        role, model = _studied_model(config)
        if which in ("all", "steering"):
            results += bench_steering(config, model, role, new_tokens=new_tokens, repeats=repeats)
        if which in ("all", "capture"):
            results += bench_capture(config, model, n_prompts=n_prompts)
        if which in ("all", "generation"):
            results += bench_generation(config, model, n_prompts=n_prompts, new_tokens=new_tokens)
        if which == "steering-during-build":
            results += bench_steering_during_build(config, model, role, new_tokens=new_tokens, repeats=repeats)
    for result in results:
        logger.info("%-38s %10.3f %-9s %s", result.name, result.value, result.unit, result.detail)
    return results
