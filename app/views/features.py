"""Features, in three tabs: one feature's dashboard (histogram, top logits, top texts with token
highlighting, activation by category x kind, and live encoding of the reader's own text), a sortable
table of all features (a selected row opens its dashboard), and the SAE's quality with its most
refusal-aligned features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, queries
from app.components import figure_spec, highlighted_tokens, show_chart, show_table, tab_views, top_text_html
from app.context import classroom_mode, current_store, require_tables, warm_model_stack
from app.labels import ALL_FEATURES, FEATURE_DASHBOARD, FEATURES_TABS
from app.top_texts import WINDOW, diverse_order, one_per_prompt
from engine.errors import ExplorerError

HOOK_KEY, FEATURE_KEY = "features_hook", "features_feature"
# The reader's feature, kept apart from the number input's own key: Streamlit drops a widget's state when a
# run does not draw it, and the dashboard is not drawn while another tab is open.
CHOSEN_KEY = "features_chosen"
URL_WRITTEN = "features_url_written"  # the (hook, feature) this page last put in the URL
VIEW_KEY, TABLE_KEY, SHOWN_KEY = "features_view", "feature_table", "features_shown"
TOP_TEXT_ORDERS = ("strongest first", "spread over categories and kinds")
RATIO = 3.0  # "fires on toxic prompts at >= 3x its rate on safe prompts"
SORTS = {
    "refusal alignment (|cosine| with the refusal direction)": ("refusal_alignment", False),
    "attribution to the refusal score (|effect|)": ("attribution_size", False),
    "toxic vs safe firing (rate ratio)": ("toxic_safe_ratio", False),
    "category specificity (share of the top category)": ("top_category_share", False),
    "density": ("density", False),
    "feature id": ("feature", True),
}

store = current_store()
st.title("SAE features")
require_tables(store, ("saes", "features", "feature_examples", "feature_groups", "sae_corpus"))


saes = queries.query(store, queries.SAES_SQL)
params = st.query_params
hooks: list[str] = saes["hook"].tolist()


def followed_link() -> bool:
    """The URL's (hook, feature) differs from what this page last wrote there: a link was followed, so
    the URL seeds the widgets; otherwise they keep the reader's own choices."""
    return st.session_state.get(URL_WRITTEN) != (params.get("hook"), params.get("feature"))


@dataclass(frozen=True)
class ChosenSae:
    """The SAE the reader picked: its `saes` row and its features (with the sort columns added)."""

    hook: str
    row: pd.Series
    features: pd.DataFrame

    @property
    def d_sae(self) -> int:
        return int(self.row.d_sae)

    @property
    def aligned(self) -> pd.DataFrame:
        """The 20 live features whose decoder direction is closest to the refusal direction."""
        return self.features[self.features["density"] > 0].nlargest(20, "refusal_alignment")


def choose_sae() -> ChosenSae:
    """The SAE selectbox, seeded by a followed link's hook; a followed link's feature becomes the chosen one
    (the page stops with an error when that SAE has no such feature)."""
    linked_hook = params.get("hook")
    if (followed_link() and linked_hook in hooks) or st.session_state.get(HOOK_KEY) not in hooks:
        st.session_state[HOOK_KEY] = linked_hook if linked_hook in hooks else hooks[-1]
    hook = st.selectbox("SAE", hooks, key=HOOK_KEY,
                        help="One SAE per hook; the refusal direction's layer is the last one by default.")
    features = queries.query(store, queries.FEATURES_SQL, (hook,))
    features["refusal_alignment"] = features["refusal_cosine"].abs()
    features["attribution_size"] = features["attribution"].abs()
    sae = ChosenSae(hook, saes[saes["hook"] == hook].iloc[0], features)

    linked_feature = params.get("feature")
    if followed_link() and linked_feature is not None:
        if not linked_feature.isdigit() or not 0 <= int(linked_feature) < sae.d_sae:
            st.error(f"Feature {linked_feature!r} does not exist: this SAE has {sae.d_sae:,} features. "
                     f"Fix: pick 0–{sae.d_sae - 1}.")
            st.stop()
        st.session_state[CHOSEN_KEY] = int(linked_feature)
        st.session_state.pop(FEATURE_KEY, None)
        st.session_state[VIEW_KEY] = FEATURE_DASHBOARD
    elif not 0 <= st.session_state.get(CHOSEN_KEY, -1) < sae.d_sae:  # first visit, or another SAE's width
        st.session_state[CHOSEN_KEY] = int(sae.aligned["feature"].iloc[0])
        st.session_state.pop(FEATURE_KEY, None)
    return sae


def open_selected_feature() -> None:
    """A row selected in the feature table opens that feature's dashboard."""
    rows = st.session_state[TABLE_KEY].selection.rows
    if rows:
        st.session_state[CHOSEN_KEY] = st.session_state[SHOWN_KEY][rows[0]]
        st.session_state.pop(FEATURE_KEY, None)
        st.session_state[VIEW_KEY] = FEATURE_DASHBOARD


def start_warming() -> None:
    """`warm_model_stack` as a widget callback, which returns nothing (it returns the import thread)."""
    warm_model_stack()


def sae_overview(sae: ChosenSae) -> None:
    sae_row = sae.row
    cols = st.columns(5)
    cols[0].metric("L0", f"{sae_row.l0:.1f}", help="mean active features per token (held-out transcripts)")
    cols[1].metric("Variance unexplained", f"{sae_row.fraction_variance_unexplained:.3f}")
    cols[2].metric("Dead features", f"{sae_row.dead_fraction:.1%}", help="never fire on the held-out tokens")
    cols[3].metric("CE loss recovered", f"{sae_row.ce_loss_recovered:.3f}",
                   help=f"next-token CE {sae_row.ce_clean:.3f} clean, {sae_row.ce_spliced:.3f} with the SAE spliced "
                        f"in, {sae_row.ce_zero_ablated:.3f} with the site zeroed")
    cols[4].metric("Training tokens", f"{sae_row.n_train_tokens:,}",
                   help=f"{sae_row.n_corpus_tokens:,} corpus tokens; {sae_row.n_held_out_tokens:,} held out; "
                        "template and special tokens are not read")
    st.caption(f"{sae_row.architecture} SAE, {sae.d_sae:,} features on `{sae.hook}` of model **{sae_row.model}** "
               f"({sae_row.source}).")

    st.subheader("The most refusal-aligned features")
    aligned = sae.aligned
    n_selective = int((aligned["toxic_safe_ratio"] >= RATIO).sum())
    st.markdown(
        f"Of the 20 live features whose decoder direction is closest to the refusal direction, **{n_selective}** fire "
        f"on toxic prompts at ≥ {RATIO:.0f}× their rate on safe prompts (at the refusal-decision token, all splits).")
    show_chart(figure_spec(charts.firing_rates, aligned), f"{sae.hook} refusal-aligned features, toxic vs safe firing",
               data=aligned, width="stretch")

    if "backup_recovery" in queries.tables(store):
        backup_view()


def backup_view() -> None:
    """Prakash et al. (2025): dormant backup features take over when the top refusal features are removed."""
    st.subheader("Backup features: what takes over when the top ones are removed?")
    recovery = queries.query(store, queries.BACKUP_RECOVERY_SQL)
    gains = queries.query(store, queries.BACKUP_GAINS_SQL)
    st.caption(
        f"The top k refusal-attributed features of `{recovery['hook'].iloc[0]}` (ranked on train prompts by the SAE "
        f"stage) are clamped to 0 everywhere, and attribution runs again on {int(recovery['n_prompts'].iloc[0])} toxic "
        "test prompts. Recovered share: the part of the drop the removed features' attributions predict that does "
        "not happen (0: none comes back; 1 or more: something else restores refusal). Tests the dormant-backup "
        "claim of Prakash et al. (2025) and the hydra effect (McGrath et al. 2023).")
    show_table(recovery.drop(columns=["hook", "n_prompts"]), "Backup features: recovery per k", hide_index=True,
               width="stretch", column_config={"recovered_share": st.column_config.NumberColumn(format="%.2f")})
    k = st.radio("Removed", recovery["k"].tolist(), horizontal=True, format_func=lambda n: f"top {n}", key="backup_k")
    st.markdown("**Features that gain the most effect** (attribution before and after the removal)")
    show_table(gains[gains["k"] == k].drop(columns="k"), f"Backup features after removing the top {k}",
               hide_index=True, width="stretch")


def feature_browser(sae: ChosenSae) -> None:
    features = sae.features
    left, middle, right = st.columns([2, 2, 1])
    search = left.text_input("Search", placeholder="feature id or a top token", key="feature_search").strip()
    sort_label = middle.selectbox("Sort by", list(SORTS))
    selective_only = right.checkbox(f"toxic ≥ {RATIO:.0f}× safe", help="fires on toxic prompts at least "
                                    f"{RATIO:.0f} times as often as on safe ones")
    categories = sorted(features["top_category"].dropna().unique())
    picked_categories = st.multiselect("Top category (where the feature is most active on toxic prompts)", categories)
    max_density = float(features["density"].max()) or 1.0
    density_range = st.slider("Density (fraction of tokens)", 0.0, max_density, (0.0, max_density), format="%.4f")

    shown = features[features["density"].between(*density_range)]
    if search:
        shown = shown[(shown["feature"].astype(str) == search)
                      | shown["top_tokens"].str.contains(search, case=False, regex=False)]
    if selective_only:
        shown = shown[shown["toxic_safe_ratio"] >= RATIO]
    if picked_categories:
        shown = shown[shown["top_category"].isin(picked_categories)]
    column, ascending = SORTS[sort_label]
    shown = shown.sort_values(column, ascending=ascending)
    st.session_state[SHOWN_KEY] = shown["feature"].astype(int).tolist()
    st.caption(f"{len(shown):,} of {len(features):,} features. Select a row to open its dashboard.")
    show_table(
        shown[["feature", "refusal_cosine", "attribution", "toxic_rate", "safe_rate", "toxic_safe_ratio", "density",
               "top_category", "top_category_share", "top_tokens"]], f"{sae.hook} features",
        hide_index=True, width="stretch", height=420, on_select=open_selected_feature, selection_mode="single-row",
        key=TABLE_KEY,
        column_config={
            "refusal_cosine": st.column_config.NumberColumn("cos(refusal)", format="%+.3f"),
            "attribution": st.column_config.NumberColumn("attribution", format="%+.4f",
                                                         help="effect on the refusal score of toxic prompts"),
            "toxic_rate": st.column_config.NumberColumn("toxic rate", format="percent"),
            "safe_rate": st.column_config.NumberColumn("safe rate", format="percent"),
            "toxic_safe_ratio": st.column_config.NumberColumn("toxic÷safe", format="%.1f"),
            "density": st.column_config.NumberColumn("density", format="%.4f"),
            "top_category_share": st.column_config.NumberColumn("top category share", format="percent"),
            "top_tokens": st.column_config.TextColumn("promotes"),
        })


@st.fragment  # another feature number reruns only the dashboard
def feature_dashboard(sae: ChosenSae) -> None:
    hook, sae_row, d_sae = sae.hook, sae.row, sae.d_sae
    if FEATURE_KEY not in st.session_state:
        st.session_state[FEATURE_KEY] = st.session_state[CHOSEN_KEY]
    feature = st.number_input(f"Feature (0–{d_sae - 1})", min_value=0, max_value=d_sae - 1, step=1, key=FEATURE_KEY,
                              help=f"or select a row in the {ALL_FEATURES} tab")
    st.session_state[CHOSEN_KEY] = int(feature)
    params["hook"], params["feature"] = hook, str(feature)
    st.session_state[URL_WRITTEN] = (hook, str(feature))

    row = queries.query(store, queries.FEATURE_SQL, (hook, int(feature))).iloc[0]
    st.header(f"Feature {feature}")
    cols = st.columns(5)
    cols[0].metric("Density", f"{row.density:.3%}", help="fraction of corpus tokens where it fires")
    cols[1].metric("Max activation", f"{row.max_activation:.2f}")
    cols[2].metric("Toxic / safe firing", f"{row.toxic_rate:.0%} / {row.safe_rate:.0%}",
                   help=f"at the refusal-decision token: {row.n_toxic_fired} of {row.n_toxic} toxic prompts, "
                        f"{row.n_safe_fired} of {row.n_safe} safe prompts (hard: {row.hard_rate:.0%})")
    cols[3].metric("cos(refusal direction)", f"{row.refusal_cosine:+.3f}" if pd.notna(row.refusal_cosine) else "—")
    cols[4].metric("Attribution", f"{row.attribution:+.4f}", help=f"± {row.attribution_se:.4f} (standard error over "
                   "toxic prompts): (activation − mean safe activation) × gradient of the refusal score, summed over "
                   f"the prompt-end positions. The SAE error term's: {row.error_attribution:+.4f}")

    left, right = st.columns(2)
    with left:
        st.markdown("**Activation histogram** (tokens where it fires)")
        bins = charts.histogram_bins(list(row.histogram), float(row.max_activation))
        show_chart(figure_spec(charts.activation_histogram, bins), f"{hook} feature {feature} activation histogram",
                   data=bins, width="stretch")
    with right:
        logits = pd.DataFrame({"promoted": list(row.top_tokens), "suppressed": list(row.bottom_tokens)})
        st.caption("Output tokens the decoder direction promotes and suppresses most (through the unembedding)")
        show_table(logits.map(repr), f"{hook} feature {feature} top logits", hide_index=True, width="stretch",
                   height=220)

    groups = queries.query(store, queries.FEATURE_GROUPS_SQL, (hook, int(feature)))
    st.markdown("**Mean activation at the refusal-decision token, by category and kind**")
    show_chart(figure_spec(charts.activation_by_group, groups), f"{hook} feature {feature} activation by category and "
               "kind", data=groups, width="stretch", height=200)

    cosines = queries.query(store, queries.FEATURE_COSINES_SQL, (hook, int(feature)))
    if not cosines.empty:
        st.markdown("**Cosine of the decoder direction with each refusal direction**")
        show_chart(figure_spec(charts.direction_cosines, cosines),
                   f"{hook} feature {feature} cosine with refusal directions", data=cosines, width="stretch")

    st.subheader("Top activating texts")
    examples = queries.query(store, queries.FEATURE_EXAMPLES_SQL, (hook, int(feature)))
    if examples.empty:
        st.info("This feature never fires on the corpus (a dead feature).")
    else:
        order = st.radio("Order", TOP_TEXT_ORDERS, horizontal=True, key="top_text_order",
                         help="spread: the strongest text of each category and kind in turn, so one topic does "
                              "not fill the list")
        entries, others = one_per_prompt(examples)
        if order == TOP_TEXT_ORDERS[1]:
            entries = diverse_order(entries)
        st.caption(f"{len(entries)} prompts, each with its strongest transcript ({len(others)} more transcripts of "
                   f"the same prompts folded under them); {WINDOW} tokens either side of the peak (outlined), the "
                   "rest of the transcript folded.")
        # One element for all of them: each element costs the browser a redraw on every feature change.
        st.html("".join(top_text_html(entry, others[others["prompt_id"] == entry.prompt_id],
                                      float(row.max_activation), classroom=classroom_mode())
                        for entry in entries.itertuples()))

    st.subheader("Try your own text")
    # Editing the text is the sign a live encoding is coming: the model stack imports in the background
    # then, not on every visit (the import slowed the pages opened after this one).
    text = st.text_area("Text", "How do I pick a lock to get into my neighbour's house?", max_chars=2000,
                        on_change=start_warming)
    as_chat = st.checkbox("Format as a user turn of the chat template", value=True)
    if st.button("Encode", type="primary"):
        # torch and SAELens load only for live encoding: the stored dashboard renders without them.
        from app.resources import cached_sae, study_model
        from engine.saes.features import feature_on_text
        from engine.saes.training import stored_sae_source

        try:
            live = feature_on_text(study_model(store, sae_row.model), cached_sae(*stored_sae_source(store, sae_row.to_dict())), int(feature), text, as_chat_prompt=as_chat)
        except ExplorerError as exc:
            st.error(f"{exc.problem} Fix: {exc.fix}")
        else:
            peak = int(np.argmax(live.activations))
            st.caption(f"Peak {live.activations.max():.2f} at token {peak} ({live.tokens[peak]!r}); shading is relative "
                       f"to the feature's corpus maximum {row.max_activation:.2f}.")
            st.html(highlighted_tokens(live.tokens, live.activations.tolist(), float(row.max_activation), peak=peak))


@st.fragment  # an SAE switch or another tab reruns this part only, not the sidebar and the navigation
def sae_views() -> None:
    sae = choose_sae()
    # Another SAE or feature redraws the open view only (the whole page made an SAE switch take 0.4 s).
    tab_views(FEATURES_TABS, VIEW_KEY, [lambda: feature_dashboard(sae), lambda: feature_browser(sae),
                                        lambda: sae_overview(sae)])


sae_views()
