"""``rcdm tradeoff`` on a tiny random model and tiny data: outputs, computed values, resume, choice."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm.cli import main
from rcdm.encoders import load
from rcdm.factory import create_model_from_flags
from rcdm.formats import hdf5
from rcdm.preprocess import center_crop_arr, encoder_input
from rcdm.stages.tradeoff import COLUMNS, recommend

ENCODER = "rcdm.stages.bench:random_small_encoder"
FLAGS = {"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4",
         "num_res_blocks": 1, "num_heads": 1, "learn_sigma": True, "ssl_dim": 32,
         "diffusion_steps": 100}  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A random tiny checkpoint, 6 random images and their real encoder features (as extraction makes)."""
    root = tmp_path_factory.mktemp("tradeoff")
    torch.manual_seed(0)
    model = create_model_from_flags(**FLAGS)
    for p in model.parameters():  # zero-initialised output layers would make every sample identical
        p.data.add_(torch.randn_like(p) * 0.02)
    torch.save({"model": model.state_dict(), "model_flags": FLAGS}, root / "ckpt.pt")
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    encoder = load(ENCODER, None)
    with torch.inference_mode():
        crops = np.stack([center_crop_arr(Image.fromarray(a), encoder.input_size) for a in images])
        x = encoder_input(torch.from_numpy(crops), encoder.input_norm)
        feats = torch.stack([encoder(x), encoder(x.flip(-1))], dim=1).numpy()
    hdf5.write_images_file(root / "images.h5", images)
    hdf5.write_features_file(root / "features.h5", feats, attrs={"encoder": ENCODER, "layer": "trunk"})
    return root


def _argv(root, out, steps="2,4"):
    return ["tradeoff", "--checkpoint", str(root / "ckpt.pt"), "--features", str(root / "features.h5"),
            "--images", str(root / "images.h5"), "--samplers", "ddpm,ddim,dpm-solver++", "--steps", steps,
            "--num-cond", "5", "--batch-size", "3", "--workers", "1", "--tolerance", "0.1",
            "--out", str(out)]  # fmt: skip


def test_tradeoff_writes_csv_png_json_with_computed_values(demo, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(demo, out)) == 0
    with open(out / "tradeoff.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert [(r["sampler"], int(r["steps"])) for r in rows] == [
        ("ddpm", 2), ("ddpm", 4), ("ddim", 2), ("ddim", 4), ("dpm-solver++", 2), ("dpm-solver++", 4)
    ]  # fmt: skip
    for r in rows:
        assert int(r["nfe"]) == int(r["steps"]) and int(r["n_cond"]) == 5
        assert float(r["fd_rep"]) >= 0 and float(r["seconds_per_sample"]) > 0
        assert 1 / 5 <= float(r["mrr"]) <= 1 and float(r["chance_mrr"]) == pytest.approx(
            np.mean(1 / np.arange(1, 6))
        )
    # samples differ between settings (different samplers really ran)
    a = np.load(out / "samples" / "ddim_2.npz")["arr_0"]
    b = np.load(out / "samples" / "dpm-solver++_4.npz")["arr_0"]
    assert a.shape == (5, 8, 8, 3) and not np.array_equal(a, b)
    summary = json.loads((out / "recommended.json").read_text())
    # the real images scored against their own features: the ceiling, computed by evaluate (closed form)
    assert summary["real_images"]["mrr"] == pytest.approx(1.0)
    assert summary["real_images"]["fd_rep"] == pytest.approx(0.0, abs=1e-6)
    table = [{**r, "fd_rep": float(r["fd_rep"]), "mrr": float(r["mrr"]), "nfe": int(r["nfe"]),
              "seconds_per_sample": float(r["seconds_per_sample"])} for r in rows]  # fmt: skip
    expected = recommend(table, 0.1)
    assert (summary["sampler"], summary["steps"]) == (expected["sampler"], expected["steps"])
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a rerun reuses the stored samples (same files, same numbers)
    mtime = (out / "samples" / "ddim_2.npz").stat().st_mtime_ns
    assert main(_argv(demo, out)) == 0
    assert (out / "samples" / "ddim_2.npz").stat().st_mtime_ns == mtime
    with open(out / "tradeoff.csv", newline="") as f:
        assert [r["fd_rep"] for r in csv.DictReader(f)] == [r["fd_rep"] for r in rows]


def test_recommend_picks_cheapest_near_best():
    rows = [
        {"sampler": "ddim", "steps": 10, "nfe": 10, "fd_rep": 2.0, "mrr": 0.5, "seconds_per_sample": 1.0},
        {"sampler": "ddim", "steps": 50, "nfe": 50, "fd_rep": 1.0, "mrr": 0.8, "seconds_per_sample": 5.0},
        {"sampler": "dpm-solver++", "steps": 20, "nfe": 20, "fd_rep": 1.04, "mrr": 0.79,
         "seconds_per_sample": 2.0},
        {"sampler": "ddpm", "steps": 20, "nfe": 20, "fd_rep": 1.03, "mrr": 0.70, "seconds_per_sample": 1.9},
    ]  # fmt: skip
    pick = recommend(rows, 0.05)
    assert (pick["sampler"], pick["steps"]) == ("dpm-solver++", 20)  # ddpm 20 fails the MRR tolerance
    assert pick["best_fd_rep"] == 1.0 and pick["best_mrr"] == 0.8
    assert (recommend(rows, 0.0)["sampler"], recommend(rows, 0.0)["steps"]) == ("ddim", 50)
    assert recommend(rows, 1.0)["steps"] == 10
    # best FD_rep and best MRR in different rows, neither near the other: FD_rep decides
    split = [dict(rows[0], fd_rep=1.0, mrr=0.1), dict(rows[1], fd_rep=3.0, mrr=0.9)]
    assert recommend(split, 0.05)["steps"] == 10 and "alone" not in recommend(split, 0.05)["criterion"]
    assert "no setting" in recommend(split, 0.05)["criterion"]
    with pytest.raises(ValueError, match="no settings"):
        recommend([], 0.1)


def test_bad_inputs_are_named(demo, tmp_path, capsys):
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({**FLAGS, "image_size": 16, "attention_resolutions": "8"}))
    capsys.readouterr()
    assert main([*_argv(demo, tmp_path), "--model-flags", str(flags)]) == 1
    assert "images.h5: holds 8 px images but the model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown"):
        main([*_argv(demo, tmp_path)[:-2], "--samplers", "euler", "--out", str(tmp_path)])
    argv = _argv(demo, tmp_path)
    argv[argv.index("--features") + 1] = str(tmp_path / "missing.h5")
    capsys.readouterr()
    assert main(argv) == 1  # one line naming the file and what to do, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'missing.h5'}: features file not found; check the path" in err[0]
