"""``rcdm bench`` output files on a tiny model (no timing assertions: only columns and sane numbers)."""

import csv
import json

import pytest

from rcdm.bench import CSV_COLUMNS, PRESETS, Variant, flags_from_spec, variants
from rcdm.cli import main

TINY = (
    '{"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4", '
    '"num_res_blocks": 1, "num_heads": 1, "learn_sigma": true, "ssl_dim": 8}'
)


def test_bench_writes_csv_and_json_with_positive_numbers(tmp_path):
    argv = ["bench", "--flags", TINY, "--samplers", "ddim:2,dpm-solver++:2,ddpm:2", "--batch-size", "2",
            "--repeats", "2", "--warmup", "1", "--channels-last", "--out", str(tmp_path),
            "--name", "tiny"]  # fmt: skip
    assert main(argv) == 0
    with open(tmp_path / "tiny.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    # 2 variants (fp32 eager, channels_last) x (3 sampler rows + 1 train row)
    assert len(rows) == 8
    assert {r["variant"] for r in rows} == {"fp32_eager", "fp32+channels_last"}
    cases = {(r["sampler"], r["steps"]) for r in rows if r["benchmark"] == "sample"}
    assert cases == {("ddim", "2"), ("dpm-solver++", "2"), ("ddpm", "2")}
    for row in rows:
        for key in ("median_s", "min_s", "images_per_s", "speedup_vs_fp32_eager", "peak_mem_mb"):
            assert float(row[key]) > 0, (key, row)
        assert float(row["min_s"]) <= float(row["median_s"]) <= float(row["max_s"])
        assert float(row["images_per_s"]) == pytest.approx(int(row["batch_size"]) / float(row["median_s"]))
        if row["variant"] == "fp32_eager":
            assert float(row["speedup_vs_fp32_eager"]) == 1.0
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert len(meta["rows"]) == 8 and meta["flags"]["image_size"] == 8
    assert meta["environment"]["device"] == "cpu"


def test_variants_and_flags():
    assert variants(["fp32"], False, False) == [Variant()]
    both = variants(["fp32", "bf16"], True, False)
    assert [v.name for v in both] == ["fp32_eager", "bf16", "fp32+channels_last", "bf16+channels_last"]
    assert flags_from_spec("128") == PRESETS["128"]
    assert flags_from_spec('{"image_size": 8}') == {"image_size": 8}
    with pytest.raises(ValueError, match="not a preset"):
        flags_from_spec("huge")


def test_bad_sampler_spec_is_named(tmp_path):
    with pytest.raises(ValueError, match="bad --samplers item 'euler:5'"):
        main(
            [
                "bench",
                "--flags",
                TINY,
                "--samplers",
                "euler:5",
                "--benchmarks",
                "sample",
                "--out",
                str(tmp_path),
            ]
        )
