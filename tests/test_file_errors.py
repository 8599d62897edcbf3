"""Every stage, given a missing or a broken input file, fails through its CLI with exit status 1 and one line
on stderr, ``rcdm <stage>: error: <file>: <what is wrong>; <what to do>``, and leaves no output behind
(issue 14 item 5). Broken files are made the ways files break: an HDF5 file truncated to half, a .pt or .npz
of garbage bytes, a PNG that is not one, a metrics.csv without a column."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rcdm.cli import main
from rcdm.errors import EXIT_PERMANENT, MAKE_FIRST, REFETCH, REMAKE, InputFileError, reading
from rcdm.formats import hdf5
from rcdm.formats.metrics_csv import COLUMNS
from rcdm.inception import INCEPTION_FILE

FLAGS = {
    "attention_resolutions": "8", "channel_mult": "1,2", "diffusion_steps": 100, "image_size": 16,
    "learn_sigma": True, "noise_schedule": "linear", "num_channels": 32, "num_heads": 2, "num_res_blocks": 1,
    "resblock_updown": True, "use_scale_shift_norm": True, "ssl_dim": 8,
}  # fmt: skip
N, SIZE, DIM = 6, 16, 8
GARBAGE = b"these bytes are not what the file should hold\n" * 20
HDF5_TRUNCATED = "not a readable HDF5 file (Unable to synchronously open file (truncated file: eof = "


def truncated(src: Path, dst: Path) -> Path:
    """``dst``: the first half of ``src`` (a copy interrupted half way)."""
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def garbage(dst: Path) -> Path:
    dst.write_bytes(GARBAGE)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny valid inputs (images, features, RCDM checkpoint and flags, sample shards, samples .npz) and their
    broken versions."""
    from PIL import Image

    from rcdm.factory import create_model_and_diffusion

    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    f = {"root": root, "images": root / "images.h5", "features": root / "features.h5"}
    factors = {"kind": np.arange(N) % 3, "x": np.arange(N) % 2}
    hdf5.write_images_file(
        f["images"], rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8), factors=factors
    )
    hdf5.write_features_file(f["features"], rng.normal(size=(N, 2, DIM)).astype(np.float32))
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**FLAGS)
    torch.save(model.state_dict(), root / "model.pt")
    f["model"] = root / "model.pt"
    f["flags"] = root / "flags.json"
    f["flags"].write_text(json.dumps(FLAGS))
    f["images_half"] = truncated(f["images"], root / "images_half.h5")
    f["features_half"] = truncated(f["features"], root / "features_half.h5")
    f["model_garbage"] = garbage(root / "model_garbage.pt")
    f["model_half"] = truncated(f["model"], root / "model_half.pt")
    # an image folder: two good PNGs and one that is not a PNG
    folder = root / "folder"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    f["folder"] = folder
    bad_folder = root / "bad_folder"
    bad_folder.mkdir()
    (bad_folder / "good.png").write_bytes((folder / "good0.png").read_bytes())
    f["bad_png"] = garbage(bad_folder / "broken.png")
    f["bad_folder"] = bad_folder
    (root / "empty").mkdir()
    f["empty"] = root / "empty"
    # two sample shards and their samples .npz
    shards = root / "shards" / "s.h5"
    for shard in range(2):
        argv = [
            "sample", "--checkpoint", str(f["model"]), "--model-flags", str(f["flags"]), "--features",
            str(f["features"]), "--out", str(shards), "--shard", str(shard), "--num-shards", "2",
            "--steps", "2", "--num-images", "4", "--device", "cpu", "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
    f["shards"] = shards
    f["samples"] = root / "samples.npz"
    argv = [
        "merge-samples",
        "--input",
        str(shards),
        "--num-shards",
        "2",
        "--out",
        str(f["samples"]),
        "--no-grid",
    ]
    assert main(argv) == 0
    f["samples_half"] = truncated(f["samples"], root / "samples_half.npz")
    return f


def fails(capsys, argv: list[str], path: Path | str, problem: str, fix: str) -> str:
    """Run ``rcdm argv`` in this process: exit status 1 and exactly the one line
    ``rcdm <stage>: error: <path>: <...problem...>; <fix>``; returns that line."""
    capsys.readouterr()
    assert main(argv) == EXIT_PERMANENT == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    prefix = f"rcdm {argv[0]}: error: {path}: "
    assert err[0].startswith(prefix), err[0]
    assert problem in err[0][len(prefix) :], err[0]
    assert err[0].endswith(f"; {fix}"), err[0]
    return err[0]


def nothing_in(folder: Path) -> bool:
    """No output and no temporary file left in ``folder`` (or it was never made)."""
    return not folder.exists() or not any(folder.iterdir())


# ----------------------------------------------------------------------------------------------- library


def test_reading_names_the_file_the_error_concerns(tmp_path):
    missing = tmp_path / "missing.h5"
    with pytest.raises(InputFileError) as err, reading(missing):
        hdf5.check_images_file(missing)
    assert str(err.value) == f"{missing}: not found; {MAKE_FIRST}"
    # with several files: the one the message names, not the first
    other = garbage(tmp_path / "other.h5")
    with pytest.raises(InputFileError) as err, reading(missing, other, fix="redo it"):
        hdf5.check_features_file(other)
    assert str(err.value).startswith(f"{other}: not a readable HDF5 file (") and str(err.value).endswith(
        "; redo it"
    )
    # an error of rcdm's own code that names no file is about a setting, not the file: unchanged
    with pytest.raises(ValueError, match="^invalid shard 5 of 2$"), reading(other):
        hdf5.shard_range(10, 5, 2)
    # a reader's error (h5py, json, zipfile, ...) is about the file even when it does not name it
    with pytest.raises(InputFileError, match=r"other.h5: cannot be read \(JSONDecodeError: "), reading(other):
        json.loads(other.read_text())
    assert str(InputFileError("p", "two\nlines", "fix")) == "p: two lines; fix"


# ----------------------------------------------------------------------------------------------- stages


def test_extract(files, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["extract", "--split", "val", "--image-size", "16", "--images-out", str(out / "img.h5"),
            "--workers", "0", "--no-progress"]  # fmt: skip
    fails(
        capsys,
        [*base, "--dataset", str(tmp_path / "nope")],
        tmp_path / "nope",
        "no such folder",
        "check --dataset (the data folders of the config)",
    )
    fails(
        capsys,
        [*base, "--dataset", str(files["empty"])],
        files["empty"],
        "holds no images",
        "put the images there, or point --dataset at the folder that holds them",
    )
    line = fails(
        capsys,
        [*base, "--dataset", str(files["bad_folder"]), "--on-bad-image", "error"],
        files["bad_png"],
        "not an image PIL can identify (on_bad_image=error)",
        "replace or delete that file, or skip such files (--on-bad-image skip; config "
        "data.on_bad_image: skip)",
    )
    assert "good.png" not in line
    assert nothing_in(out)
    # the encoder's weights file
    feats = [
        "--encoder",
        "small",
        "--features-out",
        f"trunk={out / 't.h5'}",
        "--dataset",
        str(files["folder"]),
    ]
    fails(
        capsys,
        [*base, *feats, "--encoder-checkpoint", str(files["model_garbage"])],
        files["model_garbage"],
        "not a PyTorch file (neither a zip archive nor a pickle)",
        REFETCH,
    )
    fails(
        capsys,
        [*base, *feats, "--encoder-checkpoint", str(tmp_path / "enc.pt")],
        tmp_path / "enc.pt",
        "not found",
        MAKE_FIRST,
    )
    assert nothing_in(out)


def test_merge_extract(files, tmp_path, capsys):
    out = tmp_path / "img.h5"
    for shard in range(3):
        argv = ["extract", "--dataset", str(files["folder"]), "--split", "val", "--image-size", "16",
                "--images-out", str(out), "--shard", str(shard), "--num-shards", "3", "--workers", "0",
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
    parts = [hdf5.part_path(out, i, 3) for i in range(3)]
    parts[1].unlink()
    merge = ["merge-extract", "--out", str(out), "--num-shards", "3", "--no-progress"]
    fix = (
        "rerun the extraction of shard 1 of 3 (Snakemake's extract_images / extract_features job makes it; "
        "outside Snakemake, `rcdm extract ... --shard 1 --num-shards 3`)"
    )
    fails(capsys, merge, parts[1], "part missing", fix)
    truncated(parts[0], parts[1])
    fails(
        capsys, merge, parts[1], f"not a complete extraction file: {HDF5_TRUNCATED}", f"delete it and {fix}"
    )
    parts[1].write_bytes(parts[0].read_bytes())  # shard 0 under shard 1's name
    fails(
        capsys,
        ["merge-extract", "--out", str(out), "--parts", *map(str, parts)],
        parts[1],
        "holds shard 0 of 3, not shard 1 of 3 as its name says",
        f"delete it and {fix}",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in parts)  # no merged file


def test_train(files, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--check", "--out", str(out), "--model-flags", str(files["flags"]), "--steps", "1",
            "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    args = ["--images", str(files["images"]), "--features", str(files["features_half"])]
    fails(capsys, [*base, *args], files["features_half"], HDF5_TRUNCATED, REMAKE)
    args = ["--images", str(tmp_path / "none.h5"), "--features", str(files["features"])]
    fails(capsys, [*base, *args], tmp_path / "none.h5", "not found", MAKE_FIRST)
    args = ["--images", str(files["images"]), "--features", str(files["features"])]
    for resume in (files["model_garbage"], files["model_half"]):
        line = fails(
            capsys,
            [*base, *args, "--resume", str(resume)],
            resume,
            "",
            "give another --resume file (or --resume auto / none)",
        )
        assert ("not a PyTorch file" if resume == files["model_garbage"] else "truncated or damaged") in line
    assert not (out / "train_summary.json").exists() and not list(out.glob("*.pt"))


def test_pretrain(files, tmp_path, capsys):
    out = tmp_path / "enc.pt"
    base = ["pretrain", "--out", str(out), "--steps", "1", "--batch-size", "2", "--input-size", "16",
            "--widths", "4", "--head-dims", "4", "--device", "cpu"]  # fmt: skip
    fails(
        capsys, [*base, "--images", str(files["images_half"])], files["images_half"], HDF5_TRUNCATED, REMAKE
    )
    fails(
        capsys,
        [*base, "--images", str(files["images"]), "--probe", str(tmp_path / "val.h5")],
        tmp_path / "val.h5",
        "not found",
        MAKE_FIRST,
    )
    assert nothing_in(tmp_path)


def test_sample(files, tmp_path, capsys):
    out = tmp_path / "s.h5"
    base = ["sample", "--out", str(out), "--steps", "2", "--device", "cpu", "--no-progress"]
    model = ["--checkpoint", str(files["model"]), "--model-flags", str(files["flags"])]
    fails(
        capsys,
        [*base, *model, "--features", str(files["features_half"])],
        files["features_half"],
        HDF5_TRUNCATED,
        REMAKE,
    )
    fails(
        capsys,
        [*base, *model, "--features", str(tmp_path / "f.h5")],
        tmp_path / "f.h5",
        "not found",
        MAKE_FIRST,
    )
    feats = ["--features", str(files["features"]), "--model-flags", str(files["flags"])]
    fails(
        capsys,
        [*base, *feats, "--checkpoint", str(files["model_garbage"])],
        files["model_garbage"],
        "not a PyTorch file (neither a zip archive nor a pickle)",
        REMAKE,
    )
    fails(
        capsys,
        [*base, *feats, "--checkpoint", str(files["model_half"])],
        files["model_half"],
        "truncated or damaged (PytorchStreamReader failed reading zip archive",
        REMAKE,
    )
    fails(
        capsys,
        [*base, *feats, "--checkpoint", str(tmp_path / "m.pt")],
        tmp_path / "m.pt",
        "checkpoint not found",
        MAKE_FIRST,
    )
    bad_flags = tmp_path / "flags.yaml"
    bad_flags.write_text("image_size: [16\n")
    fails(
        capsys,
        [
            *base,
            "--features",
            str(files["features"]),
            "--checkpoint",
            str(files["model"]),
            "--model-flags",
            str(bad_flags),
        ],
        bad_flags,
        "not valid YAML/JSON",
        REMAKE,
    )
    assert nothing_in(tmp_path / "none") and sorted(p.name for p in tmp_path.iterdir()) == ["flags.yaml"]


def test_merge_samples(files, tmp_path, capsys):
    shards = tmp_path / "s.h5"
    first, second = hdf5.part_path(shards, 0, 2), hdf5.part_path(shards, 1, 2)
    first.write_bytes(hdf5.part_path(files["shards"], 0, 2).read_bytes())
    merge = ["merge-samples", "--input", str(shards), "--num-shards", "2", "--out", str(tmp_path / "x.npz")]
    fix = (
        "rerun shard 1 of 2 (Snakemake's sample job makes it; outside Snakemake, "
        "`rcdm sample ... --shard 1 --num-shards 2`)"
    )
    fails(capsys, merge, second, "shard missing", fix)
    truncated(hdf5.part_path(files["shards"], 1, 2), second)
    fails(
        capsys,
        merge,
        second,
        HDF5_TRUNCATED.replace("not a readable HDF5 file (", ""),
        f"delete it and {fix}",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]


def test_evaluate(files, tmp_path, capsys):
    out = tmp_path / "m" / "metrics.csv"
    base = ["evaluate", "--out", str(out), "--weights-dir", str(tmp_path / "weights"), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    fails(
        capsys,
        [*base, "--samples", str(files["samples_half"])],
        files["samples_half"],
        "not a readable zip archive (File is not a zip file)",
        REMAKE,
    )
    fails(
        capsys,
        [*base, "--samples", str(tmp_path / "none.npz")],
        tmp_path / "none.npz",
        "not found",
        MAKE_FIRST,
    )
    fails(
        capsys,
        [*base, "--samples", str(files["samples"]), "--features", str(files["features_half"])],
        files["features_half"],
        HDF5_TRUNCATED,
        REMAKE,
    )
    weights = garbage((tmp_path / "weights").mkdir() or tmp_path / "weights" / INCEPTION_FILE)
    fails(
        capsys,
        [*base, "--samples", str(files["samples"])],
        weights,
        "not a PyTorch file (neither a zip archive nor a pickle)",
        REFETCH,
    )
    assert nothing_in(out.parent)


def test_tabulate(tmp_path, capsys):
    good = {c: "" for c in COLUMNS} | {"run_id": "a", "dataset": "d", "encoder": "e", "layer": "trunk",
                                        "sampler": "ddim", "steps": "10", "status": "ok"}  # fmt: skip
    no_status = tmp_path / "a" / "metrics.csv"
    no_status.parent.mkdir()
    no_status.write_text(
        ",".join(c for c in good if c != "status")
        + "\n"
        + ",".join(v for c, v in good.items() if c != "status")
        + "\n"
    )
    out = tmp_path / "tables"
    fix = (
        "delete it and rerun its evaluation (Snakemake's evaluate job makes it again; outside Snakemake, "
        "`rcdm evaluate ... --out` that file)"
    )
    fails(
        capsys,
        ["tabulate", str(tmp_path / "a"), "--out-dir", str(out)],
        no_status,
        "not a metrics.csv of `rcdm evaluate` (missing columns status)",
        fix,
    )
    binary = tmp_path / "b.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    fails(capsys, ["tabulate", str(binary), "--out-dir", str(out)], binary, "cannot be read (", fix)
    fails(
        capsys,
        ["tabulate", str(tmp_path / "c.csv"), "--out-dir", str(out)],
        tmp_path / "c.csv",
        "not found",
        "check the path (a metrics.csv or a folder holding some)",
    )
    assert not out.exists()


def test_tradeoff(files, tmp_path, capsys):
    out = tmp_path / "t"
    base = [
        "tradeoff",
        "--features",
        str(files["features"]),
        "--model-flags",
        str(files["flags"]),
        "--samplers",
        "ddim",
        "--steps",
        "2",
        "--num-cond",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    fails(
        capsys,
        [*base, "--checkpoint", str(files["model_garbage"])],
        files["model_garbage"],
        "not a PyTorch file",
        REMAKE,
    )
    argv = [*base, "--checkpoint", str(files["model"]), "--images", str(files["images_half"])]
    fails(capsys, argv, files["images_half"], HDF5_TRUNCATED, REMAKE)
    assert not out.exists()


def test_study(files, tmp_path, capsys):
    out = tmp_path / "study"
    base = ["study", "conditioned", "--model-flags", str(files["flags"]), "--encoder", "small",
            "--images", str(files["images"]), "--steps", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    argv = [*base, "--checkpoint", str(files["model_half"]), "--features", str(files["features"])]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"rcdm study: error: {files['model_half']}: truncated or damaged"
    )
    assert err[0].endswith(f"; {REMAKE}")
    argv = [*base, "--checkpoint", str(files["model"]), "--features", str(files["features_half"])]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rcdm study: error: {files['features_half']}: {err[0].split(': ', 3)[3]}"]
    assert HDF5_TRUNCATED in err[0] and err[0].endswith(f"; {REMAKE}")
    assert nothing_in(out)


def test_flags(files, tmp_path, capsys):
    from rcdm.stages.flags import CHECKPOINT_FIX

    out = tmp_path / "flags.json"
    for bad, problem in ((files["model_garbage"], "not a PyTorch file"), (files["model_half"], "truncated")):
        fails(capsys, ["flags", str(bad), "--out", str(out)], bad, problem, CHECKPOINT_FIX)
    fails(capsys, ["flags", str(tmp_path / "none.pt"), "--out", str(out)], tmp_path / "none.pt", "not found",
          MAKE_FIRST)  # fmt: skip
    assert not out.exists()


def test_the_real_command_prints_one_line_and_no_traceback(files, tmp_path):
    """As a workflow job runs it: a separate process, its whole stderr."""
    argv = [sys.executable, "-m", "rcdm", "sample", "--checkpoint", str(files["model"]), "--model-flags",
            str(files["flags"]), "--features", str(files["features_half"]), "--out", str(tmp_path / "s.h5"),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"rcdm sample: error: {files['features_half']}: {HDF5_TRUNCATED}")
    assert lines[0].endswith(f"; {REMAKE}") and proc.stdout == ""
    assert not any(tmp_path.iterdir())
