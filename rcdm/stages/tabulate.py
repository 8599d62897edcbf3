"""Stage ``rcdm tabulate``: every run's ``metrics.csv`` -> result tables shaped like the paper's Table 1.

Writes into the output folder: ``metrics_all.csv`` (every row found, with its source file), ``table1.csv``
(one row per dataset, encoder, layer, sampler and steps; the most recent run wins when several measured the
same thing) and ``table1.md`` (the same, formatted, one section per dataset). Rows are ordered like the
paper: supervised, SimCLR, Barlow Twins, VICReg, DINO; trunk before head; then anything else.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rcdm.errors import InputFileError, reading
from rcdm.formats.metrics_csv import find_metrics_files, read_metrics
from rcdm.io import atomic_path

KEY = ("dataset", "encoder", "layer", "sampler", "steps")
ENCODER_ORDER = ("supervised", "simclr", "barlow", "vicreg", "dino")
LAYER_ORDER = ("trunk", "head")
TABLE_COLUMNS = (
    *KEY, "n_samples", "n_reference", "fid", "is_mean", "is_std", "fd_rep", "mean_rank", "median_rank", "mrr",
    "top1", "top5", "chance_mrr", "precision", "recall", "run_id", "status",
)  # fmt: skip


def _rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
    return values.map(lambda v: order.index(v) if v in order else len(order))


def table1(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per :data:`KEY`: the latest run (by ``timestamp``, then file order), in the paper's order."""
    df = metrics.copy()
    df["_order"] = range(len(df))
    df["_ts"] = pd.to_datetime(df["timestamp"], errors="coerce", utc=True)
    df = df.sort_values(["_ts", "_order"], na_position="first")
    df = df.drop_duplicates(subset=list(KEY), keep="last")
    df["_enc"] = _rank(df["encoder"], ENCODER_ORDER)
    df["_layer"] = _rank(df["layer"], LAYER_ORDER)
    df = df.sort_values(
        ["dataset", "_enc", "encoder", "_layer", "layer", "sampler", "steps"], na_position="last"
    )
    return df[list(TABLE_COLUMNS)].reset_index(drop=True)


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown_row(r: pd.Series) -> dict[str, str]:
    is_cell = "–" if pd.isna(r["is_mean"]) else f"{r['is_mean']:.2f} ± {_fmt(r['is_std'], 2)}"
    return {
        "encoder": _fmt(r["encoder"], 0),
        "layer": _fmt(r["layer"], 0),
        "sampler": _fmt(r["sampler"], 0),
        "steps": _fmt(r["steps"], 0),
        "samples": _fmt(r["n_samples"], 0),
        "FID ↓": _fmt(r["fid"], 2),
        "IS ↑": is_cell,
        "FD_rep ↓": _fmt(r["fd_rep"], 3),
        "mean rank ↓": _fmt(r["mean_rank"], 1),
        "median rank ↓": _fmt(r["median_rank"], 1),
        "MRR ↑": _fmt(r["mrr"], 3),
        "top-1 ↑": _fmt(r["top1"], 3),
        "top-5 ↑": _fmt(r["top5"], 3),
        "chance MRR": _fmt(r["chance_mrr"], 4),
        "notes": "" if r["status"] == "ok" else _fmt(r["status"], 0),
    }


def to_markdown(table: pd.DataFrame) -> str:
    """Table 1 as Markdown: one section per dataset; IS as mean ± std, empty metrics as "–".

    A row's status note (why a metric is empty) becomes a numbered footnote under its section, one per
    distinct note, so long reasons stay out of the table body.
    """
    sections = []
    for dataset, part in table.groupby("dataset", sort=False, dropna=False):
        rows = pd.DataFrame([_markdown_row(r) for _, r in part.iterrows()])
        notes: list[str] = []
        marks = []
        for note in rows["notes"]:
            if note and note not in notes:
                notes.append(note)
            marks.append(f"[{notes.index(note) + 1}]" if note else "")
        rows["notes"] = marks
        title = "(no dataset)" if pd.isna(dataset) else dataset
        text = f"## {title}\n\n{rows.to_markdown(index=False, disable_numparse=True)}\n"
        if notes:
            text += "\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, 1)) + "\n"
        sections.append(text)
    return "# Table 1: realism and faithfulness of RCDM samples\n\n" + "\n".join(sections)


def tabulate(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Merge the metrics files under ``inputs`` into the tables in ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    metrics = read_metrics(find_metrics_files(inputs))
    table = table1(metrics)
    written = {}
    for name, write in (
        ("metrics_all.csv", lambda p: metrics.to_csv(p, index=False)),
        ("table1.csv", lambda p: table.to_csv(p, index=False)),
        ("table1.md", lambda p: Path(p).write_text(to_markdown(table), encoding="utf-8")),
    ):
        with atomic_path(out_dir / name, suffix=Path(name).suffix) as tmp:
            write(tmp)
        written[name] = out_dir / name
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="metrics.csv files, or folders searched for them")
    parser.add_argument("--out-dir", default="results/tables", help="where the tables are written")


#: what to do about a broken metrics.csv
METRICS_FIX = (
    "delete it and rerun its evaluation (Snakemake's evaluate job makes it again; outside Snakemake, "
    "`rcdm evaluate ... --out` that file)"
)


def check_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The metrics files under ``inputs``, each read once: a missing input or an unreadable file (or one
    missing columns) is an :class:`rcdm.errors.InputFileError` naming it."""
    for item in inputs:
        if not Path(item).exists():
            raise InputFileError(item, "not found", "check the path (a metrics.csv or a folder holding some)")
    try:
        files = find_metrics_files(inputs)
    except FileNotFoundError as err:  # folders without any metrics.csv
        raise SystemExit(f"rcdm tabulate: error: {err}; run the evaluations first") from None
    for path in files:
        with reading(path, fix=METRICS_FIX):
            read_metrics([path])
    return files


def run(args: argparse.Namespace) -> int:
    check_inputs(args.inputs)
    for path in tabulate(args.inputs, args.out_dir).values():
        print(path)
    return 0
