"""Smoke run of benchmarks/vs_published.py (issue 16): a tiny model, one round, seconds.

Checks what must hold whatever the machine's speed: the published code and ours draw equal samples from the
same weights, x_T and per-step noise, and the CSV / Markdown / JSON are written with the documented columns.
Never a timing assertion. Skipped when the published package is not beside the repository.
"""

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = Path(os.environ.get("RCDM_PUBLISHED", REPO.parent / "shared" / "reference" / "published_rcdm"))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("vs_published", REPO / "benchmarks" / "vs_published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vp = _load_benchmark()


def test_rcdm_package_never_imports_the_published_code():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "rcdm").rglob("*.py")
        if "guided_diffusion" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_equal_quality_rule():
    ref = {"fd_rep": [1.0, 1.2, 1.1], "mrr": [0.80, 0.84, 0.82]}  # spreads: FD 0.2, MRR 0.04
    assert vp.is_equal(ref, {"fd_rep": [1.25], "mrr": [0.79]})  # worse, but within one spread of the mean
    assert vp.is_equal(ref, {"fd_rep": [0.5], "mrr": [0.95]})  # better counts as equal
    assert not vp.is_equal(ref, {"fd_rep": [1.35], "mrr": [0.82]})  # FD_rep beyond mean + spread
    assert not vp.is_equal(ref, {"fd_rep": [1.1], "mrr": [0.77]})  # MRR beyond mean - spread


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # in the published code
@pytest.mark.skipif(
    not (PUBLISHED / "guided_diffusion_rcdm").is_dir(), reason=f"published code not at {PUBLISHED}"
)
def test_smoke_run_same_samples_and_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the published logger must not write into the repository
    out = tmp_path / "out"
    argv = [
        "--smoke",
        "--published",
        str(PUBLISHED),
        "--parts",
        "same_maths,training,eval128",
        "--out",
        str(out),
    ]
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
        assert vp.main(argv) == 0
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        sys.modules.pop("blobfile", None)

    with open(out / "vs_published.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == vp.COLUMNS
        rows = list(reader)
    parts = [r["part"] for r in rows]
    assert parts.count("same maths") == 5  # DDPM and DDIM, per image and per evaluation; the forward alone
    assert parts.count("training") == 2 and parts.count("eval128") == 2
    for r in rows:
        assert float(r["ratio"]) > 0 and float(r["ratio_min"]) <= float(r["ratio"]) <= float(r["ratio_max"])
        assert r["rounds"] == "1"
    sampling = [r for r in rows if r["part"] == "same maths" and "per image" in r["case"]]
    assert {r["case"].split(",")[0] for r in sampling} == {"DDPM-10", "DDIM-5"}
    assert all(r["check"].startswith("samples equal") for r in sampling)

    doc = json.loads((out / "vs_published.json").read_text())
    equal = [r["equal_samples"] for r in doc["rows"] if "equal_samples" in r]
    assert equal == [True] * 4
    assert {"cpu", "threads", "torch", "load_before", "load_after"} <= set(doc["runs"][0])

    md = (out / "vs_published.md").read_text().splitlines()
    assert vp.MD_HEADER in md
    table = [line for line in md if line.startswith("| ") and line != vp.MD_HEADER and "---" not in line]
    assert len(table) == len(rows)
    assert all(line.count(" | ") == vp.MD_HEADER.count(" | ") for line in table)
