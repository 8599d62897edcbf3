"""``metrics.csv``: one row per evaluated sample set, written by ``rcdm evaluate``, read by ``rcdm tabulate``.

Columns are :data:`COLUMNS` in order (the first ones are the paper's Table 1 fields); a value that could not
be computed is empty and the ``status`` column says why. ``model_sha256`` is the RCDM checkpoint the samples
came from (older files call it ``checkpoint_sha256``).

Which samples and reference images FID/IS used (:mod:`rcdm.scoring`): ``fid_selection`` /
``reference_selection`` (``all``, ``random``, ``stratified``; ``precomputed`` for reference statistics
read from a file), ``fid_seed`` / ``reference_seed``, ``fid_classes`` / ``reference_classes`` (class labels
covered; empty without labels) and ``fid_rows_sha256`` / ``reference_rows_sha256`` (first 16 hex digits of
the sha256 of the sorted row indices as little-endian int64). Files written before these columns existed
read with them empty.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rcdm.io import atomic_path

COLUMNS = (
    "run_id", "dataset", "encoder", "layer", "sampler", "steps", "n_samples", "n_fid", "n_reference",
    "fid", "is_mean", "is_std", "fd_rep", "mean_rank", "median_rank", "mrr", "top1", "top5", "chance_mrr",
    "precision", "recall", "inception_sha256", "status",
    "n_cond", "samples_per_image", "rank_metric", "eta", "seed", "model_sha256", "samples_file",
    "fid_selection", "fid_seed", "fid_classes", "fid_rows_sha256",
    "reference_selection", "reference_seed", "reference_classes", "reference_rows_sha256",
    "timestamp",
)  # fmt: skip


def write_metrics_csv(path: str | os.PathLike, row: dict[str, Any]) -> Path:
    """Write one metrics row (all :data:`COLUMNS`, empty where None) atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame([row], columns=list(COLUMNS)).to_csv(tmp, index=False, float_format="%.6g")
    return path


REQUIRED = ("run_id", "dataset", "encoder", "layer", "sampler", "steps", "status")


def find_metrics_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """``metrics.csv`` files: given directly, or found recursively under given folders (sorted)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(p.rglob("metrics.csv")))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"metrics input not found: {p}")
    if not found:
        raise FileNotFoundError(f"no metrics.csv found under {', '.join(map(str, inputs))}")
    return found


def read_metrics(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All rows of the given metrics files, one frame with every :data:`COLUMNS` column plus ``source``."""
    frames = []
    for p in paths:
        df = pd.read_csv(p).rename(columns={"checkpoint_sha256": "model_sha256"})
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise ValueError(
                f"{p}: not a metrics.csv of `rcdm evaluate` (missing columns {', '.join(missing)})"
            )
        df = df.reindex(columns=[*COLUMNS, *[c for c in df.columns if c not in COLUMNS]])
        df["source"] = str(p)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
