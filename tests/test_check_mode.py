"""``--check`` of the retried GPU stages (extract, sample, evaluate, tradeoff, study): every input read with
the stage's own loaders on the CPU and every setting checked, nothing written; exit 0 with one "check passed"
line, or exit 1 with the one-line error naming the file (issue 14 item 4: a workflow runs the check on the
submit host before the stage's retried job, so a permanent error never uses a retry or a GPU allocation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm.cli import main
from rcdm.errors import EXIT_PERMANENT, REFETCH, REMAKE

SIZE = 16
FLAGS = {
    "attention_resolutions": "8", "channel_mult": "1,2", "diffusion_steps": 100, "image_size": SIZE,
    "learn_sigma": True, "noise_schedule": "linear", "num_channels": 32, "num_heads": 1, "num_res_blocks": 1,
    "resblock_updown": True, "use_scale_shift_norm": True, "ssl_dim": 16,
}  # fmt: skip
GARBAGE = b"these bytes are not what the file should hold\n" * 20


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An image folder, a small encoder (trunk 16-d, head 8-d), its real extraction (images, trunk and head
    features), a random RCDM conditioned on the trunk, a samples .npz of it, and broken copies."""
    from rcdm.encoders import SMALL_FORMAT, build_small
    from rcdm.factory import create_model_and_diffusion

    root = tmp_path_factory.mktemp("check")
    f = {name: root / name for name in ("folder", "enc.pt", "images.h5", "trunk.h5", "head.h5", "model.pt")}
    rng = np.random.default_rng(0)
    f["folder"].mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(f["folder"] / f"{i}.png")
    torch.manual_seed(0)
    arch = {"widths": [8, 16], "blocks": 1, "stem_stride": 1, "head_dims": [16, 8]}
    trunk, head = build_small(arch)
    state = {"trunk": trunk.state_dict(), "head": head.state_dict()}
    torch.save({"format": SMALL_FORMAT, "arch": arch, **state, "input_size": SIZE}, f["enc.pt"])
    _run(["extract", "--dataset", str(f["folder"]), "--split", "val", "--image-size", str(SIZE),
          "--images-out", str(f["images.h5"]), "--encoder", "small", "--encoder-checkpoint", str(f["enc.pt"]),
          "--features-out", f"trunk={f['trunk.h5']}", f"head={f['head.h5']}", "--workers", "0",
          "--device", "cpu", "--no-progress"])  # fmt: skip
    model, _ = create_model_and_diffusion(**FLAGS)
    torch.save(model.state_dict(), f["model.pt"])
    f["flags"] = root / "flags.json"
    f["flags"].write_text(json.dumps(FLAGS))
    shards = root / "shards" / "s.h5"
    _run(["sample", "--checkpoint", str(f["model.pt"]), "--model-flags", str(f["flags"]), "--features",
          str(f["trunk.h5"]), "--out", str(shards), "--steps", "2", "--device", "cpu",
          "--no-progress"])  # fmt: skip
    f["samples"] = root / "samples.npz"
    _run(["merge-samples", "--input", str(shards), "--num-shards", "1", "--out", str(f["samples"]),
          "--no-grid"])  # fmt: skip
    for name in ("model.pt", "trunk.h5", "samples.npz"):
        data = (root / name).read_bytes()
        f[f"half_{name}"] = root / f"half_{name}"
        f[f"half_{name}"].write_bytes(data[: len(data) // 2])
    f["garbage.pt"] = root / "garbage.pt"
    f["garbage.pt"].write_bytes(GARBAGE)
    return f


def _tree(*folders: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*")}


def passes(capsys, files, tmp_path, argv: list[str]) -> str:
    """``rcdm argv --check`` exits 0, its last stderr line says the check passed, nothing is written."""
    before = _tree(files["folder"].parent, tmp_path)
    capsys.readouterr()
    assert main([*argv, "--check"]) == 0
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"rcdm {argv[0]}: check passed: "), captured.err
    assert _tree(files["folder"].parent, tmp_path) == before  # nothing written, nothing touched
    return last


def fails(capsys, files, tmp_path, argv: list[str], path: Path, problem: str) -> str:
    """``rcdm argv --check`` exits 1 with exactly one stderr line naming ``path``; nothing is written."""
    before = _tree(files["folder"].parent, tmp_path)
    capsys.readouterr()
    assert main([*argv, "--check"]) == EXIT_PERMANENT == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"rcdm {argv[0]}: error: {path}: "), err[0]
    assert problem in err[0], err[0]
    assert _tree(files["folder"].parent, tmp_path) == before
    return err[0]


def test_extract_check(files, tmp_path, capsys):
    out = tmp_path / "features"
    argv = ["extract", "--dataset", str(files["folder"]), "--split", "val", "--encoder", "small",
            "--features-out", f"trunk={out / 'trunk.h5'}", f"head={out / 'head.h5'}", "--num-shards", "3",
            "--workers", "0", "--no-progress"]  # fmt: skip
    line = passes(capsys, files, tmp_path, [*argv, "--encoder-checkpoint", str(files["enc.pt"])])
    assert "6 images" in line and "trunk 16-d, head 8-d" in line
    line = fails(capsys, files, tmp_path, [*argv, "--encoder-checkpoint", str(files["garbage.pt"])],
                 files["garbage.pt"], "not a PyTorch file")  # fmt: skip
    assert line.endswith(REFETCH)
    fails(capsys, files, tmp_path, [*argv, "--encoder-checkpoint", str(tmp_path / "none.pt")],
          tmp_path / "none.pt", "not found")  # fmt: skip


def test_sample_check(files, tmp_path, capsys):
    out = tmp_path / "s.h5"
    model = ["sample", "--checkpoint", str(files["model.pt"]), "--model-flags", str(files["flags"]),
             "--out", str(out), "--num-shards", "2", "--steps", "2", "--device", "cuda",
             "--no-progress"]  # fmt: skip
    good = ["--features", str(files["trunk.h5"]), "--num-images", "4"]
    line = passes(capsys, files, tmp_path, [*model, *good])
    assert "4 of 6 conditionings" in line and "2 shard(s)" in line  # --device cuda: a check runs on the CPU
    half = files["half_trunk.h5"]
    assert REMAKE in fails(capsys, files, tmp_path, [*model, "--features", str(half)], half, "HDF5")
    fails(capsys, files, tmp_path, [*model, "--features", str(files["head.h5"])], files["head.h5"],
          "gives 8-d representations but the model")  # fmt: skip
    fails(capsys, files, tmp_path, [*model, "--features", str(files["trunk.h5"]), "--num-images", "9"],
          files["trunk.h5"], "holds 6 conditionings, fewer than the 9 asked for")  # fmt: skip
    fails(capsys, files, tmp_path, [*model, "--features", str(files["trunk.h5"]), "--num-shards", "7"],
          files["trunk.h5"], "6 conditionings cannot fill 7 shards")  # fmt: skip
    argv = [*model, "--features", str(files["trunk.h5"])]
    argv[argv.index("--checkpoint") + 1] = str(files["half_model.pt"])
    fails(capsys, files, tmp_path, argv, files["half_model.pt"], "truncated or damaged")


def test_evaluate_check(files, tmp_path, capsys):
    out = tmp_path / "m" / "metrics.csv"
    base = ["evaluate", "--out", str(out), "--weights-dir", str(tmp_path / "weights"), "--features",
            str(files["trunk.h5"]), "--encoder-checkpoint", str(files["enc.pt"]), "--reference-images",
            str(files["images.h5"]), "--no-progress"]  # fmt: skip
    line = passes(capsys, files, tmp_path, [*base, "--samples", str(files["samples"])])
    assert "(6 samples)" in line and "FID/IS skipped" in line and "FD_rep and rank with" in line
    half = files["half_samples.npz"]
    fails(capsys, files, tmp_path, [*base, "--samples", str(half)], half, "not a readable zip archive")
    argv = [*base, "--samples", str(files["samples"])]
    argv[argv.index("--encoder-checkpoint") + 1] = str(files["garbage.pt"])
    capsys.readouterr()
    assert main([*argv, "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rcdm evaluate: error: {files['garbage.pt']} (sha256 ")
    assert "is not the encoder file the features were extracted with" in err[0]


def test_tradeoff_check(files, tmp_path, capsys):
    out = tmp_path / "tradeoff"
    base = ["tradeoff", "--checkpoint", str(files["model.pt"]), "--flags", str(files["flags"]), "--images",
            str(files["images.h5"]), "--encoder", "small", "--encoder-checkpoint", str(files["enc.pt"]),
            "--layer", "trunk", "--samplers", "ddim", "--steps", "2,4", "--num-cond", "4",
            "--out", str(out)]  # fmt: skip
    line = passes(capsys, files, tmp_path, [*base, "--features", str(files["trunk.h5"])])
    assert "4 conditionings" in line and "2 settings up to 4 steps" in line
    half = files["half_trunk.h5"]
    fails(capsys, files, tmp_path, [*base, "--features", str(half)], half, "HDF5")
    fails(capsys, files, tmp_path, [*base, "--features", str(files["trunk.h5"]), "--num-cond", "9"],
          files["trunk.h5"], "holds 6 conditionings, fewer than the 9 asked for")  # fmt: skip


@pytest.mark.parametrize("study", ["conditioned", "augment", "interpolate"])
def test_study_check(files, tmp_path, capsys, study):
    out = tmp_path / "study"
    base = ["study", study, "--model-flags", str(files["flags"]), "--encoder", "small",
            "--encoder-checkpoint", str(files["enc.pt"]), "--images", str(files["images.h5"]),
            "--features", str(files["trunk.h5"]), "--num-images", "2", "--steps", "2", "--no-progress",
            "--out", str(out)]  # fmt: skip
    line = passes(capsys, files, tmp_path, [*base, "--checkpoint", str(files["model.pt"])])
    assert f"rcdm study: check passed: {study}: " in line
    half = files["half_model.pt"]
    fails(capsys, files, tmp_path, [*base, "--checkpoint", str(half)], half, "truncated or damaged")
    argv = [*base, "--checkpoint", str(files["model.pt"])]
    argv[argv.index("--features") + 1] = str(files["half_trunk.h5"])
    fails(capsys, files, tmp_path, argv, files["half_trunk.h5"], "HDF5")
