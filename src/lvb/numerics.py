"""Numbers shared by every stage: how close two outputs are (bf16 bit patterns: lvb.dtypes).

Depends on numpy alone, so the lean runtime, the exporter, the compiler and
the checks can all use it without importing each other.
"""

from __future__ import annotations

import numpy as np


def lowest(values) -> float:
    """The least of `values`, or NaN when any is NaN: Python's min() answers by the order
    (min([1.0, nan]) is 1.0), and a NaN must never hide behind a good number."""
    values = _floats(values)
    return float("nan") if np.isnan(values).any() else float(values.min())


def highest(values) -> float:
    """The greatest of `values`, or NaN when any is NaN (see lowest)."""
    values = _floats(values)
    return float("nan") if np.isnan(values).any() else float(values.max())


def _floats(values) -> np.ndarray:
    """Numbers (an array, a list, a generator) as one float64 array, without a Python loop over an array."""
    return np.asarray(values if isinstance(values, np.ndarray) else list(values), np.float64).ravel()


def reaches(value: float, need: float) -> bool:
    """Whether a measured closeness meets its threshold; NaN never does. Every threshold
    test is written `reaches(...)` or `not reaches(...)`, never `value < need`, which a
    NaN passes."""
    return bool(value >= need)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """NaN when either side holds a NaN or an infinity: a net that produced one fails every check."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def compare(reference: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Worst cosine and largest error over a net's outputs, relative to the reference's scale."""
    cosines, errors, relative = [], [], []
    for ref, out in zip(reference, got):
        ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        cosines.append(cosine(out, ref))
        error = highest(np.abs(out - ref).ravel()) if ref.size else 0.0  # NaN if either holds one
        errors.append(error)
        relative.append(error / max(1.0, highest(np.abs(ref).ravel()) if ref.size else 1.0))
    return {"cosine": lowest(cosines), "max_abs_err": highest(errors), "max_rel_err": highest(relative), "cosines": cosines}


def same_tokens(reference: np.ndarray, got: np.ndarray) -> dict:
    """A net whose output is a token id is right or wrong; said in compare()'s terms."""
    same = bool(np.array_equal(np.asarray(got).ravel(), np.asarray(reference).ravel()))
    return {"cosine": float(same), "max_abs_err": 0.0 if same else 1.0, "max_rel_err": 0.0 if same else 1.0,
            "cosines": [float(same)]}
