"""The Findings object, its wording, the report, and the Findings / Compare pages."""

from __future__ import annotations

import base64
import re
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from app.findings import Rate, VerdictFinding, answer, caveats, comparison_table, study_findings
from app.report import report_html, report_markdown
from engine.data import store

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"


def _verdict(**changes) -> VerdictFinding:
    base = VerdictFinding(kind="toxic", label="monolithic", reason="r", between=0.6, ceiling=0.63, ratio=0.95,
                          ratio_low=0.85, ratio_high=1.05, category_share=0.02, share_low=-0.01, share_high=0.05,
                          p_value=0.3, permutations=999, alpha=0.05, seeds_label="partially modular",
                          n_categories=10, prompts_per_category=24, jaccard=0.4, jaccard_split_half=0.3,
                          centred_within=0.05, error_share=0.1, decoding_accuracy=0.1, decoding_chance=0.1,
                          decoding_p=0.5, detectable_share=0.3, largest_share=0.8, false_modular=0.0,
                          decisive_prompts=float("nan"), core_size=40, circuit_size=100, monolithic_ratio=0.8,
                          modular_ratio=0.5)
    return replace(base, **changes)


@pytest.mark.parametrize(("refused", "n"), [(0, 10), (140, 145), (1, 1), (7, 13), (0, 1), (500, 1000)])
def test_rate_interval_is_statsmodels_wilson(refused: int, n: int) -> None:
    from statsmodels.stats.proportion import proportion_confint

    assert Rate(refused, n).interval == pytest.approx(
        proportion_confint(refused, n, alpha=0.05, method="wilson"), abs=1e-12)
    assert Rate(0, 10).interval == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert Rate(140, 145).text() == "97% (140/145; 95% CI 92%–99%)"


def _findings_with(tiny_store: Path, verdict: VerdictFinding):
    return replace(study_findings(tiny_store), verdicts=(verdict,))


def test_the_answer_says_only_what_the_numbers_support(tiny_store: Path) -> None:
    quiet = answer(_findings_with(tiny_store, _verdict()))
    assert "**largely shared circuits**" in quiet and "95% CI 85%–105%, wholly at or above the 80% band" in quiet
    assert "no category structure is detectable with 24 prompts per category" in quiet
    assert "not evidence that there is none" in quiet
    assert "detects a category-specific share of q = 0.30 or more in at least 80% of simulations" in quiet
    assert 'says "modular" in 0% of simulations without any category structure' in quiet
    tails = answer(_findings_with(tiny_store, _verdict(p_value=0.001, decoding_accuracy=0.4, decoding_p=0.005)))
    assert "categories do differ detectably (permutation p = 0.001; a prompt's category is read off its node " \
           "effects 40% of the time against 10% chance (p = 0.005))" in tails
    unsure = answer(_findings_with(tiny_store, _verdict(
        label="inconclusive", ratio_low=0.6, reason="the ratio's 95% interval (0.60–1.05) is too wide",
        detectable_share=float("nan"))))
    assert "**cannot yet say**" in unsure and "but the ratio's 95% interval (0.60–1.05) is too wide" in unsure
    assert "does not reliably detect category structure even at q = 0.80" in unsure
    split = answer(_findings_with(tiny_store, _verdict(label="modular", ratio=0.3, ratio_low=0.2, ratio_high=0.45,
                                                       p_value=0.001)))
    assert "**category-specific circuits**" in split and "wholly below 50%" in split
    for text in (quiet, tails, unsure, split):
        assert "one shared mechanism**" not in text and "firm" not in text


def test_findings_match_the_store(tiny_store: Path) -> None:
    findings = study_findings(tiny_store)
    rates = store.read_table(tiny_store, "refusal_rates")
    toxic = rates[(rates["kind"] == "toxic") & (rates["model"] == "other")]
    other = findings.refusal_of("other")
    assert (other.by_kind["toxic"].refused, other.by_kind["toxic"].n) == (toxic["n_refused"].sum(), toxic["n"].sum())
    assert other.smallest_group == rates[(rates["model"] == "other") & (rates["kind"] != "safe")]["n"].min()
    chosen = store.read_table(tiny_store, "refusal_directions").query("scope == 'global' and chosen")
    assert findings.direction.layer == int(chosen["layer"].iloc[0]) and findings.direction.model == "other"
    harmlessness = store.read_table(tiny_store, "direction_harmlessness").query(
        "model == 'other' and condition == 'ablation'").iloc[0]
    assert (findings.direction.kl, findings.direction.kl_answered) == pytest.approx(
        (harmlessness["mean_kl"], harmlessness["mean_kl_not_leaning"]))
    assert (findings.direction.n_safe, findings.direction.n_answered) == (harmlessness["n"], harmlessness["n_not_leaning"])
    from app.narrative import sections

    direction = next(section for section in sections(findings) if section.key == "direction")
    assert f"KL of **{harmlessness['mean_kl']:.2f}** over all {harmlessness['n']}" in direction.body
    assert f"**{harmlessness['mean_kl_not_leaning']:.2f}** over the {harmlessness['n_not_leaning']}" in direction.body
    verdicts = store.read_table(tiny_store, "circuit_verdicts").set_index("kind")
    for verdict in findings.verdicts:
        assert verdict.label == verdicts.loc[verdict.kind, "label"]
        assert verdict.ratio == pytest.approx(verdicts.loc[verdict.kind, "ratio"])
    core = store.read_table(tiny_store, "circuit_core").query("kind == 'toxic' and in_core")
    assert {(s.hook, s.feature) for s in findings.shared} <= set(zip(core["hook"], core["feature"], strict=True))
    assert findings.missing_stages == () and "tune" not in findings.stages_planned  # no fine-tune in this study
    assert findings.prompt_counts.to_numpy().sum() == len(store.read_table(tiny_store, "prompts"))


def test_answer_and_caveats_follow_the_numbers(tiny_store: Path) -> None:
    findings = study_findings(tiny_store)
    toxic = findings.verdict("toxic")
    text = answer(findings)
    assert f"{toxic.ratio:.0%} as alike" in text and f"{toxic.n_categories} harm categories" in text
    over_kl = replace(findings, direction=replace(findings.direction, kl=0.5, max_kl=0.1), verdicts=(_verdict(
        label="inconclusive", reason="the ratio's 95% interval (0.60–1.05) is too wide", detectable_share=float("nan"),
        false_modular=0.1, error_share=0.4),))
    notes = " ".join(caveats(over_kl))
    assert "mean KL of 0.500, above the 0.1 target" in notes
    # Just above the limit reads as above it, not as a rounded "0.10, above the 0.1 target".
    just_over = replace(findings, direction=replace(findings.direction, kl=0.1033, max_kl=0.1))
    assert "mean KL of 0.103, above the 0.1 target" in " ".join(caveats(just_over))
    carrying = replace(findings.direction, toxic_ablated=Rate(1, 20))
    leaking = replace(findings.direction, toxic_ablated=Rate(16, 20))
    assert "still leaves" not in " ".join(caveats(replace(findings, direction=carrying)))
    assert ("still leaves 80% (16/20; 95% CI" in " ".join(caveats(replace(findings, direction=leaking)))
            and "one direction does not carry this model's refusal" in " ".join(caveats(replace(findings, direction=leaking))))
    assert "The toxic verdict is inconclusive: the ratio's 95% interval (0.60–1.05) is too wide." in notes
    assert "would say 'partially modular', not 'inconclusive'" in notes
    assert "does not reliably detect even a category share of q = 0.8" in notes and "says little" in notes
    assert 'said "modular" 10% of the time (more than 5%)' in notes
    assert "SAE error terms carry 40% of the toxic circuits' summed |effect|" in notes
    assert "as few as" in notes  # the tiny study's categories have a handful of test prompts each
    assert "The toxic verdict: one seed only" in notes  # `precompute replicate` not run
    calm = " ".join(caveats(replace(findings, verdicts=(_verdict(seeds_label="monolithic",
                                                                 labels_by_seed=("monolithic",) * 3),))))
    assert "verdict" not in calm and "SAE error" not in calm and "says little" not in calm
    split = " ".join(caveats(replace(findings, verdicts=(_verdict(labels_by_seed=("monolithic", "inconclusive")),))))
    assert "not replicated over 2 seeds (monolithic, inconclusive)" in split


def test_html_report_is_self_contained_and_carries_the_numbers(tiny_store: Path) -> None:
    findings = study_findings(tiny_store)
    page = report_html(findings)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 4  # verdicts, rates, direction, features
    assert not re.search(r"""(src|href)\s*=\s*["']https?:""", page) and "<script" not in page
    toxic = findings.verdict("toxic")
    assert f"ratio {toxic.ratio:.2f}" in page
    assert findings.direction.toxic_ablated.text() in page
    for title in ("One shared mechanism, or one per category?", "Who gets refused", "How far to trust this"):
        assert title in page


def test_markdown_report_embeds_png_figures(tiny_store: Path) -> None:
    text = report_markdown(study_findings(tiny_store))
    images = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert len(images) == 4
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert "| kind" in text  # the prompt-count table as a Markdown table


def _partial_copy(source: Path, target: Path, drop_stage: str) -> Path:
    shutil.copy2(source, target)
    with duckdb.connect(str(target)) as con:
        tables = con.execute("SELECT tables FROM stages WHERE stage = ?", [drop_stage]).fetchone()[0]
        for name in re.findall(r'"([a-z_]+)"', tables):
            con.execute(f"DROP TABLE {name}")
        con.execute("DELETE FROM stages WHERE stage = ?", [drop_stage])
    return target


def test_findings_page_is_the_landing_page(tiny_store: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(tiny_store))
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    assert not app.exception and not app.error
    findings = study_findings(tiny_store)
    assert app.title[0].value == "Findings: study tiny"
    assert app.info[0].value == answer(findings)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Verdict (toxic prompts)"] == findings.verdict("toxic").label
    assert metrics["Toxic refused, direction ablated"] == f"{findings.direction.toxic_ablated.rate:.0%}"
    names = {button.proto.label for button in app.get("download_button")}
    assert {"Report (HTML)", "Report (Markdown)", "↓ PNG", "↓ SVG"} <= names


def test_presentation_mode_shows_one_section_per_screen(tiny_store: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(tiny_store))
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    app.sidebar.toggle[0].set_value(True).run()
    assert [s.value for s in app.subheader] == ["One shared mechanism, or one per category?"]
    next_button = next(b for b in app.button if b.label == "Next →")
    next_button.click().run()
    assert [s.value for s in app.subheader] == ["Who gets refused"]
    assert any("font-size: 3.2rem" in str(block.proto) for block in app.get("html"))


def test_a_store_missing_a_stage_says_what_to_build(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    partial = _partial_copy(tiny_store, tmp_path / "partial.duckdb", "circuits")
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(partial))
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    assert not app.exception and not app.error
    assert app.info[0].value.startswith("No verdict yet")
    text = " ".join(m.value for m in app.markdown)
    assert "⬜ `circuits`" in text and "python -m precompute run" in text


def test_comparison_puts_two_studies_side_by_side(tiny_store: Path, tmp_path: Path) -> None:
    partial = _partial_copy(tiny_store, tmp_path / "partial.duckdb", "circuits")
    table = comparison_table({"full": study_findings(tiny_store), "partial": study_findings(partial)}).set_index(
        "measure")
    assert list(table.columns) == ["full", "partial"]
    assert table.loc["verdict (toxic)", "partial"] == "—"
    assert table.loc["verdict (toxic)", "full"].startswith(study_findings(tiny_store).verdict("toxic").label)
    assert table.loc["toxic refused: other", "full"] == table.loc["toxic refused: other", "partial"]


def test_compare_page_with_two_stores(tiny_store: Path, isolated_data_dir: Path, monkeypatch) -> None:
    stores = isolated_data_dir / "stores"
    stores.mkdir(parents=True)
    shutil.copy2(tiny_store, stores / "first.duckdb")
    _partial_copy(tiny_store, stores / "second.duckdb", "circuits")
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(stores / "first.duckdb"))
    app = AppTest.from_file(str(MAIN), default_timeout=120).run()
    app.switch_page("views/compare.py").run()
    assert not app.exception and not app.error
    shown = app.dataframe[0].value
    assert list(shown.columns) == ["measure", "first", "second"]
    assert len(app.get("vega_lite_chart")) == 2


def test_findings_are_computed_once_per_store_version_and_before_the_server_starts(tiny_store: Path,
                                                                                   tmp_path: Path) -> None:
    import os

    from app.__main__ import warm_landing_page
    from app.findings import _findings_of_version, current_findings

    copy = tmp_path / "copy.duckdb"
    shutil.copy(tiny_store, copy)
    _findings_of_version.cache_clear()
    assert warm_landing_page(["--server.port", "8501", "--", "--store", str(copy)]) == copy
    warmed = _findings_of_version.cache_info()
    first = current_findings(copy)
    assert _findings_of_version.cache_info().hits == warmed.hits + 1  # the page reads what `python -m app` made
    assert current_findings(copy) is first

    new_run = tmp_path / "new_run.duckdb"  # precompute swaps in a new run by rename: the next read sees it
    shutil.copy(tiny_store, new_run)
    with duckdb.connect(str(new_run)) as con:
        con.execute("UPDATE circuit_verdicts SET label = 'modular' WHERE kind = 'toxic'")
    os.utime(new_run, ns=(new_run.stat().st_atime_ns, copy.stat().st_mtime_ns + 1_000_000))
    os.replace(new_run, copy)
    assert current_findings(copy).verdict("toxic").label == "modular" != first.verdict("toxic").label

    assert warm_landing_page(["--", "--store", str(tmp_path / "none.duckdb")]) is None
    (tmp_path / "broken.duckdb").write_text("not a store")
    assert warm_landing_page(["--", "--store", str(tmp_path / "broken.duckdb")]) is None  # the page says why


def test_direction_section_calls_the_direction_causal_only_when_ablation_removes_refusal(tiny_store: Path) -> None:
    from app.narrative import sections

    findings = study_findings(tiny_store)

    def direction_text(refused: int) -> str:
        changed = replace(findings, direction=replace(findings.direction, toxic_ablated=Rate(refused, 145)))
        return next(s.body for s in sections(changed) if s.key == "direction")

    assert "It is causal:" in direction_text(5)
    partial = direction_text(116)
    assert "It is causal" not in partial and "80% of toxic prompts are still refused" in partial


def test_direction_section_reports_what_cones_and_weights_reach(tiny_store: Path) -> None:
    from app.findings import ABLATED_TARGET, AblationPointFinding
    from app.narrative import sections

    findings = study_findings(tiny_store)
    tradeoff = store.read_table(tiny_store, "ablation_tradeoff")
    removing = tradeoff[tradeoff["rate"] <= ABLATED_TARGET]
    cheapest = removing.nsmallest(1, "mean_kl") if len(removing) else tradeoff.sort_values(["rate", "mean_kl"]).head(1)
    assert findings.direction.cheapest_removal.name == f"{cheapest['source'].iloc[0]} {cheapest['size'].iloc[0]:g}"

    def direction_text(within: AblationPointFinding | None, cheapest: AblationPointFinding) -> str:
        direction = replace(findings.direction, toxic_ablated=Rate(116, 145), max_kl=0.1, best_within_kl=within,
                            cheapest_removal=cheapest)
        return next(s.body for s in sections(replace(findings, direction=direction)) if s.key == "direction")

    cone = AblationPointFinding("cone 1", "layers 22", Rate(9, 145), 0.24)
    weak = AblationPointFinding("weight 0.25", "layer 18", Rate(135, 145), 0.17)
    text = direction_text(weak, cone)
    assert "The cheapest ablation that removes refusal, cone 1 (layers 22), leaves 6% (9/145" in text
    assert "KL of 0.24" in text and "the fewest still refused is 93% (135/145" in text
    assert "only beyond the limit" in text
    assert "The ablation leaving the fewest refused" in direction_text(weak, weak)
    assert "none of the ablations measured" in direction_text(weak, weak)
    assert "no ablation measured stays within the KL limit of 0.1" in direction_text(None, cone)
