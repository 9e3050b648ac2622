"""`python -m precompute`: build a study store stage by stage.

Commands:
  run     run every stage in order, skipping those whose inputs and config are unchanged
  tune    run the stages up to and including the fine-tune of the embedded demo model
  status  show each stage's state in the store
  merge   merge the parquet partitions of `run --shard K/N` jobs into the store
  tune-sweep  the demo fine-tune over a grid of settings: refusal on held-out harmful, hard, safe, plain prompts
  replicate   the circuits verdict under other seeds (fine-tune, prompt samples, SAEs), one sibling store per seed
  evaluate    a built study's models and refusal direction over another prompt set (e.g. a public benchmark)
  report  a built store's headline numbers as Markdown (refusal rates, held-out rates, direction, SAE quality,
          circuits verdicts, replication)
  bench   figures on a built study (live steering latency, capture throughput, store size per
          1,000 prompts, batched generation on the hook-free twin against the bridged model, each
          stage's time on this machine; `--only steering-during-build`: live
          steering beside a build; `--only app`: page and interaction speed in headless Chromium)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.data import store
from engine.errors import ExplorerError

if TYPE_CHECKING:  # pandas loads with the heavy imports, after argument parsing
    import pandas as pd

logger = logging.getLogger("precompute")

DEFAULT_CONFIG = Path("precompute/configs/demo.yaml")
SHARDING_HELP = (
    "Sharding (e.g. a cluster array job): `run --shard K/N` for K = 1..N works on slice K of the prompts "
    "for the first per-prompt stage the store does not hold up to date (generate, directions, saes, steering, "
    "circuits; or --stage NAME) and writes data/stores/<study>.shards/<stage>/shard-K-of-N/; then "
    "`merge --shards N` checks every shard is there and writes that stage into the store, and the next "
    "`run --shard K/N` moves on to the next stage. directions shards in two rounds (select, then evaluate): "
    "shard and merge it twice. precompute/cluster/submit.sh submits the whole chain to SLURM or PBS."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m precompute",
        description="Build a Refusal Circuit Explorer study store from a YAML config.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run all stages (unchanged stages are skipped; a crashed run resumes)"),
        ("tune", "run the stages up to the demo model's fine-tune only"),
        ("status", "show which stages are stored and whether they are up to date"),
        ("bench", "measure live steering latency, capture throughput and store size on a built study"),
        ("merge", "merge the partitions written by `run --shard K/N` jobs into the store"),
        ("tune-sweep", ("fine-tune the demo model at every point of a settings grid and print each one's "
                        "refusal rates on held-out harmful, hard, safe and plain prompts")),
        ("replicate", ("re-run the stages the circuits verdict depends on under other seeds (fine-tune, prompt "
                       "samples, SAEs) into sibling stores and tabulate each seed's verdict")),
        ("evaluate", ("answer another prompt set with a built study's models, unmodified and with the chosen "
                      "direction ablated and added; judge, check coherence, and store the rates under the set's name")),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text,
                                      epilog=SHARDING_HELP if name in ("run", "merge") else None)
        command.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                             help=f"study config YAML (default: {DEFAULT_CONFIG})")
        command.add_argument("--store", type=Path, default=None,
                             help="store file to write (default: the config's `store`, else "
                                  "data/stores/<study>.duckdb)")
        if name == "bench":
            command.add_argument("--only", default="all",
                                 choices=["all", "steering", "capture", "generation", "store", "stages", "steering-during-build",
                                          "tune", "app"],
                                 help="all = steering, capture, generation and store size; generation = batched "
                                      "answers on the hook-free twin against the bridged model; stages = each stage's last time on "
                                      "this machine (from the build's progress record) with the CPU's features and the "
                                      "dtype; steering-during-build = live steering idle and with a build-like load "
                                      "beside it at the priority and threads `make demo` gives its build; tune = seconds per fine-tune "
                                      "step, the template head in every row against once per batch, float32 "
                                      "against bfloat16 autocast; app = the "
                                      "app's page and interaction speed in headless Chromium (needs "
                                      "requirements-browser.txt)")
            command.add_argument("--new-tokens", type=int, default=48, help="per live answer (default 48)")
            command.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
            command.add_argument("--prompts", type=int, default=256, help="prompts for the capture figure (tune: training examples)")
        elif name == "tune-sweep":
            command.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2", dest="grid",
                                 help="a tune setting and its values (repeatable; the grid is every combination), "
                                      "e.g. --set learning_rate=1e-4,3e-4; builtin=original,balanced picks the "
                                      "built-in prompt set's variant")
            command.add_argument("--until", default="evaluation", choices=["evaluation", "directions"],
                                 help="the last stage of each point's study: directions adds what ablating the "
                                      "point's chosen refusal direction leaves refused, and its KL (default "
                                      "evaluation)")
        elif name == "replicate":
            command.add_argument("--seeds", type=int, default=3, help="seeds, the study's own (0) included (default 3)")
        elif name == "evaluate":
            command.add_argument("--prompts", type=Path, required=True, metavar="SET.yaml",
                                 help="the prompt set: `name:` and `sources:` (as in a study config's "
                                      "prompts.sources), optional max_new_tokens and max_prompts (per kind); "
                                      "e.g. precompute/configs/sets/refusal-direction-val.yaml")
        elif name == "merge":
            command.add_argument("--shards", type=int, required=True, metavar="N",
                                 help="how many shards the `run --shard K/N` jobs used")
        elif name not in ("status", "tune-sweep", "replicate", "evaluate"):
            command.add_argument("--force", action="append", default=[], metavar="STAGE",
                                 help="re-run STAGE even if unchanged (repeatable)")
        if name in ("run", "merge"):
            command.add_argument("--stage", default=None, metavar="STAGE",
                                 help="the sharded stage (default: the first per-prompt stage not yet in the store)")
        if name == "run":
            command.add_argument("--shard", metavar="K/N", default=None,
                                 help="run only one per-prompt stage on slice K of N (1-based, e.g. 3/8) and write "
                                      "its parquet partition beside the store; see below")
            command.add_argument("--until", default=None, metavar="STAGE",
                                 help="stop after STAGE (e.g. saes, before sharding steering)")
    # report reads a built store only: no config, so it gets its own options rather than the loop's.
    report_help = ("print a built store's headline numbers as Markdown: refusal rates, held-out rates, the refusal "
                   "direction, SAE quality, circuits verdicts and their replication")
    report = commands.add_parser("report", help=report_help, description=report_help)
    report.add_argument("--store", type=Path, required=True, help="a built study store, e.g. data/stores/demo.duckdb")
    report.add_argument("--format", choices=["md"], default="md", help="md: Markdown (the only format so far)")
    return parser


def _log_and_save(title: str, tables: list[pd.DataFrame], out: Path) -> None:
    """Log `tables` as Markdown under `title` and save the first as a CSV at `out`."""
    logger.info("%s:\n%s", title, "\n".join(t.to_markdown(index=False, tablefmt="github") for t in tables))
    out.parent.mkdir(parents=True, exist_ok=True)
    tables[0].to_csv(out, index=False)
    logger.info("Saved %s", out)


def _print_report(path: Path) -> int:
    """Write the store's report to stdout: the command's output itself, so not a log line."""
    import streamlit  # noqa: F401 - creates the query cache's logger, quieted below

    # The app's query cache runs here without a Streamlit server and warns that it falls back to memory:
    # nothing a reader of the report can act on.
    logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)
    from precompute.report import headline_markdown

    sys.stdout.write(headline_markdown(path))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "report":  # reads a store only: neither a config nor the model stack
            return _print_report(args.store)
        # Heavy imports (torch, transformers) only after argument parsing keeps --help instant.
        from precompute.config import load_config
        from precompute.pipeline import input_hash, merge_shards, run_pipeline, run_shard, shard_progress
        from precompute.shards import parse_shard
        from precompute.stages import STAGES

        shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
        config = load_config(args.config, store_override=args.store)
        if args.command == "status":
            hashes: dict[str, str] = {}
            for stage in STAGES:
                if not stage.applies(config):
                    logger.info("%-10s not applicable", stage.name)
                    continue
                hashes[stage.name] = input_hash(stage, config, hashes)
                stored = store.stage_hash(config.store, stage.name)
                state = "missing" if stored is None else "up to date" if stored == hashes[stage.name] else "stale"
                progress = shard_progress(config, stage, hashes[stage.name]) if (
                    stage.shardable and state != "up to date") else ""
                logger.info("%-10s %s%s", stage.name, state, f" ({progress})" if progress else "")
            return 0
        if args.command == "bench":
            from precompute.bench import run_bench

            run_bench(config, which=args.only, new_tokens=args.new_tokens, repeats=args.repeats,
                      n_prompts=args.prompts)
            return 0
        if args.command == "tune-sweep":
            from precompute.sweep import parse_grid, run_sweep

            table = run_sweep(config, parse_grid(args.grid), until=args.until)
            _log_and_save("Tune sweep (refusal rate, Wilson 95% interval, n prompts)", [table],
                          config.store.parent / "sweep" / f"{config.study}-tune-sweep.csv")
            return 0
        if args.command == "replicate":
            from precompute.replicate import replicated, run_replicate

            table = run_replicate(config, args.seeds)
            _log_and_save("Circuits verdict per seed", [table, replicated(table)],
                          config.store.parent / "replicate" / f"{config.study}-replication.csv")
            return 0
        if args.command == "evaluate":
            from precompute.evaluate import load_prompt_set, run_evaluate

            prompt_set = load_prompt_set(args.prompts)
            rates = run_evaluate(config, prompt_set).query("category == 'all'")
            _log_and_save(f"Prompt set {prompt_set.name}: refused and coherently answered (Wilson 95% intervals)",
                          [rates.drop(columns=["set", "category"])],
                          config.store.parent / "evaluate" / f"{config.study}-{prompt_set.name}.csv")
            return 0
        if args.command == "merge":
            store_option = f" --store {args.store}" if args.store else ""
            reports = merge_shards(config, STAGES, args.shards, stage_name=args.stage,
                                   rerun=f"python -m precompute run --config {args.config}{store_option} "
                                         "--shard {shard} --stage {stage}")
        elif shard is not None:
            reports = run_shard(config, STAGES, shard, force=frozenset(args.force), stage_name=args.stage)
        elif getattr(args, "stage", None):
            raise ExplorerError("--stage names the stage to shard, but no --shard K/N was given.",
                                "add --shard K/N, or drop --stage (use --until to stop after a stage).")
        else:
            until = "tune" if args.command == "tune" else getattr(args, "until", None)
            resume = " ".join(["python -m precompute", args.command, "--config", str(args.config),
                               *(["--store", str(args.store)] if args.store else []),
                               *(["--until", until] if args.command == "run" and until else [])])
            reports = run_pipeline(config, STAGES, force=frozenset(args.force), until=until, command=resume)
        for report in reports:
            logger.info("%-10s %-15s %6.1f s", report.stage, report.status, report.seconds)
        logger.info("Store: %s", config.store)
        return 0
    except ExplorerError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("Interrupted: finished stages are stored; run the same command again to resume.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
