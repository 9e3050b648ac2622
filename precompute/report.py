"""`python -m precompute report`: a built study's headline numbers as Markdown.

The refusal rates, the refusal direction and the circuits verdicts come from `app.findings.study_findings`,
the object the Findings and Compare pages render, so the report and the app cannot disagree. What those
pages do not summarise (the held-out evaluation sets, each SAE's quality, the replication table) is read
here with the app's SQL or this module's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import pandas as pd

from app import queries
from app.findings import Findings, Rate, answer, comparison_table, study_findings
from engine.data import store
from engine.data.schema import TABLE_STAGE

REPLICATION_SQL = """
SELECT seed, kind, label, ratio, ratio_low, ratio_high, decoding_accuracy, decoding_chance, decoding_p,
       detectable_share
FROM verdict_replication ORDER BY kind DESC, seed
"""
NUMBERS_NOTE = ("Refusal rates are over the prompts each model answered (`generation.splits`) with Wilson 95% "
                "intervals; ratios and shares carry their bootstrap 95% intervals in brackets.")
# The code versions that built the store, oldest first: a resumed build can span commits.
CODE_VERSIONS_SQL = "SELECT code_version FROM runs GROUP BY code_version ORDER BY min(created_at)"
REPLICATE_COMMAND = "python -m precompute replicate --config CONFIG --seeds 3"


def _table(frame: pd.DataFrame) -> str:
    # Cells are formatted here; tabulate would otherwise re-read "0.970" as a number and print 0.97.
    return frame.to_markdown(index=False, disable_numparse=True)


def _not_built(table: str) -> str:
    return f"Not in this store: the `{TABLE_STAGE[table]}` stage has not run."


def _interval(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _detectable(share: float) -> str:
    """NaN: no planted share on the calibration grid was detected in 80% of simulations."""
    return f"{share:.2f}" if math.isfinite(share) else "none on the grid"


def title_section(path: Path, findings: Findings) -> str:
    """Which study, which store and code built it, and the command that prints this report again."""
    versions = ", ".join(queries.query(path, CODE_VERSIONS_SQL)["code_version"])
    missing = f" Not built yet: {', '.join(findings.missing_stages)}." if findings.missing_stages else ""
    return (f"# Study `{findings.study}`: headline numbers\n\n"
            f"Made by `python -m precompute report --store {path} --format md`, which prints it again from a "
            f"rebuilt store. Latest run {findings.built_at} UTC, code version(s) {versions}; stages stored: "
            f"{', '.join(findings.stages_done)}.{missing}")


def headline_section(findings: Findings) -> str:
    """The study's answer in the app's words, then its numbers as the Compare studies page lists them."""
    numbers = comparison_table({"value": findings}).rename(columns={"measure": "measure (Compare studies page)"})
    return "\n\n".join(["## Headline numbers", answer(findings), NUMBERS_NOTE, _table(numbers)])


def caveats_section(findings: Findings) -> str:
    """What limits the conclusions, as the Findings page words it (computed from the numbers)."""
    if not findings.caveats:
        return ""
    return "## Caveats\n\n" + "\n".join(f"- {note}" for note in findings.caveats)


def evaluation_section(path: Path, present: frozenset[str]) -> str:
    """Refusal on the held-out sets (`evaluation` stage): prompts no stage trained or fitted on."""
    if "evaluation_rates" not in present:
        return "## Held-out evaluation\n\n" + _not_built("evaluation_rates")
    rates = queries.query(path, queries.EVALUATION_RATES_SQL)
    shown = pd.DataFrame({
        "set": rates["set"], "model": rates["model"], "kind": rates["kind"],
        "refused (95% CI)": [Rate(int(row.n_refused), int(row.n)).text() for row in store.rows_of(rates)],
        "left out (trained or fitted on)": rates["n_left_out"],
    })
    return "## Held-out evaluation\n\n" + _table(shown)


BENCHMARK_SUMMARY_SQL = """
SELECT "set", model, condition, kind, n, n_refused, n_degenerate, n_coherent FROM benchmark_rates
WHERE category = 'all' ORDER BY "set", kind DESC, model, condition
"""
EVALUATE_COMMAND = "python -m precompute evaluate --config CONFIG --prompts SET.yaml"


def benchmark_section(path: Path, present: frozenset[str]) -> str:
    """Other prompt sets run through the study (`precompute evaluate`); empty when none was."""
    if "benchmark_rates" not in present:
        return ""
    rates = queries.query(path, BENCHMARK_SUMMARY_SQL)
    bypassed = rates["n"] - rates["n_refused"]
    shown = pd.DataFrame({
        "set": rates["set"], "kind": rates["kind"], "model": rates["model"], "condition": rates["condition"],
        "refused (95% CI)": [Rate(int(row.n_refused), int(row.n)).text() for row in store.rows_of(rates)],
        "answered coherently (95% CI)": [Rate(int(row.n_coherent), int(row.n)).text() for row in store.rows_of(rates)],
        "not refused but degenerate": [f"{d} of {b}" for d, b in zip(rates["n_degenerate"], bypassed, strict=True)],
    })
    return ("## Other prompt sets\n\nEach set in its own categories, prompts the study trained or fitted on left out "
            f"(`{EVALUATE_COMMAND}`; per category on the Overview page). Degenerate: a non-refused answer that loops "
            "or that the base model finds less likely than 95% of the studied model's own unsteered answers.\n\n"
            + _table(shown))


def sae_section(path: Path, present: frozenset[str]) -> str:
    """Each SAE's quality on the held-out tenth of the corpus (`saes` stage)."""
    if "saes" not in present:
        return "## SAE quality\n\n" + _not_built("saes")
    saes = queries.query(path, queries.SAES_SQL)
    shown = pd.DataFrame({
        "hook": saes["hook"],
        "source": [row.source if pd.isna(row.release) else f"{row.release} / {row.sae_id}"
                   for row in store.rows_of(saes)],
        "architecture": saes["architecture"], "latents": saes["d_sae"],
        "L0": saes["l0"].map("{:.1f}".format),
        "FVU": saes["fraction_variance_unexplained"].map("{:.3f}".format),
        "dead": saes["dead_fraction"].map("{:.1%}".format),
        "CE loss recovered": saes["ce_loss_recovered"].map("{:.3f}".format),
        "held-out tokens": saes["n_held_out_tokens"],
    })
    return "## SAE quality\n\n" + _table(shown)


def tradeoff_section(path: Path, present: frozenset[str], findings: Findings) -> str:
    """Toxic refusal against safe-prompt KL under weighted and multi-direction ablation (`tradeoff` stage)."""
    if "ablation_tradeoff" not in present:
        return "## Ablation trade-off\n\n" + _not_built("ablation_tradeoff")
    model = findings.direction.model if findings.direction is not None else None
    points = queries.query(path, queries.TRADEOFF_SQL, (model,))
    shown = pd.DataFrame({
        "ablated": points["source"] + " " + points["size"].map("{:g}".format), "directions": points["sites"],
        "toxic still refused (score > 0, 95% CI)": [Rate(int(row.n_refused), int(row.n_toxic)).text()
                                                   for row in store.rows_of(points)],
        "KL on safe [95% CI]": [_mean_text(row, "kl") for row in store.rows_of(points)],
        "CE of safe answers [95% CI]": [_mean_text(row, "ce") for row in store.rows_of(points)],
        "Pareto front": points["pareto"].map({True: "yes", False: ""}),
    })
    unablated = f" Unablated, the safe answers' cross-entropy is {points['baseline_ce'].iloc[0]:.3f} nats/token." \
        if "baseline_ce" in points and points["baseline_ce"].notna().any() else ""
    return ("## Ablation trade-off\n\nOn the test prompts; weight w removes that share of the chosen direction, "
            "cone k the span of the k best layers' directions at the chosen position, categories the span of every "
            "category's direction, rdo k the k directions refusal direction optimisation found (Directions page). "
            f"CE: cross-entropy (nats/token) of the model's own unablated answers to the safe prompts.{unablated}\n\n"
            + _table(shown))


def _mean_text(row, measure: str) -> str:
    """`mean_<measure>` with its interval, or "not measured" where it is missing (a store built before it was)."""
    mean = getattr(row, f"mean_{measure}", float("nan"))
    if pd.isna(mean):
        return "not measured"
    return f"{mean:.3f} [{getattr(row, measure + '_low'):.3f}, {getattr(row, measure + '_high'):.3f}]"


def addition_section(path: Path, present: frozenset[str], findings: Findings) -> str:
    """Refusal by kind against the strength of the chosen direction's addition (`tradeoff` stage)."""
    if "addition_tradeoff" not in present:
        return ""
    model = findings.direction.model if findings.direction is not None else None
    sweep = queries.query(path, queries.ADDITION_TRADEOFF_SQL, (model,))
    cells = sweep.assign(cell=[Rate(int(row.n_refused), int(row.n)).text() for row in store.rows_of(sweep)])
    shown = cells.pivot(index="strength", columns="kind", values="cell").reset_index()
    safe = sweep[sweep["kind"] == "safe"].set_index("strength")
    safe_rows = list(store.rows_of(safe.loc[shown["strength"]]))
    shown["KL on safe [95% CI]"] = [_mean_text(row, "kl") for row in safe_rows]
    shown["CE of safe answers [95% CI]"] = [_mean_text(row, "ce") for row in safe_rows]
    shown["strength"] = shown["strength"].map("{:g}".format)
    return ("## Addition strength\n\nThe chosen direction added at its layer, strength times its norm (1: the "
            "directions stage's addition), on the test prompts; refused by the refusal score (> 0).\n\n" + _table(shown))


def backup_section(path: Path, present: frozenset[str]) -> str:
    """What happens to the refusal score when the top refusal features are removed (`backup` stage)."""
    if "backup_recovery" not in present:
        return ""
    recovery = queries.query(path, queries.BACKUP_RECOVERY_SQL)
    # One row per k, so gains.loc[k, column] is a cell (pandas-stubs type it as a Series).
    gains = queries.query(path, queries.BACKUP_GAINS_SQL).groupby("k").head(1).set_index("k")
    shown = pd.DataFrame({
        "removed (top k)": recovery["k"], "refusal score before -> after": [
            f"{row.metric_before:.2f} -> {row.metric_after:.2f}" for row in recovery.itertuples()],
        "predicted drop": recovery["predicted_drop"].map("{:.3f}".format),
        "actual drop": recovery["actual_drop"].map("{:.3f}".format),
        "recovered share": recovery["recovered_share"].map("{:.2f}".format),
        "largest gain": [f"feature {int(cast(int, gains.loc[k, 'feature']))} of {gains.loc[k, 'hook']}: "
                         f"{gains.loc[k, 'gain']:+.3f}" for k in recovery["k"]]})
    return (f"## Backup features\n\nThe top k refusal features of `{recovery['hook'].iloc[0]}` (ranked on train prompts) "
            f"clamped to 0, on {int(recovery['n_prompts'].iloc[0])} toxic test prompts; predicted drop: the sum of their "
            "attributions; recovered share = 1 - actual / predicted.\n\n" + _table(shown))


def harm_recognition_section(path: Path, present: frozenset[str]) -> str:
    """Category directions four ways (refusal, refusal beyond the global direction, harm beyond phrasing,
    harm recognition at the instruction's last token) summarised over category pairs, and the
    cross-ablation specificity (`directions` stage): "distinct geometry, shared function" read off."""
    if "category_cosines" not in present:
        return ""
    cosines = queries.query(path, queries.COSINES_SQL)
    pairs = cosines[cosines["category_a"] < cosines["category_b"]]
    summary = pairs.groupby("variant", sort=False)["cosine"].agg(["median", "min", "max", "size"]).reset_index()
    shown = pd.DataFrame({
        "category directions": summary["variant"], "pairs": summary["size"],
        "median cosine": summary["median"].map("{:.2f}".format),
        "range": [f"{row.min:.2f} to {row.max:.2f}" for row in summary.itertuples()]})
    text = ("## Harm recognition versus refusal\n\nCosines between the harm categories' directions (fit-split "
            "prompts, at the chosen layer), over every pair of categories; the Directions page shows each pair with "
            "its bootstrap interval.\n\n" + _table(shown))
    if "cross_ablation_specificity" in present:
        own = queries.query(path, queries.SPECIFICITY_SQL).iloc[0]
        text += ("\n\nCross-ablation specificity: ablating a toxic test prompt's own category direction lowers its "
                 f"refusal score by {own.own_drop:.2f}, another category's by {own.other_drop:.2f}; difference "
                 f"{_interval(own.difference, own.ci_low, own.ci_high)} (95% bootstrap CI, {int(own.n_prompts)} "
                 "prompts). An interval including 0 means this test cannot tell the directions' function apart.")
    return text


INDEPENDENCE_SQL = """
SELECT a, b, dependence, ci_low, ci_high FROM direction_independence WHERE model = ? ORDER BY a, b
"""


def independence_section(path: Path, present: frozenset[str], findings: Findings) -> str:
    """The share of each direction's induced refusal that ablating another removes (`tradeoff` stage)."""
    if "direction_independence" not in present:
        return ""
    model = findings.direction.model if findings.direction is not None else None
    matrix = queries.query(path, INDEPENDENCE_SQL, (model,))
    cells = [f"{row.dependence:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]" for row in matrix.itertuples()]
    order = ["global", *sorted(n for n in matrix["b"].unique() if n != "global")]
    shown = (matrix.assign(cell=cells).pivot(index="a", columns="b", values="cell").reindex(index=order, columns=order)
             .rename_axis(index="ablated (row), added (column)", columns=None).reset_index())
    return ("## Independence of refusal directions\n\nShare of the added direction's induced refusal (column, added at "
            "the chosen layer on safe test prompts) that ablating the row's direction removes, with 95% bootstrap "
            "intervals: 0 independent, 1 redundant (the diagonal is 1 by construction).\n\n" + _table(shown))


def replication_section(path: Path, present: frozenset[str], findings: Findings) -> str:
    """Each seed's verdict (`precompute replicate`); empty when it has not run, which the caveats say."""
    if "verdict_replication" not in present:
        return ""
    summary = "\n".join(f"- {verdict.kind}: {verdict.replication_text()}" for verdict in findings.verdicts)
    seeds = queries.query(path, REPLICATION_SQL)
    shown = pd.DataFrame({
        "kind": seeds["kind"], "seed": seeds["seed"], "verdict": seeds["label"],
        "ratio [95% CI]": [_interval(row.ratio, row.ratio_low, row.ratio_high) for row in store.rows_of(seeds)],
        "category decoding": [f"{row.decoding_accuracy:.0%} vs {row.decoding_chance:.0%} chance, "
                              f"p = {row.decoding_p:.3g}" for row in store.rows_of(seeds)],
        "smallest detectable q": seeds["detectable_share"].map(_detectable),
    })
    return f"## Replication\n\n{summary}\n\nSeed 0 is the study itself (`{REPLICATE_COMMAND}`).\n\n{_table(shown)}"


def headline_markdown(path: Path) -> str:
    """The report of the store at `path`; ExplorerError if it is missing or not a study store."""
    store.connect_readonly(path).close()  # the one clear error for a missing or foreign file, before any query
    findings = study_findings(path)
    present = queries.tables(path)
    sections = [title_section(path, findings), headline_section(findings), caveats_section(findings), evaluation_section(path, present),
                benchmark_section(path, present), sae_section(path, present), tradeoff_section(path, present, findings),
                addition_section(path, present, findings), harm_recognition_section(path, present),
                independence_section(path, present, findings),
                backup_section(path, present),
                replication_section(path, present, findings)]
    return "\n\n".join(section for section in sections if section) + "\n"
