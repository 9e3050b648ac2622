"""Statistics shared by the pipeline and the app, on numpy alone.

Not statsmodels or scipy: importing them pulls in scipy.stats, seconds of the app's first page load.
The Wilson interval is statsmodels' to the last bit instead (tests/test_schema.py compares them).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# scipy.stats.norm.isf(0.025), the critical value statsmodels computes; the standard library's
# NormalDist().inv_cdf(0.975) differs in the last digits, which would change stored intervals.
Z_95 = 1.9599639845400545


def wilson_interval(refused: npt.ArrayLike, n: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score 95% interval of `refused` of `n` (scalars or arrays; NaN where n is 0), computed
    in the order statsmodels' proportion_confint(method="wilson") computes it, so equal to it exactly."""
    refused, n = np.asarray(refused), np.asarray(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = refused / n
        z2 = Z_95**2
        denominator = 1 + z2 / n
        centre = (share + z2 / (2 * n)) / denominator
        half = Z_95 * np.sqrt(share * (1.0 - share) / n + z2 / (4.0 * n**2)) / denominator
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def cohen_kappa(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cohen's kappa of two raters' binary labels: (observed - chance agreement) / (1 - chance);
    NaN when chance agreement is 1 (both raters give one label throughout), as statsmodels gives."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if not len(a):
        return float("nan")
    observed = np.mean(a == b)
    chance = np.mean(a) * np.mean(b) + np.mean(~a) * np.mean(~b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float((observed - chance) / (1 - chance)) if chance < 1 else float("nan")
