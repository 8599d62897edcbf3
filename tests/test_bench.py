"""``rcdm bench`` output files on a tiny model (no timing assertions: only columns and sane numbers)."""

import csv
import json

import numpy as np
import pytest
import torch

from rcdm.cli import main
from rcdm.stages.bench import CSV_COLUMNS, PRESETS, Variant, flags_from_spec, variants

TINY = (
    '{"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4", '
    '"num_res_blocks": 1, "num_heads": 1, "learn_sigma": true, "ssl_dim": 8}'
)


def test_bench_writes_csv_and_json_with_positive_numbers(tmp_path):
    argv = ["bench", "--flags", TINY, "--samplers", "ddim:2,dpm-solver++:2,ddpm:2", "--batch-size", "2",
            "--repeats", "2", "--warmup", "1", "--channels-last", "--rounds", "2", "--out", str(tmp_path),
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
        assert int(row["repeats"]) == 4  # 2 repeats x 2 round-robin rounds, pooled
        assert float(row["images_per_s"]) == pytest.approx(int(row["batch_size"]) / float(row["median_s"]))
        if row["variant"] == "fp32_eager":
            assert float(row["speedup_vs_fp32_eager"]) == 1.0
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert len(meta["rows"]) == 8 and meta["flags"]["image_size"] == 8
    for row in meta["rows"]:
        assert len(row["times"]) == 4 and row["median_s"] == pytest.approx(float(np.median(row["times"])))
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


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_stage_benchmark_and_option_ratios(tmp_path):
    argv = ["bench", "--flags", TINY, "--benchmarks", "sample,update,data,extract,evaluate",
            "--samplers", "ddim:2", "--batch-sizes", "1,3", "--batch-size", "3", "--repeats", "1",
            "--warmup", "1", "--attention-einsum", "--cuda-graph", "--workers", "1", "--data-images", "12",
            "--data-steps", "2", "--extract-images", "4", "--native-size", "40", "--eval-images", "4",
            "--inception-random", "--out", str(tmp_path), "--name", "all"]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="cuda_graph=True needs a CUDA device"):
        assert main(argv) == 0
    rows = _rows(tmp_path / "all.csv")
    by = {(r["benchmark"], r["variant"], r["option"]): r for r in rows}
    # the UNet variants run for sampling; the other stages run once (baseline)
    variants_seen = {r["variant"] for r in rows if r["benchmark"] == "sample"}
    assert variants_seen == {"fp32_eager", "fp32+cuda_graph", "fp32+attn_einsum"}
    assert {r["variant"] for r in rows if r["benchmark"] != "sample"} == {"fp32_eager"}
    assert {r["option"] for r in rows if r["benchmark"] == "update"} >= {
        "adamw=for-loop", "adamw=foreach", "ema=per-tensor", "ema=foreach"
    }  # fmt: skip
    assert set(by) >= {("data", "fp32_eager", "workers=0"), ("data", "fp32_eager", "workers=1,prefetch=4"),
                       ("extract", "fp32_eager", "workers=0"), ("extract", "fp32_eager", "workers=1"),
                       ("evaluate", "fp32_eager", "inception=random")}  # fmt: skip
    for row in rows:
        assert float(row["images_per_s"]) == pytest.approx(int(row["images"]) / float(row["median_s"]))
        assert float(row["peak_mem_mb"]) > 0 and float(row["speedup_vs_fp32_eager"]) > 0
        if row["plain_option"]:
            plain = by[(row["benchmark"], row["variant"], row["plain_option"])]
            if row["benchmark"] == "sample":  # plain of the same sampler case
                plain = next(r for r in rows if r["variant"] == row["variant"] and r["option"] == "batch=1"
                             and r["sampler"] == row["sampler"])  # fmt: skip
            ratio = float(row["images_per_s"]) / float(plain["images_per_s"])
            assert float(row["speedup_vs_plain"]) == pytest.approx(ratio)
    assert {int(r["images"]) for r in rows if r["benchmark"] == "extract"} == {4}
    assert {int(r["images"]) for r in rows if r["benchmark"] == "data"} == {6}  # 2 steps x batch 3
    ratio = by[("sample", "fp32+attn_einsum", "batch=3")]
    base = by[("sample", "fp32_eager", "batch=3")]
    expect = float(ratio["images_per_s"]) / float(base["images_per_s"])
    assert float(ratio["speedup_vs_fp32_eager"]) == pytest.approx(expect)


def _tiny_model():
    from rcdm.factory import create_model_and_diffusion

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**json.loads(TINY))
    for p in model.parameters():  # zero-initialised output layers would hide attention differences
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval(), diffusion


def test_einsum_attention_backend_equals_sdpa():
    from rcdm.unet import attention_backend, set_attention_backend

    model, _ = _tiny_model()
    x, t, feat = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 8)
    with torch.inference_mode():
        fast = model(x, t, feat)
        with attention_backend("einsum"):
            ref = model(x, t, feat)
        again = model(x, t, feat)
    torch.testing.assert_close(ref, fast, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, fast)  # the context manager restored SDPA
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        set_attention_backend("flash")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_cuda_graph_option_falls_back_to_eager_on_cpu(sampler):
    from rcdm.samplers import sample

    model, diffusion = _tiny_model()
    noise, feat = torch.randn(2, 3, 8, 8), torch.randn(2, 8)
    kw = dict(sampler=sampler, steps=3, noise=noise, model_kwargs={"feat": feat},
              generators=[torch.Generator().manual_seed(i) for i in range(2)])  # fmt: skip
    eager = sample(model, diffusion, noise.shape, **kw)
    kw["generators"] = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        graphed = sample(model, diffusion, noise.shape, cuda_graph=True, **kw)
    assert torch.equal(graphed, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (none here)")
@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "ddpm"])
def test_cuda_graph_sampling_equals_eager_on_gpu(sampler):
    from rcdm.samplers import CudaGraphModel, sample

    model, diffusion = _tiny_model()
    model = model.cuda()
    noise, feat = torch.randn(3, 3, 8, 8, device="cuda"), torch.randn(3, 8, device="cuda")

    def gens():
        return [torch.Generator(device="cuda").manual_seed(i) for i in range(3)]

    kw = dict(sampler=sampler, steps=4, noise=noise, model_kwargs={"feat": feat})
    eager = sample(model, diffusion, noise.shape, generators=gens(), **kw)
    graphed = sample(model, diffusion, noise.shape, generators=gens(), cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    wrapper = CudaGraphModel(model)
    t = torch.tensor([5, 6, 7], device="cuda")
    with torch.inference_mode():
        first = wrapper(noise, t, feat=feat)
        second = wrapper(noise * 0.5, t, feat=feat)  # replay with new inputs, same graph
        torch.testing.assert_close(second, model(noise * 0.5, t, feat), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(first, model(noise, t, feat), rtol=1e-4, atol=1e-4)
    assert len(wrapper.graphs) == 1
