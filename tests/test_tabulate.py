import argparse

import numpy as np
import pandas as pd
import pytest

from rcdm.formats.metrics_csv import COLUMNS, write_metrics_csv
from rcdm.stages import tabulate as tab


def _row(**kw):
    base = {c: None for c in COLUMNS}
    base.update(dataset="imagenet", sampler="ddim", steps=25, n_samples=100, status="ok")
    base.update(kw)
    return base


@pytest.fixture
def runs(tmp_path):
    rows = {
        "a/metrics.csv": _row(run_id="dino-head", encoder="dino", layer="head", fid=20.5, is_mean=30.25,
                             is_std=1.5, mrr=0.5, mean_rank=3.0, timestamp="2026-01-02T00:00:00+00:00"),
        "b/metrics.csv": _row(run_id="dino-head-old", encoder="dino", layer="head", fid=99.0,
                             timestamp="2026-01-01T00:00:00+00:00"),
        "c/deep/metrics.csv": _row(run_id="sup", encoder="supervised", layer="trunk", fd_rep=1.25, mrr=0.75,
                                  status="fid, is: Inception weights file pt_inception not found",
                                  timestamp="2026-01-01T00:00:00+00:00"),
        "d/metrics.csv": _row(run_id="simclr-trunk", encoder="simclr", layer="trunk", fid=10.0, top1=0.25,
                             timestamp="2026-01-01T00:00:00+00:00"),
        "e/metrics.csv": _row(run_id="demo", dataset="shapes", encoder="small", layer="trunk",
                             sampler="dpm-solver++", steps=20, fid=5.0,
                             timestamp="2026-01-01T00:00:00+00:00"),
    }  # fmt: skip
    for rel, row in rows.items():
        write_metrics_csv(tmp_path / "runs" / rel, row)
    return tmp_path


def test_round_trip_latest_run_wins_and_paper_order(runs):
    written = tab.tabulate([runs / "runs"], runs / "tables")
    assert set(written) == {"metrics_all.csv", "table1.csv", "table1.md"}
    all_rows = pd.read_csv(written["metrics_all.csv"])
    assert len(all_rows) == 5 and "source" in all_rows.columns
    t = pd.read_csv(written["table1.csv"])
    assert list(t.columns) == list(tab.TABLE_COLUMNS)
    assert list(zip(t["dataset"], t["encoder"], t["layer"])) == [
        ("imagenet", "supervised", "trunk"),
        ("imagenet", "simclr", "trunk"),
        ("imagenet", "dino", "head"),
        ("shapes", "small", "trunk"),
    ]
    dino = t[t["encoder"] == "dino"].iloc[0]
    assert dino["run_id"] == "dino-head" and dino["fid"] == 20.5 and dino["is_mean"] == 30.25  # newest run
    sup = t[t["encoder"] == "supervised"].iloc[0]
    assert np.isnan(sup["fid"]) and sup["fd_rep"] == 1.25 and sup["status"].startswith("fid, is:")
    md = written["table1.md"].read_text(encoding="utf-8")
    assert "## imagenet" in md and "## shapes" in md
    assert "30.25 ± 1.50" in md and "20.50" in md and "0.500" in md
    assert "99.00" not in md  # the superseded run is not in Table 1
    assert "Inception weights file pt_inception not found" in md  # why a cell is empty ...
    sup_line = next(line for line in md.splitlines() if "| supervised" in line)
    assert sup_line.split("|")[-2].strip() == "[1]" and "Inception" not in sup_line  # ... as a footnote
    assert "\n[1] fid, is: Inception weights file pt_inception not found\n" in md
    dino_line = next(line for line in md.splitlines() if "| dino" in line)
    assert "–" in dino_line  # FD_rep of that run is empty, shown as a dash, not a number


def test_cli_and_bad_inputs(runs, tmp_path):
    parser = argparse.ArgumentParser()
    tab.add_arguments(parser)
    single = runs / "runs" / "a" / "metrics.csv"
    assert tab.run(parser.parse_args([str(single), "--out-dir", str(tmp_path / "t")])) == 0
    assert len(pd.read_csv(tmp_path / "t" / "table1.csv")) == 1
    with pytest.raises(FileNotFoundError, match="metrics input not found"):
        tab.tabulate([tmp_path / "nope"], tmp_path / "t2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.csv found"):
        tab.tabulate([tmp_path / "empty"], tmp_path / "t2")
    bad = tmp_path / "bad" / "metrics.csv"
    bad.parent.mkdir()
    pd.DataFrame({"fid": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="missing columns run_id, dataset"):
        tab.tabulate([bad], tmp_path / "t2")
    assert not (tmp_path / "t2").exists() or not any((tmp_path / "t2").iterdir())


def test_one_footnote_per_distinct_note(tmp_path):
    note_a, note_b = "fid, is: no Inception file", "fd_rep: no encoder checkpoint"
    for i, (enc, note) in enumerate([("a", note_a), ("b", note_b), ("c", note_a), ("d", "ok")]):
        row = _row(run_id=enc, encoder=enc, layer="trunk", status=note)
        write_metrics_csv(tmp_path / "m" / f"{i}.csv", row)
    md = tab.tabulate(sorted((tmp_path / "m").glob("*.csv")), tmp_path / "t")["table1.md"].read_text()
    lines = md.splitlines()
    marks = {
        enc: next(x for x in lines if x.startswith(f"| {enc} ")).split("|")[-2].strip() for enc in "abcd"
    }
    assert marks == {"a": "[1]", "b": "[2]", "c": "[1]", "d": ""}
    assert md.count(note_a) == 1 and md.count(note_b) == 1
    assert f"[1] {note_a}" in lines and f"[2] {note_b}" in lines
