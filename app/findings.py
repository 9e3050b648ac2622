"""The study's answer in one object: what the Findings page, the report, presentation mode and the
study comparison all render. Reads a store through `app.queries`; holds numbers, not widgets."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from app import queries
from engine.data.schema import KINDS, STAGE_ORDER
from engine.data.store import rows_of
from engine.stats import wilson_interval

TARGET_FAITHFULNESS = 0.6  # a circuit that keeps less of the refusal metric explains it only in part
MIN_GROUP = 20  # below this many prompts a per-category rate's 95% interval is wider than +-20 points
SHARED_SHOWN = 5


@dataclass(frozen=True)
class Rate:
    """k refused of n, with a Wilson 95% interval."""

    refused: int
    n: int

    @property
    def rate(self) -> float:
        return self.refused / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        low, high = wilson_interval(self.refused, self.n)
        return float(low), float(high)

    def text(self) -> str:
        low, high = self.interval
        return f"{self.rate:.0%} ({self.refused}/{self.n}; 95% CI {low:.0%}–{high:.0%})"


@dataclass(frozen=True)
class ModelRefusal:
    model: str
    spec: str
    by_kind: dict[str, Rate]
    smallest_group: int  # fewest prompts in one category x kind cell


ABLATED_TARGET = 0.10  # toxic prompts still refused with refusal ablated, at most, for ablation to carry it


@dataclass(frozen=True)
class AblationPointFinding:
    """One point of the `tradeoff` stage: what ablating a span of directions leaves refused, at what KL."""

    name: str  # e.g. "cone 2", "weight 0.5"
    sites: str
    refused: Rate  # toxic test prompts still refused (by the refusal score)
    kl: float  # mean next-token KL on the safe test prompts


@dataclass(frozen=True)
class DirectionFinding:
    model: str
    layer: int
    position_label: str
    toxic_baseline: Rate
    toxic_ablated: Rate
    safe_baseline: Rate
    safe_added: Rate
    kl: float  # mean next-token KL on safe prompts under ablation (test split)
    max_kl: float
    kl_answered: float  # the same on the safe prompts the model does not lean to refuse (refusal score < 0)
    n_answered: int
    n_safe: int
    separation_sigma: float
    probe_accuracy: float
    # From the `tradeoff` stage (None before it runs): the ablation leaving the fewest toxic prompts
    # refused within the KL limit, and the cheapest (least KL) one that removes refusal (at most
    # ABLATED_TARGET still refused), else the one leaving the fewest refused.
    best_within_kl: AblationPointFinding | None = None
    cheapest_removal: AblationPointFinding | None = None

    @property
    def carries_refusal(self) -> bool:
        """Whether ablating the direction leaves at most ABLATED_TARGET of toxic prompts refused."""
        return self.toxic_ablated.rate <= ABLATED_TARGET


@dataclass(frozen=True)
class VerdictFinding:
    kind: str
    label: str  # monolithic / partially modular / modular / inconclusive
    reason: str
    between: float  # mean cosine between categories' circuits (shrunk by noise)
    ceiling: float  # mean within-category reliability: what `between` reaches if categories are alike
    ratio: float
    ratio_low: float  # the joint bootstrap's 95% interval
    ratio_high: float
    category_share: float  # estimated category-specific share q of the mean effect
    share_low: float
    share_high: float
    p_value: float  # permutation test of any category structure
    permutations: int
    alpha: float
    seeds_label: str
    n_categories: int
    prompts_per_category: int
    jaccard: float
    jaccard_split_half: float
    centred_within: float  # how reproducible the category tails are (0: no tails)
    error_share: float  # SAE error nodes' share of the circuits' |effect|, left out of the comparison
    decoding_accuracy: float
    decoding_chance: float
    decoding_p: float
    detectable_share: float  # smallest planted q detected in >= 80% of simulations (NaN: none on the grid)
    largest_share: float  # the calibration grid's largest q
    false_modular: float  # share of "modular" verdicts on simulated studies with q = 0
    decisive_prompts: float  # prompts per category that would decide an inconclusive verdict (NaN: none tried)
    core_size: int
    circuit_size: int
    monolithic_ratio: float
    modular_ratio: float
    labels_by_seed: tuple[str, ...] = ()  # the verdict under each seed (`precompute replicate`), the study's own first

    @property
    def replicated(self) -> bool | None:
        """The same verdict under every seed; None when no other seed was run."""
        return None if len(self.labels_by_seed) < 2 else len(set(self.labels_by_seed)) == 1

    def replication_text(self) -> str:
        if self.replicated is None:
            return "one seed only: `python -m precompute replicate --seeds 3` checks it under others"
        verdicts = ", ".join(self.labels_by_seed)
        if self.replicated:
            return f"the same under {len(self.labels_by_seed)} seeds ({verdicts})"
        return f"not replicated over {len(self.labels_by_seed)} seeds ({verdicts})"

    @property
    def structure_detected(self) -> bool:
        """Do categories differ detectably, by the permutation test or by decoding?"""
        return self.p_value < self.alpha or self.decoding_p < self.alpha

    def structure_text(self) -> str:
        """What the study can say about category structure at all, in words that match its power."""
        decoding = (f"a prompt's category is read off its node effects {self.decoding_accuracy:.0%} of the time "
                    f"against {self.decoding_chance:.0%} chance (p = {self.decoding_p:.3g})")
        if self.structure_detected:
            return f"categories do differ detectably (permutation p = {self.p_value:.3g}; {decoding})"
        return (f"no category structure is detectable with {self.prompts_per_category} prompts per category "
                f"(permutation p = {self.p_value:.3g}; {decoding}), which is not evidence that there is none")

    def calibration_text(self) -> str:
        """What the rule can detect at this study's size, from its planted-effect calibration."""
        size = f"at this study's size ({self.prompts_per_category} prompts per category, its own noise)"
        detected = (f"the rule detects a category-specific share of q = {self.detectable_share:.2f} or more in at "
                    "least 80% of simulations" if math.isfinite(self.detectable_share) else
                    f"the rule does not reliably detect category structure even at q = {self.largest_share:.2f}")
        return (f"calibrated on planted effects {size}, {detected}, and says \"modular\" in "
                f"{self.false_modular:.0%} of simulations without any category structure")


@dataclass(frozen=True)
class SharedFeature:
    hook: str
    feature: int  # -1: the SAE's error term
    n_circuits: int
    mean_effect: float
    top_tokens: str
    refusal_cosine: float


@dataclass(frozen=True)
class CircuitCoverage:
    kind: str
    n_ok: int
    n_skipped: int
    fewest_prompts: int
    faithfulness_low: float
    faithfulness_high: float
    n_nodes: int


@dataclass(frozen=True)
class Findings:
    store: Path
    study: str
    built_at: str
    stages_done: tuple[str, ...]
    stages_planned: tuple[str, ...]  # those that apply to the study's config
    prompt_counts: pd.DataFrame  # kind x split
    refusal: tuple[ModelRefusal, ...]
    judge_kappa: dict[str, float]  # model -> Cohen's kappa of substring judge vs refusal score
    direction: DirectionFinding | None
    verdicts: tuple[VerdictFinding, ...]
    shared: tuple[SharedFeature, ...]  # strongest shared-core features of the toxic circuits
    coverage: tuple[CircuitCoverage, ...]
    caveats: tuple[str, ...] = field(default=())

    @property
    def missing_stages(self) -> tuple[str, ...]:
        return tuple(stage for stage in self.stages_planned if stage not in self.stages_done)

    def verdict(self, kind: str) -> VerdictFinding | None:
        return next((v for v in self.verdicts if v.kind == kind), None)

    def refusal_of(self, model: str) -> ModelRefusal | None:
        return next((m for m in self.refusal if m.model == model), None)

    @property
    def studied_model(self) -> str | None:
        return self.direction.model if self.direction else (self.refusal[-1].model if self.refusal else None)

    @property
    def studied(self) -> ModelRefusal | None:
        """The studied model's refusal rates."""
        return self.refusal_of(self.studied_model) if self.studied_model else None


def _refusal(store: Path, present: frozenset[str]) -> tuple[tuple[ModelRefusal, ...], dict[str, float]]:
    if "refusal_rates" not in present:
        return (), {}
    totals = queries.query(store, queries.RATE_TOTALS_SQL)
    specs = dict(queries.query(store, queries.MODELS_SQL).itertuples(index=False))
    models = []
    for model, rows in totals.groupby("model", sort=True):
        models.append(ModelRefusal(
            model=str(model), spec=str(specs.get(model, model)),
            by_kind={row.kind: Rate(int(row.n_refused), int(row.n)) for row in rows_of(rows)},
            smallest_group=int(rows.loc[rows["kind"] != "safe", "smallest_group"].min()
                               if (rows["kind"] != "safe").any() else rows["smallest_group"].min())))
    agreement = queries.query(store, queries.AGREEMENT_SQL)
    kappa = {row.model: float(row.cohen_kappa) for row in rows_of(agreement) if row.kind == "all"}
    return tuple(models), kappa


def _direction(store: Path, present: frozenset[str]) -> DirectionFinding | None:
    if not {"direction_candidates", "direction_effects", "layer_separation"} <= present:
        return None
    chosen = queries.query(store, queries.CHOSEN_DIRECTION_SQL)
    if chosen.empty:
        return None
    row = chosen.iloc[0]
    summary = queries.query(store, queries.EFFECT_SUMMARY_SQL).set_index("model")
    effect = summary.loc[row["model"]]
    separation = queries.query(store, queries.SEPARATION_SQL)
    at_layer = separation[(separation["model"] == row["model"]) & (separation["layer"] == row["layer"])]
    return DirectionFinding(
        model=str(row["model"]), layer=int(row["layer"]),
        position_label=str(row["position_label"]),
        toxic_baseline=Rate(int(effect["toxic_refused_baseline"]), int(effect["toxic_n"])),
        toxic_ablated=Rate(int(effect["toxic_refused_ablated"]), int(effect["toxic_n"])),
        safe_baseline=Rate(int(effect["safe_refused_baseline"]), int(effect["safe_n"])),
        safe_added=Rate(int(effect["safe_refused_added"]), int(effect["safe_n"])),
        kl=float(effect["kl_ablated"]), max_kl=float(row["max_kl"]),
        kl_answered=float(effect["kl_ablated_not_leaning"]), n_answered=int(effect["n_not_leaning"]),
        n_safe=int(effect["n_kl"]),
        separation_sigma=float(at_layer["separation_sigma"].iloc[0]) if len(at_layer) else float("nan"),
        probe_accuracy=float(at_layer["probe_accuracy"].iloc[0]) if len(at_layer) else float("nan"),
        **_tradeoff_extremes(store, present, str(row["model"]), float(row["max_kl"])),
    )


def _tradeoff_extremes(store: Path, present: frozenset[str], model: str,
                       max_kl: float) -> dict[str, AblationPointFinding | None]:
    if "ablation_tradeoff" not in present:
        return {}
    points = queries.query(store, queries.TRADEOFF_SQL, (model,))

    def finding(rows: pd.DataFrame, order: list[str]) -> AblationPointFinding | None:
        if rows.empty:
            return None
        row = rows.sort_values(order).iloc[0]
        return AblationPointFinding(f"{row['source']} {row['size']:g}", str(row["sites"]),
                                    Rate(int(row["n_refused"]), int(row["n_toxic"])), float(row["mean_kl"]))

    removing = points[points["rate"] <= ABLATED_TARGET]
    return {"best_within_kl": finding(points[points["mean_kl"] <= max_kl], ["rate", "mean_kl"]),
            "cheapest_removal": finding(removing, ["mean_kl"]) if len(removing) else finding(points, ["rate", "mean_kl"])}


def _verdicts(store: Path, present: frozenset[str]) -> tuple[VerdictFinding, ...]:
    if "circuit_verdicts" not in present:
        return ()
    frame = queries.query(store, queries.CIRCUIT_VERDICTS_SQL)
    seeds = (queries.query(store, queries.REPLICATION_SQL).groupby("kind")["label"].agg(tuple).to_dict()
             if "verdict_replication" in present else {})
    return tuple(VerdictFinding(
        kind=row.kind, label=row.label, reason=row.reason, between=row.between, ceiling=row.ceiling,
        ratio=row.ratio, ratio_low=row.ratio_low, ratio_high=row.ratio_high, category_share=row.category_share,
        share_low=row.category_share_low, share_high=row.category_share_high, p_value=row.p_value,
        permutations=int(row.permutations), alpha=row.alpha, seeds_label=row.seeds_label,
        n_categories=int(row.n_categories), prompts_per_category=int(row.prompts_per_category),
        jaccard=row.mean_jaccard, jaccard_split_half=row.jaccard_split_half, centred_within=row.centred_within,
        error_share=row.error_share, decoding_accuracy=row.decoding_accuracy, decoding_chance=row.decoding_chance,
        decoding_p=row.decoding_p, detectable_share=row.detectable_share, largest_share=row.largest_share,
        false_modular=row.false_modular, decisive_prompts=row.decisive_prompts, core_size=int(row.core_size),
        circuit_size=int(row.circuit_size), monolithic_ratio=row.monolithic_ratio, modular_ratio=row.modular_ratio,
        labels_by_seed=seeds.get(row.kind, ()),
    ) for row in rows_of(frame))


def _shared(store: Path, present: frozenset[str]) -> tuple[SharedFeature, ...]:
    if not {"circuit_core", "features"} <= present:
        return ()
    frame = queries.query(store, queries.CORE_FEATURES_SQL, ("toxic", SHARED_SHOWN))
    return tuple(SharedFeature(hook=row.hook, feature=int(row.feature), n_circuits=int(row.n_circuits),
                               mean_effect=float(row.mean_effect), top_tokens=row.top_tokens or "",
                               refusal_cosine=float(row.refusal_cosine) if pd.notna(row.refusal_cosine)
                               else float("nan"))
                 for row in rows_of(frame))


def _coverage(store: Path, present: frozenset[str]) -> tuple[CircuitCoverage, ...]:
    if "circuits" not in present:
        return ()
    frame = queries.query(store, queries.CIRCUIT_COVERAGE_SQL)
    return tuple(CircuitCoverage(kind=row.kind, n_ok=int(row.n_ok), n_skipped=int(row.n_skipped),
                                 fewest_prompts=int(row.fewest_prompts) if pd.notna(row.fewest_prompts) else 0,
                                 faithfulness_low=float(row.faithfulness_low),
                                 faithfulness_high=float(row.faithfulness_high), n_nodes=int(row.n_nodes))
                 for row in rows_of(frame))


def caveats(findings: Findings) -> tuple[str, ...]:
    """What limits the conclusions, in plain words, from the numbers themselves."""
    notes = []
    studied = findings.studied
    if studied and studied.smallest_group < MIN_GROUP:
        notes.append(f"Per-category refusal rates rest on as few as {studied.smallest_group} test prompts, "
                     "so their 95% intervals are wide; compare categories on the Overview page's whiskers.")
    for model, kappa in findings.judge_kappa.items():
        if kappa < 0.6:
            notes.append(f"For the {model} model the two refusal judges agree only weakly "
                         f"(Cohen's kappa {kappa:.2f}); its rates depend on the judge.")
    direction = findings.direction
    if direction and not direction.carries_refusal:
        notes.append(f"Ablating the chosen refusal direction still leaves {direction.toxic_ablated.text()} of toxic "
                     f"prompts refused (a direction that carries refusal leaves at most {ABLATED_TARGET:.0%}): "
                     "one direction does not carry this model's refusal; the ablation trade-off (cones of k "
                     "directions, RDO) shows what does.")
    if direction and direction.kl > direction.max_kl:
        notes.append(f"Ablating the refusal direction shifts safe prompts' next-token distribution by a mean "
                     f"KL of {direction.kl:.3f}, above the {direction.max_kl:g} target: the direction carries "
                     "some non-refusal information too.")
    for verdict in findings.verdicts:
        if verdict.label == "inconclusive":
            notes.append(f"The {verdict.kind} verdict is inconclusive: {verdict.reason}.")
        if not math.isfinite(verdict.detectable_share):
            notes.append(f"With {verdict.prompts_per_category} prompts per category the {verdict.kind} rule does not "
                         f"reliably detect even a category share of q = {verdict.largest_share:g} in simulations: "
                         "finding no category structure here says little.")
        if verdict.false_modular > 0.05:
            notes.append(f"On simulated {verdict.kind} studies without category structure the rule said "
                         f"\"modular\" {verdict.false_modular:.0%} of the time (more than 5%): read a modular "
                         "verdict with care.")
        if verdict.error_share >= 0.25:
            notes.append(f"SAE error terms carry {verdict.error_share:.0%} of the {verdict.kind} circuits' summed "
                         "|effect|; the comparison leaves them out, so that part of the mechanism is not compared.")
        if verdict.replicated is not True:
            notes.append(f"The {verdict.kind} verdict: {verdict.replication_text()}.")
        if verdict.seeds_label != verdict.label:
            notes.append(f"For {verdict.kind} prompts the seed notebooks' fixed thresholds would say "
                         f"'{verdict.seeds_label}', not '{verdict.label}' (they ignore the noise ceiling).")
    for cover in findings.coverage:
        if cover.n_skipped:
            notes.append(f"{cover.n_skipped} {cover.kind} categor{'y was' if cover.n_skipped == 1 else 'ies were'} "
                         "skipped for too few prompts (see the Circuits page).")
        if cover.kind == "toxic" and cover.faithfulness_low < TARGET_FAITHFULNESS:
            notes.append(f"Some toxic circuits keep only {cover.faithfulness_low:.0%} of the metric at "
                         f"{cover.n_nodes} nodes: the circuits are partial explanations.")
    if findings.missing_stages:
        notes.append("Stages not built yet: " + ", ".join(findings.missing_stages) + ".")
    return tuple(notes)


def study_findings(store: Path) -> Findings:
    present = queries.tables(store)
    study = queries.query(store, queries.STUDY_SQL).iloc[0]
    stages = tuple(queries.query(store, queries.STAGES_SQL)["stage"])
    planned = queries.query(store, queries.STUDY_STAGES_SQL)["value"]
    # Stores written before the plan was recorded: every stage counts.
    planned_stages = tuple(json.loads(planned.iloc[0])) if len(planned) else STAGE_ORDER
    counts = (queries.query(store, queries.PROMPT_COUNTS_SQL).pivot(index="kind", columns="split", values="n")
              .fillna(0).astype(int) if "prompts" in present else pd.DataFrame())
    refusal, kappa = _refusal(store, present)
    findings = Findings(
        store=Path(store), study=str(study["study"]), built_at=str(study["built_at"])[:16], stages_done=stages,
        stages_planned=planned_stages,
        prompt_counts=counts, refusal=refusal, judge_kappa=kappa, direction=_direction(store, present),
        verdicts=_verdicts(store, present), shared=_shared(store, present), coverage=_coverage(store, present),
    )
    return replace(findings, caveats=caveats(findings))


@functools.lru_cache(maxsize=8)
def _findings_of_version(path: str, version: int) -> Findings:
    return study_findings(Path(path))


def current_findings(store: Path) -> Findings:
    """`study_findings` of the store file as it is now, computed once per file version in this process (a
    plain memo, not Streamlit's cache: `python -m app` fills it before the server exists, so that the
    landing page's first load does not compute it while the browser is still compiling the app)."""
    return _findings_of_version(str(store), queries.store_version(store))


def _spec_of(findings: Findings) -> str:
    studied = findings.studied
    return f" (`{studied.spec}`)" if studied and studied.spec != studied.model else ""


def answer(findings: Findings) -> str:
    """The study's answer to "one shared refusal mechanism or one per category?", in words that say
    only what the numbers support."""
    toxic = findings.verdict("toxic")
    if toxic is None:
        return ("No verdict yet: the circuits stage has not run on this store. "
                "The rates and the direction below are what exists so far.")
    interval = f"95% CI {toxic.ratio_low:.0%}–{toxic.ratio_high:.0%}"
    alike = (f"across the {toxic.n_categories} harm categories its refusal circuits are {toxic.ratio:.0%} as "
             "alike as two halves of one category")
    model = f"The {findings.studied_model} model{_spec_of(findings)}"
    opening = {
        "monolithic": f"{model} refuses harmful requests through **largely shared circuits**: {alike} ({interval}, "
                      f"wholly at or above the {toxic.monolithic_ratio:.0%} band).",
        "partially modular": f"{model} refuses harmful requests through **a shared part plus category-specific "
                             f"parts**: {alike} ({interval}, wholly between {toxic.modular_ratio:.0%} and "
                             f"{toxic.monolithic_ratio:.0%}).",
        "modular": f"{model} refuses harmful requests through **category-specific circuits**: {alike} ({interval}, "
                   f"wholly below {toxic.modular_ratio:.0%}), and category labels matter.",
    }.get(toxic.label, f"This study **cannot yet say** whether {findings.studied_model} refuses through one shared "
                       f"mechanism or one per harm category: {alike}, but {toxic.reason}.")
    return (
        f"{opening} The category-specific share of the circuits' effect is estimated at "
        f"q = {toxic.category_share:.2f} (95% CI {toxic.share_low:.2f}–{toxic.share_high:.2f}); "
        f"{toxic.structure_text()}. Calibration: {toxic.calibration_text()}. A shared core of {toxic.core_size} "
        f"nodes recurs in most categories' top-{toxic.circuit_size} circuits."
    )


def comparison_table(studies: dict[str, Findings]) -> pd.DataFrame:
    """One row per measure, one column per study (named by the dict's keys): the headline numbers side
    by side, as text with their intervals."""
    rows: dict[str, dict[str, str]] = {}

    def put(measure: str, name: str, value: str) -> None:
        rows.setdefault(measure, {})[name] = value

    for name, findings in studies.items():
        put("models", name, ", ".join(f"{m.model} = {m.spec}" for m in findings.refusal))
        put("prompts (all splits)", name, str(int(findings.prompt_counts.to_numpy().sum())))
        for model in findings.refusal:
            for kind in KINDS:
                if kind in model.by_kind:
                    put(f"{kind} refused: {model.model}", name, model.by_kind[kind].text())
        if findings.direction:
            d = findings.direction
            put("refusal direction", name, f"layer {d.layer}, token {d.position_label!r} ({d.model})")
            put("toxic refused, direction ablated", name, d.toxic_ablated.text())
            put("safe refused, direction added", name, d.safe_added.text())
            put("KL on safe prompts under ablation", name, f"{d.kl:.3f}")
            put("KL on safe prompts not leaning to refuse", name, f"{d.kl_answered:.3f} ({d.n_answered} of {d.n_safe})")
            put("separation at that layer", name, f"{d.separation_sigma:.1f} σ, probe {d.probe_accuracy:.0%}")
        for v in findings.verdicts:
            put(f"verdict ({v.kind})", name, v.label)
            put(f"similarity / ceiling ({v.kind})", name,
                f"{v.ratio:.2f} [{v.ratio_low:.2f}, {v.ratio_high:.2f}], p = {v.p_value:.3g}")
            put(f"category share q ({v.kind})", name, f"{v.category_share:.2f} [{v.share_low:.2f}, {v.share_high:.2f}]")
            put(f"category decoding ({v.kind})", name,
                f"{v.decoding_accuracy:.0%} vs {v.decoding_chance:.0%} chance, p = {v.decoding_p:.3g}")
            put(f"smallest detectable q ({v.kind})", name,
                f"{v.detectable_share:.2f}" if math.isfinite(v.detectable_share) else f"> {v.largest_share:g}")
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=list(studies)).fillna("—")
    return frame.rename_axis("measure").reset_index()
