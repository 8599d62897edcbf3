import argparse
import json
import os
import zipfile

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import finished
from rcdm.conditioning import noise_seed
from rcdm.errors import InputFileError
from rcdm.formats import hdf5
from rcdm.formats.npz import iter_npz_array
from rcdm.formats.samples import ShardSettingsMismatch, check_samples_file
from rcdm.grids import conditioning_grid, make_grid
from rcdm.stages import merge_samples as sample_merge
from rcdm.stages import sample as sample_mod

FLAGS = {
    "attention_resolutions": "8",
    "channel_mult": "1,2",
    "diffusion_steps": 100,
    "image_size": 16,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "num_channels": 32,
    "num_heads": 2,
    "num_res_blocks": 1,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "ssl_dim": 8,
}
N_COND, DIM, SIZE = 5, 8, 16


def write_images_file(path, images: np.ndarray) -> None:
    paths = [f"img{i:03d}.png" for i in range(len(images))]
    digest = hdf5.PathsDigest()
    digest.update(paths)
    with h5py.File(path, "w") as h5:
        h5.create_dataset(hdf5.IMAGES, data=images)
        h5.create_dataset(hdf5.LABELS, data=np.full(len(images), -1, dtype=np.int64))
        hdf5.write_strings(h5, hdf5.PATHS, paths)
        hdf5.set_attrs(
            h5,
            {"kind": "images", "format_version": hdf5.FORMAT_VERSION, "num_images": len(images),
             "paths_sha256": digest.hexdigest(), "image_size": images.shape[1], "dataset": "toy",
             "split": "val", "complete": True},
        )  # fmt: skip


def write_features_file(path, feats: np.ndarray, images_file: str = "") -> None:
    paths = [f"img{i:03d}.png" for i in range(len(feats))]
    digest = hdf5.PathsDigest()
    digest.update(paths)
    with h5py.File(path, "w") as h5:
        h5.create_dataset(hdf5.FEATURES, data=feats.astype(np.float32))
        hdf5.write_strings(h5, hdf5.PATHS, paths)
        hdf5.set_attrs(
            h5,
            {"kind": "features", "format_version": hdf5.FORMAT_VERSION, "num_images": len(feats),
             "paths_sha256": digest.hexdigest(), "dim": feats.shape[2], "encoder": "toy", "layer": "trunk",
             "dataset": "toy", "split": "val", "images_file": images_file, "complete": True},
        )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rcdm.factory import create_model_and_diffusion

    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**FLAGS)
    # perturb every tensor so zero-initialised output layers do not make all samples trivial
    sd = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save(sd, root / "tiny.pt")
    (root / "flags.json").write_text(json.dumps(FLAGS))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_COND, SIZE, SIZE, 3), dtype=np.uint8)
    write_images_file(root / "images.h5", images)
    feats = rng.normal(size=(N_COND, 2, DIM))
    write_features_file(root / "features.h5", feats, images_file=str(root / "images.h5"))
    return root, images


def _args(root, out, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sample_mod.add_arguments(parser)
    argv = [
        "--checkpoint", str(root / "tiny.pt"), "--model-flags", str(root / "flags.json"),
        "--features", str(root / "features.h5"), "--out", str(out), "--samples-per-image", "2",
        "--sampler", "ddim", "--steps", "3", "--seed", "7", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def _merge(out, num_shards, npz, grid=True, **kw):
    parser = argparse.ArgumentParser()
    sample_merge.add_arguments(parser)
    argv = ["--input", str(out), "--num-shards", str(num_shards), "--out", str(npz)] + (
        [] if grid else ["--no-grid"]
    )
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert sample_merge.run(parser.parse_args(argv)) == 0
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def test_noise_seed_is_deterministic_and_distinct():
    seeds = {noise_seed(0, c, s) for c in range(50) for s in range(4)}
    assert len(seeds) == 200
    assert noise_seed(3, 1, 2) == noise_seed(3, 1, 2)
    assert noise_seed(3, 1, 2) != noise_seed(4, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def test_shards_are_independent_of_shard_count_and_batch_size(setup, tmp_path):
    root, _ = setup
    one = tmp_path / "one" / "s.h5"
    assert sample_mod.run(_args(root, one, batch_size=4)) == 0
    a = _merge(one, 1, tmp_path / "one.npz", grid=False)
    two = tmp_path / "two" / "s.h5"
    for shard in range(3):
        sample_mod.run(_args(root, two, batch_size=3, shard=shard, num_shards=3))
    b = _merge(two, 3, tmp_path / "two.npz", grid=False)
    assert a["arr_0"].shape == (N_COND * 2, SIZE, SIZE, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["cond_index"], np.repeat(np.arange(N_COND), 2))
    np.testing.assert_array_equal(a["sample_index"], np.tile([0, 1], N_COND))
    np.testing.assert_array_equal(a["cond_index"], b["cond_index"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # batch-size dependent float rounding at most
    # distinct noise per sample: the two samples of one conditioning differ, and samples are not flat
    assert np.abs(a["arr_0"][0].astype(int) - a["arr_0"][1].astype(int)).mean() > 5
    assert a["arr_0"].std() > 10
    settings = json.loads(str(a["settings_json"]))
    assert settings["sampler"] == "ddim" and settings["steps"] == 3 and settings["seed"] == 7
    assert "shard" not in settings


def test_seed_changes_samples_and_shard_attributes(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "s.h5"
    sample_mod.run(_args(root, out, batch_size=10))
    sample_mod.run(_args(root, tmp_path / "t.h5", batch_size=10, seed=8))
    p = hdf5.part_path(out, 0, 1)
    attrs = check_samples_file(p)
    assert attrs["sampler"] == "ddim" and attrs["num_samples"] == 10 and attrs["complete"]
    assert attrs["settings"]["model_sha256"] and attrs["settings"]["image_size"] == SIZE
    with h5py.File(p) as h5a, h5py.File(hdf5.part_path(tmp_path / "t.h5", 0, 1)) as h5b:
        assert np.abs(h5a["samples"][:].astype(int) - h5b["samples"][:].astype(int)).mean() > 5


def test_complete_shard_is_not_recomputed_and_mismatch_is_an_error(setup, tmp_path, monkeypatch):
    root, _ = setup
    out = tmp_path / "s.h5"
    sample_mod.run(_args(root, out, shard=1, num_shards=2))
    part = hdf5.part_path(out, 1, 2)
    before = part.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("model loaded or sampled again")

    monkeypatch.setattr("rcdm.checkpoint.load_model", boom)
    monkeypatch.setattr("rcdm.samplers.sample", boom)
    assert sample_mod.run(_args(root, out, shard=1, num_shards=2, batch_size=1)) == 0
    assert part.stat().st_mtime_ns == before
    monkeypatch.undo()
    with pytest.raises(ShardSettingsMismatch, match="seed"):
        sample_mod.run(_args(root, out, shard=1, num_shards=2, seed=99))
    assert part.stat().st_mtime_ns == before


def test_killed_run_resumes_to_identical_result(setup, tmp_path, monkeypatch):
    root, _ = setup
    ref = tmp_path / "ref.h5"
    sample_mod.run(_args(root, ref, batch_size=3))
    out = tmp_path / "s.h5"
    import rcdm.samplers

    real = rcdm.samplers.sample
    calls = {"n": 0}

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rcdm.samplers, "sample", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.run(_args(root, out, batch_size=3))
    part = hdf5.part_path(out, 0, 1)
    assert not part.exists()  # nothing under the final name
    partial = part.with_name(part.name + ".partial")
    with h5py.File(partial) as h5:
        assert h5.attrs["done"] == 6 and not h5.attrs["complete"]
    calls["n"] = -100
    sample_mod.run(_args(root, out, batch_size=3))
    assert calls["n"] == -100 + 2  # only the two remaining batches (samples 6..9) were generated
    assert not partial.exists()
    with h5py.File(part) as a, h5py.File(hdf5.part_path(ref, 0, 1)) as b:
        np.testing.assert_array_equal(a["cond_index"][:], b["cond_index"][:])
        assert np.abs(a["samples"][:].astype(int) - b["samples"][:].astype(int)).max() <= 1


def test_merge_writes_adm_npz_and_grid_with_conditioning_first(setup, tmp_path):
    root, images = setup
    out = tmp_path / "s.h5"
    for shard in range(2):
        sample_mod.run(_args(root, out, shard=shard, num_shards=2, num_images=4, subset_seed=1))
    npz = tmp_path / "samples.npz"
    z = _merge(out, 2, npz, grid_rows=3, grid_cols=2)
    with zipfile.ZipFile(npz) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    cond_ids = np.unique(z["cond_index"])
    assert len(cond_ids) == 4 and z["arr_0"].shape == (8, SIZE, SIZE, 3)
    # streaming reader returns the same array in chunks
    chunks = list(iter_npz_array(npz, chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), z["arr_0"])
    grid = np.asarray(Image.open(tmp_path / "samples_grid.png"))
    expected = conditioning_grid(
        [images[c] for c in cond_ids[:3]], [z["arr_0"][2 * i : 2 * i + 2] for i in range(3)]
    )
    np.testing.assert_array_equal(grid, expected)
    scale = 64 // SIZE  # 16px images are shown at 64px, each pixel repeated
    np.testing.assert_array_equal(grid[2 : 2 + 64 : scale, 2 : 2 + 64 : scale], images[cond_ids[0]])


def test_merge_refuses_missing_or_foreign_shards(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "s.h5"
    sample_mod.run(_args(root, out, shard=0, num_shards=2))
    with pytest.raises(InputFileError, match="part-0001-of-0002.h5: shard missing; rerun shard 1 of 2"):
        _merge(out, 2, tmp_path / "x.npz")
    sample_mod.run(_args(root, out, shard=1, num_shards=2, seed=5))
    with pytest.raises(InputFileError, match="other settings than .*: seed; delete the shard"):
        _merge(out, 2, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_image_folder_conditioning_through_encoder(setup, tmp_path):
    from rcdm.encoders import SMALL_FORMAT, build_small

    root, _ = setup
    arch = {"widths": [8, 8], "blocks": 1, "stem_stride": 1, "head_dims": [16, DIM]}
    torch.manual_seed(1)
    trunk, head = build_small(arch)
    enc_path = tmp_path / "enc.pt"
    torch.save(
        {"format": SMALL_FORMAT, "arch": arch, "trunk": trunk.state_dict(), "head": head.state_dict(),
         "input_size": 24},
        enc_path,
    )  # fmt: skip
    folder = tmp_path / "ood"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(30 + i, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    args = _args(root, tmp_path / "ood.h5", encoder="small", encoder_checkpoint=enc_path, layer="head")
    args.features, args.dataset = None, str(folder)
    assert sample_mod.run(args) == 0
    part = hdf5.part_path(tmp_path / "ood.h5", 0, 1)
    with h5py.File(part) as h5:
        assert h5["samples"].shape == (6, SIZE, SIZE, 3)
        np.testing.assert_array_equal(h5["cond_ids"][:], [0, 1, 2])
        cond_images, cond_feats = h5["cond_images"][:], h5["cond_features"][:]
    # conditioning crops and features are those of extraction's preprocessing
    from rcdm import encoders
    from rcdm.preprocess import center_crop_arr, encoder_input

    enc = encoders.load("small", enc_path, "head")
    img = Image.open(folder / "p1.png").convert("RGB")
    np.testing.assert_array_equal(cond_images[1], center_crop_arr(img, SIZE))
    with torch.inference_mode():
        expect = enc(encoder_input(torch.from_numpy(center_crop_arr(img, 24).copy())[None], enc.input_norm))[
            0
        ]
    np.testing.assert_allclose(cond_feats[1], expect.numpy(), rtol=1e-5, atol=1e-6)
    z = _merge(tmp_path / "ood.h5", 1, tmp_path / "ood.npz", grid_rows=3, grid_cols=2)
    assert z["arr_0"].shape == (6, SIZE, SIZE, 3)
    grid = np.asarray(Image.open(tmp_path / "ood_grid.png"))
    scale = 64 // SIZE
    np.testing.assert_array_equal(grid[2 : 2 + 64 : scale, 2 : 2 + 64 : scale], cond_images[0])


def test_model_and_conditioning_dimension_mismatch_is_clear(setup, tmp_path):
    root, _ = setup
    write_features_file(tmp_path / "f4.h5", np.zeros((3, 2, 4)))
    args = _args(root, tmp_path / "s.h5")
    args.features = str(tmp_path / "f4.h5")
    with pytest.raises(InputFileError, match="f4.h5: gives 4-d representations but the model .* expects 8-d"):
        sample_mod.run(args)


def test_grid_helper_layout_and_no_stretching():
    dark = np.full((4, 4, 3), 10, dtype=np.uint8)
    mid = np.full((4, 4, 3), 12, dtype=np.uint8)
    g = make_grid([[dark, mid], [mid]], pad=1, background=0, min_cell=1)
    assert g.shape == (1 + 2 * 5, 1 + 2 * 5, 3)
    assert g[1:5, 1:5].max() == 10 and g[1:5, 6:10].min() == 12  # values kept, not stretched to 0..255
    assert (g[6:10, 6:10] == 0).all()  # missing cell shows the background
    g2 = conditioning_grid([dark], [[mid, mid]], pad=1)
    assert g2.shape[1] == 3 * 64 + 4 * 1 + 2  # 4px shown at 64px; the conditioning column is set apart
    np.testing.assert_array_equal(g2[1:65, 1:65], np.full((64, 64, 3), 10, np.uint8))  # pixels repeated
    with pytest.raises(TypeError, match="uint8"):
        make_grid([[dark.astype(np.float32)]])


def test_merge_without_the_conditioning_images_fails_before_writing(setup, tmp_path, capsys):
    """Shards whose conditioning images file has moved: one line naming it and what to do, and no npz (the
    missing and broken inputs of every stage: tests/test_file_errors.py)."""
    from rcdm.cli import main

    root, _ = setup
    out = tmp_path / "ok.h5"
    assert sample_mod.run(_args(root, out)) == 0
    # as if the images file had moved: the grid has no conditioning images to show
    with h5py.File(hdf5.part_path(out, 0, 1), "a") as h5:
        text = h5.attrs["settings_json"]
        assert str(root / "images.h5") in text
        h5.attrs["settings_json"] = text.replace(str(root / "images.h5"), str(tmp_path / "gone.h5"))
    capsys.readouterr()
    argv = ["merge-samples", "--input", str(out), "--num-shards", "1", "--out", str(tmp_path / "x.npz")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    gone = tmp_path / "gone.h5"
    assert len(err) == 1 and f"{gone}: conditioning images file not found; pass --images" in err[0]
    assert not (tmp_path / "x.npz").exists()


def test_a_deleted_finished_shard_is_linked_back_from_its_kept_copy(setup, tmp_path, monkeypatch):
    """The retry of a failed grouped job (rcdm.finished): with $RCDM_FINISHED set (the workflow's folder for
    this run), a finished shard is kept there; deleted, it is linked back on the rerun without loading the
    model. A new run (another folder) or other settings make it again; the merge forgets the copies."""
    from rcdm import checkpoint

    root, _ = setup
    out = tmp_path / "s.h5"
    loads = []
    real_load = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setenv("RCDM_FINISHED", str(tmp_path / ".finished" / "run-a"))
    for shard in range(2):
        assert sample_mod.run(_args(root, out, shard=shard, num_shards=2)) == 0
    parts = [hdf5.part_path(out, shard, 2) for shard in range(2)]
    run_a, run_b = tmp_path / ".finished" / "run-a", tmp_path / ".finished" / "run-b"
    assert all(os.path.samefile(p, finished.kept_path(p, run_a)) for p in parts)
    made = parts[1].read_bytes()

    def run_shard_1(**kw) -> int:
        """Delete shard 1 (as Snakemake does), run it again; how often the model was loaded."""
        parts[1].unlink()
        before = len(loads)
        assert sample_mod.run(_args(root, out, shard=1, num_shards=2, **kw)) == 0
        return len(loads) - before

    assert run_shard_1() == 0  # linked back
    assert parts[1].read_bytes() == made and os.path.samefile(parts[1], finished.kept_path(parts[1], run_a))
    monkeypatch.setenv("RCDM_FINISHED", str(run_b))  # a new run of the main Snakemake
    assert run_shard_1() == 1
    assert run_shard_1(seed=8) == 1  # run-b's copy was made with seed 7: dropped, made again, kept
    assert check_samples_file(finished.kept_path(parts[1], run_b))["settings"]["seed"] == 8
    assert run_shard_1() == 1
    _merge(out, 2, tmp_path / "s.npz", grid=False)
    assert not [p for p in (tmp_path / ".finished").rglob("*") if p.is_file()]  # the merge forgot them all
