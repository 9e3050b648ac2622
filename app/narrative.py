"""The study told as a few sections (words, one figure, where the numbers come from). The Findings
page, presentation mode and the report render these same sections, so they never disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
from streamlit.elements.vega_charts import AltairChart

from app import figures
from app.findings import ABLATED_TARGET, DirectionFinding, Findings, answer
from engine.data.schema import KINDS

# The app page each section's numbers come from (file under app/, and its URL path).
PAGES = {
    "overview": ("views/overview.py", "Overview"),
    "directions": ("views/directions.py", "Directions"),
    "features": ("views/features.py", "Features"),
    "circuits": ("views/circuits.py", "Circuits"),
    "steering": ("views/steering.py", "Steering"),
    "prompts": ("views/prompts.py", "Prompts"),
}


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    body: str  # Markdown
    source: str  # key of PAGES: where the numbers come from
    chart: AltairChart | None = None
    table: pd.DataFrame | None = None
    query_params: dict[str, str] = field(default_factory=dict)

    @property
    def page_path(self) -> str:
        return PAGES[self.source][0]

    @property
    def page_title(self) -> str:
        return PAGES[self.source][1]


def _answer(findings: Findings) -> Section:
    lines = [answer(findings), ""]
    for verdict in findings.verdicts:
        lines.append(
            f"- **{verdict.kind} prompts: {verdict.label}.** Circuits compared on their SAE features (error terms, "
            f"{verdict.error_share:.0%} of the summed |effect|, apart): mean cosine between categories "
            f"{verdict.between:.2f} against a within-category ceiling of {verdict.ceiling:.2f}; ratio "
            f"{verdict.ratio:.2f} (95% CI {verdict.ratio_low:.2f}–{verdict.ratio_high:.2f}, joint bootstrap over "
            f"prompts); category-specific share q = {verdict.category_share:.2f} "
            f"({verdict.share_low:.2f}–{verdict.share_high:.2f}); permutation p = {verdict.p_value:.3g} "
            f"({verdict.permutations} shuffles); category decoding {verdict.decoding_accuracy:.0%} against "
            f"{verdict.decoding_chance:.0%} chance (p = {verdict.decoding_p:.3g}); Jaccard of top-"
            f"{verdict.circuit_size} node sets {verdict.jaccard:.2f} (two halves of one category: "
            f"{verdict.jaccard_split_half:.2f}). Calibration: {verdict.calibration_text()}.")
    return Section("answer", "One shared mechanism, or one per category?", "\n".join(lines), "circuits",
                   chart=figures.verdict_evidence(findings.verdicts) if findings.verdicts else None)


def _refusal(findings: Findings) -> Section:
    lines = []
    for model in findings.refusal:
        rates = "; ".join(f"{kind} {model.by_kind[kind].text()}" for kind in KINDS if kind in model.by_kind)
        lines.append(f"- **{model.model}** (`{model.spec}`): {rates}.")
    body = ("Share of test prompts each model refused (substring judge). Toxic prompts should be refused; "
            "hard prompts sound harmful but are safe, so refusing them is over-refusal.\n\n" + "\n".join(lines))
    return Section("refusal", "Who gets refused", body, "overview",
                   chart=figures.refusal_by_kind({findings.study: findings}) if findings.refusal else None)



def _beyond_one_direction(d: DirectionFinding) -> str:
    """What weighted and multi-direction ablation (the `tradeoff` stage) add, in a sentence or two."""
    cheapest, within = d.cheapest_removal, d.best_within_kl
    if cheapest is None:
        return " Whether several directions together (a refusal cone) do is measured by the `tradeoff` stage."
    reach = (f" {'The cheapest ablation that removes refusal' if cheapest.refused.rate <= ABLATED_TARGET else 'The ablation leaving the fewest refused'}, "
             f"{cheapest.name} ({cheapest.sites}), leaves {cheapest.refused.text()} refused at a KL of "
             f"{cheapest.kl:.2f} on safe prompts")
    if within is None:
        return reach + f"; no ablation measured stays within the KL limit of {d.max_kl:g}."
    if within.refused.rate <= ABLATED_TARGET:
        return reach + f"; within the KL limit of {d.max_kl:g}, {within.name} leaves {within.refused.text()}."
    verdict = ("ablation removes this model's refusal only beyond the limit" if cheapest.refused.rate <= ABLATED_TARGET
               else "none of the ablations measured removes this model's refusal")
    return reach + (f"; within the KL limit of {d.max_kl:g} the fewest still refused is {within.refused.text()} "
                    f"({within.name}): {verdict}.")


def _direction(findings: Findings) -> Section:
    d = findings.direction
    if d is None:
        return Section("direction", "The refusal direction", "The directions stage has not run yet.", "directions")
    # Arditi et al. find one direction carries refusal (ablated, chat models refuse almost nothing);
    # say "causal" only as far as this model's numbers go.
    lead = ("It is causal:" if d.carries_refusal else
            f"Its effect is partial: with it ablated, {d.toxic_ablated.rate:.0%} of toxic prompts are still refused "
            f"(a direction that carries refusal leaves at most {ABLATED_TARGET:.0%}), so one direction does not "
            f"hold this model's refusal.{_beyond_one_direction(d)} The chosen direction:")
    body = (
        f"The difference of mean activations between toxic and safe prompts at layer **{d.layer}**, token "
        f"`{d.position_label!r}` of the {d.model} model separates them by **{d.separation_sigma:.1f} σ** "
        f"(held-out linear probe accuracy **{d.probe_accuracy:.0%}**). {lead}\n\n"
        f"- ablating it from every layer, toxic prompts refused fall from {d.toxic_baseline.text()} "
        f"to **{d.toxic_ablated.text()}**;\n"
        f"- adding it at layer {d.layer}, safe prompts refused rise from {d.safe_baseline.text()} "
        f"to **{d.safe_added.text()}**;\n"
        f"- the price: ablation moves safe prompts' next-token distribution by a mean KL of **{d.kl:.2f}** "
        f"over all {d.n_safe}, and **{d.kl_answered:.2f}** over the {d.n_answered} the model does not lean to "
        f"refuse, the kind of prompt the direction was chosen on (target ≤ {d.max_kl:g}; on the others, "
        "ablation also undoes an over-refusal)."
    )
    return Section("direction", "The refusal direction", body, "directions", chart=figures.direction_effect(d))


def _shared(findings: Findings) -> Section:
    if not findings.shared:
        return Section("shared", "Shared refusal features", "The circuits stage has not run yet.", "circuits")
    lines = []
    for s in findings.shared:
        name = f"the SAE error term at `{s.hook}`" if s.feature < 0 else f"feature **{s.feature}** at `{s.hook}`"
        tokens = f", top tokens `{s.top_tokens.strip()}`" if s.feature >= 0 and s.top_tokens.strip() else ""
        cosine = f", cosine {s.refusal_cosine:+.2f} with the refusal direction" if s.feature >= 0 else ""
        lines.append(f"- {name}: mean effect {s.mean_effect:+.2f} in {s.n_circuits} circuits{tokens}{cosine}")
    first = next((s for s in findings.shared if s.feature >= 0), None)
    body = ("The nodes with the largest effect among those every toxic circuit shares (the shared core). "
            "Open one on the Features page for its top activating prompts.\n\n" + "\n".join(lines))
    params = {"hook": first.hook, "feature": str(first.feature)} if first else {}
    return Section("shared", "Shared refusal features", body, "features",
                   chart=figures.shared_features(findings.shared), query_params=params)


def _caveats(findings: Findings) -> Section:
    body = "\n".join(f"- {note}" for note in findings.caveats) or "- None flagged by the numbers."
    return Section("caveats", "How far to trust this", body, "overview")


def _data(findings: Findings) -> Section:
    models = "; ".join(f"**{m.model}** = `{m.spec}`" for m in findings.refusal) or "none yet"
    total = int(findings.prompt_counts.to_numpy().sum()) if not findings.prompt_counts.empty else 0
    body = (f"Study **{findings.study}**, store `{findings.store}`, last built {findings.built_at}. "
            f"Models: {models}. {total} prompts (counts by kind and split below). Stages built: "
            f"{', '.join(findings.stages_done) or 'none'}.")
    table = findings.prompt_counts.reset_index() if not findings.prompt_counts.empty else None
    return Section("data", "Models and data", body, "prompts", table=table)


def answer_ce_text(sweep: pd.DataFrame, strength: float) -> str:
    """The safe answers' cross-entropy at `strength` (rows indexed by strength) against the unsteered
    model's, where the store has it."""
    if "mean_ce" not in sweep:
        return ""
    (mean, low, high), (unsteered, _, _) = sweep.reindex([strength, 0.0])[["mean_ce", "ce_low", "ce_high"]].to_numpy(float)
    if math.isnan(mean):
        return ""
    return (f" and the cross-entropy of the model's own safe answers {mean:.3f} nats/token [{low:.3f}, {high:.3f}], "
            f"against {unsteered:.3f} unsteered")


def sections(findings: Findings) -> tuple[Section, ...]:
    return (_answer(findings), _refusal(findings), _direction(findings), _shared(findings),
            _caveats(findings), _data(findings))
