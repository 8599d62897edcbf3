"""Seeded subsets of a labelled set: a random draw stratified by class, never "the first N".

Class-per-folder datasets (ImageNet) are stored sorted by class, so the first N images cover a few classes
only. :func:`stratified_draw` gives every class a share proportional to its size (largest remainders, ties
broken at random) and orders the result round-robin over the classes, so consecutive images (the pairs of
the interpolation and manipulation studies) come from different classes whenever there are several.
"""

from __future__ import annotations

import numpy as np


def stratified_quotas(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` draws each class of ``counts`` members gets: ``floor(n * c / N)`` plus one for the
    classes with the largest remainders (ties in random order), never more than the class holds."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    n = min(int(n), total)
    quota = n * counts // total
    remainder = n * counts % total  # exact integers: equal classes tie exactly, and ties go at random
    order = np.lexsort((rng.random(len(counts)), -remainder))
    quota[order[: n - int(quota.sum())]] += 1
    return quota


def stratified_draw(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, len(labels))`` distinct positions drawn at random (seeded), stratified by ``labels``.

    Each label value (``-1``, "unlabelled", is a stratum like any other; an unlabelled set is a plain random
    draw) gets its proportional share (:func:`stratified_quotas`); members are drawn uniformly within their
    class. The result is ordered round-robin over the classes, visited in a random order: the first member of
    every class that has one, then the second, and so on.
    """
    labels = np.asarray(labels).reshape(-1)
    if n < 1:
        raise ValueError(f"the number of images to draw must be positive, got {n}")
    if len(labels) == 0:
        raise ValueError("cannot draw from an empty set")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = stratified_quotas(counts, n, rng)
    picks = [
        rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False) if q else np.empty(0, np.int64)
        for c, q in enumerate(quota)
    ]
    visit = rng.permutation(len(classes))
    out = [int(picks[c][r]) for r in range(int(quota.max())) for c in visit if r < quota[c]]
    return np.asarray(out, dtype=np.int64)
