"""The study's answer in one object: what the Findings page, the report, presentation mode and the
study comparison all render. Reads a store through `app.queries`; holds numbers, not widgets."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from app import queries

KINDS = ("toxic", "hard", "safe")
Z_95 = NormalDist().inv_cdf(0.975)
STAGE_ORDER = ("prompts", "tune", "generate", "directions", "saes", "steering", "circuits")
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
        """The Wilson score interval, as statsmodels' proportion_confint(method="wilson") gives it
        (tested against it). Written out because importing statsmodels pulls in scipy.stats, ~3 s
        of the app's first page load, for four lines of arithmetic."""
        if not self.n:
            return float("nan"), float("nan")
        p, n = self.refused / self.n, self.n
        centre = (p + Z_95**2 / (2 * n)) / (1 + Z_95**2 / n)
        half = Z_95 / (1 + Z_95**2 / n) * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n**2))
        return centre - half, centre + half

    def text(self) -> str:
        low, high = self.interval
        return f"{self.rate:.0%} ({self.refused}/{self.n}; 95% CI {low:.0%}–{high:.0%})"


@dataclass(frozen=True)
class ModelRefusal:
    model: str
    spec: str
    by_kind: dict[str, Rate]
    smallest_group: int  # fewest prompts in one category x kind cell


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


@dataclass(frozen=True)
class VerdictFinding:
    kind: str
    label: str
    reason: str
    between: float
    between_low: float
    between_high: float
    ceiling: float
    ratio: float
    ratio_low: float
    ratio_high: float
    p_value: float
    permutations: int
    seeds_label: str
    n_categories: int
    jaccard: float
    core_size: int
    circuit_size: int
    monolithic_ratio: float
    modular_ratio: float

    @property
    def certainty(self) -> str:
        """How sure: does the ratio's whole 95% interval sit in the verdict's band?"""
        if self.label == "monolithic" and self.ratio_low >= self.monolithic_ratio:
            return "firm"
        if self.label == "modular" and self.ratio_high < self.modular_ratio:
            return "firm"
        if self.label == "partially modular" and self.modular_ratio <= self.ratio_low \
                and self.ratio_high < self.monolithic_ratio:
            return "firm"
        return "tentative"


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
            by_kind={row.kind: Rate(int(row.n_refused), int(row.n)) for row in rows.itertuples()},
            smallest_group=int(rows.loc[rows["kind"] != "safe", "smallest_group"].min()
                               if (rows["kind"] != "safe").any() else rows["smallest_group"].min())))
    agreement = queries.query(store, queries.AGREEMENT_SQL)
    kappa = {row.model: float(row.cohen_kappa) for row in agreement.itertuples() if row.kind == "all"}
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
    )


def _verdicts(store: Path, present: frozenset[str]) -> tuple[VerdictFinding, ...]:
    if "circuit_verdicts" not in present:
        return ()
    frame = queries.query(store, queries.CIRCUIT_VERDICTS_SQL)
    return tuple(VerdictFinding(
        kind=row.kind, label=row.label, reason=row.reason, between=row.between, between_low=row.between_low,
        between_high=row.between_high, ceiling=row.ceiling, ratio=row.ratio, ratio_low=row.ratio_low,
        ratio_high=row.ratio_high, p_value=row.p_value, permutations=int(row.permutations),
        seeds_label=row.seeds_label, n_categories=int(row.n_categories), jaccard=row.mean_jaccard,
        core_size=int(row.core_size), circuit_size=int(row.circuit_size),
        monolithic_ratio=row.monolithic_ratio, modular_ratio=row.modular_ratio,
    ) for row in frame.itertuples())


def _shared(store: Path, present: frozenset[str]) -> tuple[SharedFeature, ...]:
    if not {"circuit_core", "features"} <= present:
        return ()
    frame = queries.query(store, queries.CORE_FEATURES_SQL, ("toxic", SHARED_SHOWN))
    return tuple(SharedFeature(hook=row.hook, feature=int(row.feature), n_circuits=int(row.n_circuits),
                               mean_effect=float(row.mean_effect), top_tokens=row.top_tokens or "",
                               refusal_cosine=float(row.refusal_cosine) if pd.notna(row.refusal_cosine)
                               else float("nan"))
                 for row in frame.itertuples())


def _coverage(store: Path, present: frozenset[str]) -> tuple[CircuitCoverage, ...]:
    if "circuits" not in present:
        return ()
    frame = queries.query(store, queries.CIRCUIT_COVERAGE_SQL)
    return tuple(CircuitCoverage(kind=row.kind, n_ok=int(row.n_ok), n_skipped=int(row.n_skipped),
                                 fewest_prompts=int(row.fewest_prompts) if pd.notna(row.fewest_prompts) else 0,
                                 faithfulness_low=float(row.faithfulness_low),
                                 faithfulness_high=float(row.faithfulness_high), n_nodes=int(row.n_nodes))
                 for row in frame.itertuples())


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
    if direction and direction.kl > direction.max_kl:
        notes.append(f"Ablating the refusal direction shifts safe prompts' next-token distribution by a mean "
                     f"KL of {direction.kl:.2f}, above the {direction.max_kl:g} target: the direction carries "
                     "some non-refusal information too.")
    for verdict in findings.verdicts:
        if verdict.certainty == "tentative":
            notes.append(f"The {verdict.kind} verdict is tentative: the ratio's 95% interval "
                         f"({verdict.ratio_low:.2f}–{verdict.ratio_high:.2f}) crosses a threshold "
                         f"({verdict.modular_ratio:g} / {verdict.monolithic_ratio:g}).")
        if verdict.seeds_label != verdict.label:
            notes.append(f"For {verdict.kind} prompts the seed notebooks' fixed thresholds would say "
                         f"'{verdict.seeds_label}', not '{verdict.label}' (they ignore the noise ceiling).")
    for cover in findings.coverage:
        if cover.n_skipped:
            notes.append(f"{cover.n_skipped} {cover.kind} categor{'y was' if cover.n_skipped == 1 else 'ies were'} "
                         "skipped for too few prompts (see the Circuits page).")
        if cover.kind == "toxic" and cover.faithfulness_low < 0.6:
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
    """The study's answer to "one shared refusal mechanism or one per category?", in plain words."""
    toxic = findings.verdict("toxic")
    if toxic is None:
        return ("No verdict yet: the circuits stage has not run on this store. "
                "The rates and the direction below are what exists so far.")
    sure = {"firm": "fairly sure", "tentative": "not sure"}[toxic.certainty]
    shape = {
        "monolithic": "through **one shared mechanism**",
        "modular": "through **a separate mechanism per harm category**",
        "partially modular": "through **a shared core plus category-specific parts**",
    }.get(toxic.label, f"in a way judged **{toxic.label}**")
    return (
        f"The {findings.studied_model} model{_spec_of(findings)} refuses harmful requests {shape}. Across the "
        f"{toxic.n_categories} harm categories its refusal circuits are {toxic.ratio:.0%} as alike as two "
        f"halves of one category (95% CI {toxic.ratio_low:.0%}–{toxic.ratio_high:.0%}); "
        f"we are {sure} ({toxic.certainty}: the interval "
        f"{'lies entirely' if toxic.certainty == 'firm' else 'does not lie entirely'} on one side of the "
        f"thresholds). A shared core of {toxic.core_size} nodes recurs in most categories' "
        f"top-{toxic.circuit_size} circuits."
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
            put(f"verdict ({v.kind})", name, f"{v.label} ({v.certainty})")
            put(f"similarity / ceiling ({v.kind})", name,
                f"{v.ratio:.2f} [{v.ratio_low:.2f}, {v.ratio_high:.2f}], p = {v.p_value:.3g}")
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=list(studies)).fillna("—")
    return frame.rename_axis("measure").reset_index()
