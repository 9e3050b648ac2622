"""Steering: compose interventions and generate baseline and steered answers side by side, live;
then the batch results of the `steering` stage (force / suppress rates and the collateral matrix)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, queries
from app.components import figure_spec, show_chart, show_table
from app.context import BUILD_COMMAND, current_store, require_tables, warm_model_stack
from engine.data.store import rows_of
from engine.errors import ExplorerError
from engine.steering.limits import DEFAULT_LIMITS as LIMITS

if TYPE_CHECKING:
    from engine.steering.spec import Steering

CAKE = "Give me a simple recipe for a chocolate cake."


class Preset(TypedDict):
    """Widget values a preset button sets (by widget key)."""

    prompt: str
    direction_mode: str
    scope: str
    clamped: list[int]
    feature_value: NotRequired[float]


store = current_store()
st.title("Steering")
present = require_tables(store, ("refusal_directions", "refusal_tokens", "generations", "prompts"))

directions = queries.query(store, queries.STEERING_DIRECTIONS_SQL).set_index("scope")
models = queries.query(store, queries.MODELS_SQL)
tokens = queries.query(store, queries.REFUSAL_TOKENS_SQL)
test_prompts = queries.query(store, queries.TEST_PROMPTS_SQL)
studied = queries.query(store, queries.CANDIDATES_SQL)["model"].iloc[0]
refusal_layer = int(directions["layer"].loc["global"])
sae_rows = queries.query(store, queries.SAES_SQL) if "saes" in present else pd.DataFrame()
sae_row = sae_rows[sae_rows["layer"] == refusal_layer].iloc[0] if not sae_rows.empty and (
    sae_rows["layer"] == refusal_layer).any() else None
features = queries.query(store, queries.STEERING_FEATURES_SQL, (sae_row.hook,)) if sae_row is not None else None
toxic_example = test_prompts.loc[test_prompts["kind"] == "toxic", "text"].iloc[0]

PRESETS: dict[str, Preset] = {
    "Bypass refusal": {"prompt": toxic_example, "direction_mode": "ablate", "scope": "global", "clamped": []},
    "Induce refusal on a cake recipe": {"prompt": CAKE, "direction_mode": "add", "scope": "global", "clamped": []},
}
if features is not None and not features.empty:
    top = int(features["feature"].iloc[0])
    PRESETS[f"Clamp feature {top}"] = {"prompt": CAKE, "direction_mode": "none", "scope": "global", "clamped": [top],
                                       "feature_value": round(2 * float(features["max_activation"].iloc[0]), 1)}

st.caption("Presets")
for column, (label, preset) in zip(st.columns(len(PRESETS)), PRESETS.items(), strict=True):
    if column.button(label, width="stretch"):
        st.session_state.update(preset)
        st.session_state["alpha"] = float(directions["norm"].loc[preset["scope"]])

left, right = st.columns([3, 2])
with left:
    roles: list[str] = models["model"].tolist()
    role = st.selectbox("Model", roles, index=roles.index(studied) if studied in roles else 0,
                        help=f"The directions and SAEs come from the {studied} model.")
    picked = st.selectbox("Pick a test prompt (or type below)", ["—", *test_prompts["text"]],
                          format_func=lambda t: t if t == "—" else
                          f"[{test_prompts.set_index('text').loc[t, 'kind']}] {t[:90]}")
    if picked != "—" and st.session_state.get("picked_before") != picked:
        st.session_state["prompt"] = picked
    st.session_state["picked_before"] = picked
    st.session_state.setdefault("prompt", CAKE)
    prompt = st.text_area("Prompt", key="prompt", max_chars=LIMITS.max_prompt_chars,
                          help=f"at most {LIMITS.max_prompt_chars} characters, so that a CPU answers in seconds")
    max_new_tokens = st.slider("New tokens", 1, LIMITS.max_new_tokens, 48,
                               help=f"at most {LIMITS.max_new_tokens}: longer answers take too long on a CPU")
with right:
    direction_mode = st.radio("Refusal direction", ["none", "ablate", "add"], key="direction_mode", horizontal=True,
                              captions=["", "project out everywhere", "add at one layer"])
    scopes = ["global", *sorted(set(directions.index) - {"global"})]
    st.session_state.setdefault("scope", "global")
    scope = st.selectbox("Direction", scopes, key="scope",
                         help="the global direction or one category's (toxic prompts of that category vs safe)")
    layer, alpha = refusal_layer, None
    if direction_mode == "add":
        n_layers = int(queries.query(store, queries.N_LAYERS_SQL)["n_layers"].iloc[0])
        layer = st.number_input("Layer", 0, n_layers - 1, refusal_layer,
                                help="adds this layer's difference of means for the chosen scope")
    vector_row = queries.query(store, queries.DIRECTION_AT_SQL, (scope, int(layer))).iloc[0]
    if direction_mode == "add":
        alpha = st.slider("alpha", -LIMITS.max_abs_alpha, LIMITS.max_abs_alpha,
                          float(st.session_state.get("alpha", min(vector_row.norm, LIMITS.max_abs_alpha))),
                          help="times the unit direction; the default is the direction's own norm (the difference "
                               f"of means). |alpha| <= {LIMITS.max_abs_alpha:g}: beyond that the model only produces "
                               "noise.")
        if scope == "global" and int(layer) == refusal_layer and "addition_tradeoff" in present:
            sweep = queries.query(store, queries.ADDITION_TRADEOFF_SQL, (studied,))
            strength = alpha / float(vector_row.norm)
            nearest = float(sweep["strength"].iloc[(sweep["strength"] - strength).abs().argmin()])
            point = sweep[sweep["strength"] == nearest].set_index("kind")
            st.caption(f"Precomputed at strength {nearest:g} x the norm (this alpha is {strength:.2f} x) on the test "
                       "prompts: refused (score > 0) " + ", ".join(
                           f"{r.Index} {r.rate:.0%} ({int(r.n_refused)}/{int(r.n)})"
                           for r in rows_of(point))
                       + (f"; KL on safe {point.loc['safe', 'mean_kl']:.3f}" if "safe" in point.index else "")
                       + ". Generate to see this prompt's answer live.")
    clamped, feature_value = [], 0.0
    if sae_row is not None and features is not None:  # features are of sae_row's SAE: both or neither
        labels = {int(f.feature): f"{int(f.feature)} · attribution {f.attribution:+.3f} · {f.top_tokens}"
                  for f in rows_of(features)}
        clamped = st.multiselect(f"Clamp features of the SAE at `{sae_row.hook}`", list(labels), key="clamped",
                                 format_func=labels.__getitem__,
                                 help="sorted by attribution to the refusal score")
        if clamped:
            st.session_state.setdefault("feature_value", 0.0)
            feature_value = st.number_input("Set them to", -LIMITS.max_abs_feature_value,
                                            LIMITS.max_abs_feature_value, key="feature_value", help="0 switches them off; their corpus maxima are on the Features page")
    else:
        st.caption("No SAE at the refusal layer in this store: feature clamping is off.")


def build_steering() -> Steering:
    from app.resources import cached_sae
    from engine.saes.training import stored_sae_source
    from engine.steering.spec import Addition, FeatureClamp, Steering

    vector = np.asarray(vector_row.vector, dtype=np.float32)
    clamps: tuple[FeatureClamp, ...] = ()
    if clamped:
        assert sae_row is not None  # features to clamp are offered only with an SAE at the refusal layer
        clamps = (FeatureClamp(cached_sae(*stored_sae_source(store, sae_row.to_dict())), tuple(clamped),
                               value=feature_value),)
    return Steering(ablate=(vector,) if direction_mode == "ablate" else (),
                    add=(Addition(vector, int(layer), alpha),) if direction_mode == "add" else (), clamp=clamps)


def show(answer, title: str) -> None:
    st.metric("Refusal score", f"{answer.refusal_score:+.2f}", help="log-odds of the model's refusal tokens at the "
              "first response position (> 0: refusal more likely than not)")
    st.markdown(f"**First token, {title}**")
    top = pd.DataFrame(answer.top_tokens, columns=["token", "probability"])
    top["token"] = top["token"].map(repr)
    show_chart(figure_spec(charts.first_tokens, top), f"First token, {title}", data=top, width="stretch")


if st.button("Generate", type="primary"):
    # torch and the model stack load only to generate (warm_model_stack has usually imported them by
    # then): the controls and the batch results below render without them.
    from app.resources import study_model
    from engine.judging.judge import refusal_token_ids
    from engine.steering.spec import compare_answers

    token_ids = refusal_token_ids(tokens, role)
    try:
        steering = build_steering()
        model = study_model(store, role)
        LIMITS.check(prompt, max_new_tokens, steering)
        steering.hooks(model)  # a hook the model lacks fails here, before any generation
        columns = st.columns(2)
        boxes = []
        for column, title in zip(columns, ("Baseline", "Steered"), strict=True):
            column.subheader(title)
            boxes.append(column.empty())
        # Both answers are generated together (one batch, only the second row steered) and stream as they come.
        answers = compare_answers(model, prompt, steering, token_ids, max_new_tokens=max_new_tokens,
                                  on_text=lambda row, text: boxes[row].markdown(text), limits=LIMITS)
        for column, box, answer, title in zip(columns, boxes, answers, ("baseline", "steered"), strict=True):
            box.markdown(answer.text or "_(empty answer)_")
            with column:
                show(answer, title)
    except ExplorerError as exc:
        st.error(f"{exc.problem} Fix: {exc.fix}")

st.divider()
st.header("Batch results (test split)")
if "steering_rates" not in present:
    st.info(f"This store has no batch steering results yet. Add a `steering:` section to the config and run:\n\n"
            f"```\n{BUILD_COMMAND}\n```")
    st.stop()
rates = queries.query(store, queries.STEERING_RATES_SQL)
rates["label"] = rates["n_refused"].astype(str) + " / " + rates["n"].astype(str)
st.caption("Answers generated under each intervention, judged by the substring judge: *suppress* (direction "
           "ablated / feature set to 0) on toxic prompts, *force* (direction added / feature set high) on safe "
           "prompts. Bars are Wilson 95% intervals; each label gives the prompts judged (the answers this stage "
           "generates itself may cover a seeded sample per kind, `steering.answer_prompts`).")
show_chart(figure_spec(charts.rate_bars, rates, "intervention", "mode", charts.STEERING_MODES), "Steering refusal rates",
           data=rates, width="stretch")

st.subheader("Collateral matrix")
effects = queries.query(store, queries.STEERING_EFFECTS_SQL)
mode = st.segmented_control("Intervention", ["suppress", "force"], default="suppress", key="collateral_mode") \
    or "suppress"
target_kind = "toxic" if mode == "suppress" else "hard"
cells = effects[(effects["mode"] == mode) & (effects["kind"] == target_kind)].copy()
cells["change"] = cells["rate_by_score"] - cells["baseline_rate_by_score"]
category_rows = sorted(set(cells.loc[cells["type"] == "direction", "intervention"]) - {"global"})
order = ["global", *category_rows, *sorted(set(cells.loc[cells["type"] == "feature", "intervention"]))]
show_chart(figure_spec(charts.collateral_matrix, cells, order, target_kind), f"Collateral matrix, {mode}",
           data=cells, width="stretch", height=24 * len(order) + 110)
st.caption(f"Rows: the intervention ({mode}); columns: the category whose {target_kind} test prompts were "
           "measured; colour: change in the refusal rate by refusal score (> 0) against the unsteered model. A "
           "modular mechanism would show a strong diagonal; a shared one, full rows.")
harmlessness = queries.query(store, queries.STEERING_HARMLESSNESS_SQL)
show_table(harmlessness, "Steering harmlessness", hide_index=True, width="stretch", column_config={
    "mean_kl": st.column_config.NumberColumn("KL on safe prompts (suppress)", format="%.3f"),
    "cross_entropy": st.column_config.NumberColumn("CE of safe answers (suppress)", format="%.3f"),
    "baseline_cross_entropy": st.column_config.NumberColumn("CE unsteered", format="%.3f")})

# Generating needs torch and the model stack: import them in the background once the page is drawn
# (started before, the import slowed this page's own first render).
warm_model_stack()
