"""The jaxtyping shapes in engine signatures are real annotations: checked with jaxtyping's own
isinstance (dimension names shared across one call), real calls conform and a call whose shapes
disagree with the signature is caught."""

import inspect
from typing import get_type_hints

import numpy as np
from jaxtyping import jaxtyped

from engine.directions.extraction import cosine_matrix, mean_difference, unit
from engine.runtime.scoring import kl_divergence


def _conforms(function, *args) -> bool:
    """Whether the arguments and the result match `function`'s annotated shapes in one call."""
    hints = get_type_hints(function, include_extras=True)
    names = list(inspect.signature(function).parameters)
    with jaxtyped("context"):  # one memo: a dimension named twice must have one size
        if not all(isinstance(arg, hints[name]) for name, arg in zip(names, args, strict=False)):
            return False
        return isinstance(function(*args), hints["return"])


def test_documented_shapes_hold_on_real_calls() -> None:
    rng = np.random.default_rng(0)
    harmful = np.array([True, True, True, False, False, False])
    assert _conforms(mean_difference, rng.normal(size=(6, 2, 3)), harmful, ~harmful)
    assert _conforms(cosine_matrix, rng.normal(size=(4, 8)))
    assert _conforms(unit, rng.normal(size=(5, 8)))
    logp = np.log(np.full((3, 10), 0.1))
    assert _conforms(kl_divergence, logp, logp)


def test_a_call_against_the_documented_shape_is_caught() -> None:
    logp = np.log(np.full((3, 10), 0.1))
    assert not _conforms(kl_divergence, logp, np.log(np.full((3, 5), 0.2)))  # vocabularies differ
    assert not _conforms(mean_difference, np.zeros((6, 4)), np.ones(5, bool), np.ones(5, bool))  # n differs
    assert not _conforms(cosine_matrix, np.zeros(4))  # one vector, not [k, d]
