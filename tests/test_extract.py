"""rcdm extract / merge-extract on tiny data: contents, mirrored features, bad files, shards, reruns."""

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_data import build_odd_folder
from torch import nn

from rcdm import finished
from rcdm.cli import main as cli_main
from rcdm.data import BadImageError, open_dataset
from rcdm.formats import hdf5 as hs
from rcdm.preprocess import CROP_METHOD, center_crop_arr, encoder_input
from rcdm.shapes import KINDS
from rcdm.stages.extract import ExtractJob, run_extraction
from rcdm.stages.merge_extract import MergeError, find_parts, merge_parts

ENC_SIZE = 20


class TinyNet(nn.Module):
    """Deterministic trunk (conv, pooled, 6-d) and head (4-d), the shape of a custom encoder."""

    input_size = ENC_SIZE
    input_norm = "none"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.eval()


def tiny_net() -> TinyNet:
    return TinyNet()


class FakeEncoder(nn.Module):
    """One layer, with the attributes of ``rcdm.encoders.load``'s modules."""

    def __init__(self, layer: str = "trunk", input_norm: str = "none", fail_after: int | None = None) -> None:
        super().__init__()
        self.net = TinyNet()
        self.layer, self.dim = layer, 6 if layer == "trunk" else 4
        self.encoder_name, self.input_size, self.input_norm = "tiny", ENC_SIZE, input_norm
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        h = self.net.trunk(x)
        return h if self.layer == "trunk" else self.net.head(h)


class FakePair(nn.Module):
    """Both layers from one trunk pass, like ``rcdm.encoders.load_pair``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()
        self.dims = {"trunk": 6, "head": 4}
        self.encoder_name, self.input_size, self.input_norm = "tiny", ENC_SIZE, "none"
        self.trunk_calls = 0

    def forward(self, x):
        self.trunk_calls += 1
        h = self.net.trunk(x)
        return {"trunk": h, "head": self.net.head(h)}


def _reference(source, index, net: TinyNet, input_norm="none"):
    """Features of image ``index`` and of its mirrored encoder input, computed directly."""
    crop = torch.from_numpy(center_crop_arr(source.load(index), ENC_SIZE))[None]
    x = encoder_input(crop, input_norm)
    with torch.no_grad():
        t, tm = net.trunk(x)[0], net.trunk(x.flip(-1))[0]
        return {"trunk": torch.stack([t, tm]), "head": torch.stack([net.head(t), net.head(tm)])}


def _job(source, tmp, **kw):
    defaults = dict(dataset="shapes", split="val", image_size=16, images_out=tmp / "img.h5")
    return ExtractJob(source, **(defaults | kw))


def test_images_and_both_feature_layers_in_one_pass(tmp_path):
    source = open_dataset("shapes", "val", num_images=23, seed=2, native_size=32)
    pair = FakePair()
    job = _job(
        source,
        tmp_path,
        features_out={"trunk": tmp_path / "t.h5", "head": tmp_path / "h.h5"},
        encoder_name="tiny",
        encoder_sha256="ab" * 32,
    )
    summary = run_extraction(
        job, lambda layers: pair if layers == ["trunk", "head"] else None, batch_size=10, progress=False
    )
    assert summary.num_images == 23 and not summary.bad
    assert pair.trunk_calls == 3  # one trunk pass per batch serves both layers

    attrs = hs.check_images_file(tmp_path / "img.h5")
    assert attrs["dataset"] == "shapes" and attrs["split"] == "val" and attrs["image_size"] == 16
    assert attrs["crop_method"] == CROP_METHOD and attrs["num_bad"] == 0 and attrs["native_size"] == 32
    with h5py.File(tmp_path / "img.h5") as h5:
        assert h5["images"].dtype == np.uint8 and h5["labels"].dtype == np.int64
        for i in (0, 9, 22):
            np.testing.assert_array_equal(h5["images"][i], center_crop_arr(source.load(i), 16))
        assert h5["labels"][:].tolist() == [source.label(i) for i in range(23)]
        assert hs.read_strings(h5["paths"]) == [source.key(i) for i in range(23)]
        assert list(h5["factors/kind"].attrs["categories"]) == list(KINDS)
        assert h5["factors/count"].dtype == np.int64 and h5["factors/x"].dtype == np.float32
        for name in ("kind", "colour", "background", "count"):
            assert h5[f"factors/{name}"][:].tolist() == [source.factors(i)[name] for i in range(23)]
        np.testing.assert_allclose(
            h5["factors/rotation"][:], [source.factors(i)["rotation"] for i in range(23)], rtol=1e-6
        )

    for layer, dim in (("trunk", 6), ("head", 4)):
        fattrs = hs.check_features_file(tmp_path / f"{layer[0]}.h5", tmp_path / "img.h5")
        assert fattrs["encoder"] == "tiny" and fattrs["layer"] == layer and fattrs["dim"] == dim
        assert fattrs["input_norm"] == "none" and fattrs["input_size"] == ENC_SIZE
        assert fattrs["encoder_sha256"] == "ab" * 32 and fattrs["images_file"] == str(tmp_path / "img.h5")
        with h5py.File(tmp_path / f"{layer[0]}.h5") as h5:
            feats = h5["features"][:]
        assert feats.shape == (23, 2, dim) and feats.dtype == np.float32
        for i in (0, 13, 22):
            # index 1 is the encoder applied to the mirrored encoder input
            torch.testing.assert_close(
                torch.from_numpy(feats[i]), _reference(source, i, pair.net)[layer], rtol=1e-5, atol=1e-5
            )
        assert not np.allclose(feats[:, 0], feats[:, 1])


def test_imagenet_input_norm_and_float16(tmp_path):
    source = open_dataset("shapes", "val", num_images=6, seed=0, native_size=24)
    enc = FakeEncoder("head", input_norm="imagenet")
    job = _job(
        source,
        tmp_path,
        images_out=None,
        features_out={"head": tmp_path / "h.h5"},
        encoder_name="tiny",
        dtype="float16",
    )
    run_extraction(job, lambda layers: enc, batch_size=4, progress=False)
    with h5py.File(tmp_path / "h.h5") as h5:
        feats = h5["features"][:]
        assert h5.attrs["input_norm"] == "imagenet" and h5.attrs["images_file"] == ""
    assert feats.dtype == np.float16 and feats.shape == (6, 2, 4)
    want = _reference(source, 5, enc.net, "imagenet")["head"]
    torch.testing.assert_close(torch.from_numpy(feats[5]).float(), want, rtol=2e-3, atol=2e-3)
    plain = _reference(source, 5, enc.net, "none")["head"]
    assert not torch.allclose(plain, want, atol=1e-2)


def test_bad_files_are_skipped_counted_listed_or_raise(tmp_path):
    data = tmp_path / "data"
    expected = build_odd_folder(data)
    source = open_dataset(str(data), "val")
    out = tmp_path / "out"
    job = _job(source, out, dataset=str(data), features_out={"trunk": out / "t.h5"}, encoder_name="tiny")
    summary = run_extraction(job, lambda layers: FakeEncoder("trunk"), batch_size=4, progress=False)
    good = sorted(k for k, v in expected.items() if v is not None)
    bad = sorted(k for k, v in expected.items() if v is None)
    assert summary.num_images == len(good) and len(summary.bad) == len(bad) == 3
    for reason, key in zip(sorted(summary.bad), bad):
        assert str(data / key) in reason
    with h5py.File(out / "img.h5") as h5:
        assert hs.read_strings(h5["paths"]) == good
        assert h5.attrs["num_bad"] == 3 and len(h5["bad_paths"]) == 3
        labels = dict(zip(good, h5["labels"][:].tolist()))
        assert labels["loose.png"] == -1 and labels["animals/gray.png"] == 0
        row = good.index("animals/gray.png")
        assert (h5["images"][row] == 100).all()
    hs.check_features_file(out / "t.h5", out / "img.h5")

    strict = tmp_path / "strict"
    job = _job(
        source, strict, dataset=str(data), features_out={"trunk": strict / "t.h5"}, encoder_name="tiny"
    )
    with pytest.raises(BadImageError, match="on_bad_image=error"):
        run_extraction(job, lambda layers: FakeEncoder("trunk"), on_bad_image="error", progress=False)
    assert not list(strict.iterdir())  # nothing left behind, not even temporary files


def test_shards_and_merge_equal_the_unsharded_run(tmp_path):
    data = tmp_path / "data"
    build_odd_folder(data)
    source = open_dataset(str(data), "train")
    kw = dict(
        dataset=str(data), split="train", features_out={"trunk": tmp_path / "t.h5"}, encoder_name="tiny"
    )
    run_extraction(_job(source, tmp_path, **kw), lambda layers: FakeEncoder(), batch_size=3, progress=False)
    parts = tmp_path / "parts"
    kw["features_out"] = {"trunk": parts / "t.h5"}
    for shard in (2, 0, 1):
        job = _job(source, parts, shard=shard, num_shards=3, **kw)
        run_extraction(job, lambda layers: FakeEncoder(), batch_size=2, progress=False)
    assert hs.part_path(parts / "img.h5", 1, 3).name == "img.part-0001-of-0003.h5"
    with pytest.raises(MergeError, match="shards"):
        merge_parts(find_parts(parts / "img.h5", 3)[:2], parts / "img.h5", progress=False)
    merge_parts(find_parts(parts / "img.h5", 3), parts / "img.h5", progress=False)
    merge_parts(
        find_parts(parts / "t.h5", 3)[::-1], parts / "t.h5", images_path=parts / "img.h5", progress=False
    )
    hs.check_features_file(parts / "t.h5", parts / "img.h5")
    for name, keys in (
        ("img.h5", ("images", "labels", "paths", "bad_paths")),
        ("t.h5", ("features", "paths")),
    ):
        with h5py.File(tmp_path / name) as whole, h5py.File(parts / name) as merged:
            for key in keys:
                np.testing.assert_array_equal(whole[key][:], merged[key][:])
            for attr in ("num_images", "num_bad", "paths_sha256", "shard", "num_shards", "shard_stop"):
                assert whole.attrs[attr] == merged.attrs[attr], attr


def test_merge_rejects_missing_and_inconsistent_parts(tmp_path):
    source = open_dataset("shapes", "val", num_images=8, native_size=16)
    for shard in range(2):
        run_extraction(_job(source, tmp_path, image_size=8, shard=shard, num_shards=2), progress=False)
    other = tmp_path / "other"
    run_extraction(_job(source, other, image_size=12, shard=1, num_shards=2), progress=False)
    with pytest.raises(MergeError, match="missing"):
        find_parts(tmp_path / "img.h5", 3)
    mixed = [hs.part_path(tmp_path / "img.h5", 0, 2), hs.part_path(other / "img.h5", 1, 2)]
    with pytest.raises(MergeError, match="image_size"):
        merge_parts(mixed, tmp_path / "mixed.h5", progress=False)
    assert not (tmp_path / "mixed.h5").exists()


def test_rerun_is_a_noop_and_other_settings_conflict(tmp_path):
    source = open_dataset("shapes", "val", num_images=5, native_size=16)
    job = _job(source, tmp_path, image_size=8, features_out={"trunk": tmp_path / "t.h5"}, encoder_name="tiny")
    run_extraction(job, lambda layers: FakeEncoder(), progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def must_not_load(layers):
        raise AssertionError("encoder loaded although everything was complete")

    summary = run_extraction(job, must_not_load, progress=False)
    assert summary.written == [] and len(summary.skipped) == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    with pytest.raises(FileExistsError, match="image_size"):
        run_extraction(_job(source, tmp_path, image_size=12), progress=False)


def test_killed_or_failing_run_leaves_no_complete_looking_file(tmp_path):
    source = open_dataset("shapes", "val", num_images=12, native_size=16)
    job = _job(source, tmp_path, image_size=8, features_out={"trunk": tmp_path / "t.h5"}, encoder_name="tiny")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_extraction(job, lambda layers: FakeEncoder(fail_after=1), batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []

    class NaNEncoder(FakeEncoder):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(FloatingPointError, match="NaN"):
        run_extraction(job, lambda layers: NaNEncoder(), batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_features_added_later_must_match_the_images_file(tmp_path):
    source = open_dataset("shapes", "val", num_images=6, native_size=16)
    run_extraction(_job(source, tmp_path, image_size=8), progress=False)
    job = _job(source, tmp_path, image_size=8, features_out={"trunk": tmp_path / "t.h5"}, encoder_name="tiny")
    summary = run_extraction(job, lambda layers: FakeEncoder(), progress=False)
    assert summary.written == [tmp_path / "t.h5"]
    hs.check_features_file(tmp_path / "t.h5", tmp_path / "img.h5")
    with h5py.File(tmp_path / "t.h5", "r+") as h5:
        h5.attrs["paths_sha256"] = "0" * 64
    with pytest.raises(hs.H5SchemaError, match="does not belong"):
        hs.check_features_file(tmp_path / "t.h5", tmp_path / "img.h5", deep=False)


def test_cli_sharded_extract_with_custom_encoder_then_merge(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    common = [
        "extract",
        "--dataset",
        "shapes",
        "--split",
        "val",
        "--num-images",
        "7",
        "--native-size",
        "24",
        "--image-size",
        "12",
        "--images-out",
        str(tmp_path / "img.h5"),
        "--encoder",
        "test_extract:tiny_net",
        "--features-out",
        f"trunk={tmp_path / 't.h5'}",
        f"head={tmp_path / 'h.h5'}",
        "--workers",
        "0",
        "--batch-size",
        "3",
        "--num-shards",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    for shard in ("0", "1"):
        assert cli_main([*common, "--shard", shard]) == 0
    assert cli_main([*common, "--shard", "1"]) == 0  # rerun: no-op
    for name in ("img.h5", "t.h5", "h.h5"):
        extra = ["--images", str(tmp_path / "img.h5")] if name != "img.h5" else []
        args = ["merge-extract", "--out", str(tmp_path / name), "--num-shards", "2", "--no-progress", *extra]
        assert cli_main([*args, "--delete-parts"]) == 0
        assert cli_main(args) == 0  # already merged, parts gone: no-op
    attrs = hs.check_features_file(tmp_path / "h.h5", tmp_path / "img.h5")
    assert attrs["num_images"] == 7 and attrs["dim"] == 4 and attrs["encoder"] == "test_extract:tiny_net"
    source = open_dataset("shapes", "val", num_images=7, native_size=24)
    with h5py.File(tmp_path / "t.h5") as h5:
        torch.testing.assert_close(
            torch.from_numpy(h5["features"][6]),
            _reference(source, 6, TinyNet())["trunk"],
            rtol=1e-5,
            atol=1e-5,
        )
    assert sorted(os.listdir(tmp_path)) == ["h.h5", "img.h5", "t.h5"]
    assert cli_main([*common, "--shard", "0"]) == 0  # merged already: shard reruns are no-ops too
    assert sorted(os.listdir(tmp_path)) == ["h.h5", "img.h5", "t.h5"]
    unsharded = list(common)
    unsharded[unsharded.index("--num-shards") + 1] = "1"
    assert cli_main(unsharded) == 0  # the merged files are what an unsharded run makes
    with pytest.raises(SystemExit, match="error: .*t.h5 exists with other settings .*input_norm_requested"):
        cli_main([*unsharded, "--input-norm", "imagenet"])


def test_cli_with_the_small_encoder_checkpoint(tmp_path):
    from rcdm import encoders
    from rcdm.io import sha256_file

    arch = {"widths": [4, 8], "blocks": 1, "stem_stride": 1, "head_dims": [8, 5]}
    trunk, head = encoders.build_small(arch)
    ckpt = tmp_path / "small.pt"
    torch.save({"format": encoders.SMALL_FORMAT, "arch": arch, "trunk": trunk.state_dict(),
                "head": head.state_dict(), "input_size": 16, "input_norm": "none"}, ckpt)  # fmt: skip
    args = ["extract", "--dataset", "shapes", "--split", "val", "--num-images", "5", "--native-size", "24",
            "--encoder", "small", "--encoder-checkpoint", str(ckpt),
            "--features-out", f"trunk={tmp_path / 't.h5'}",
            f"head={tmp_path / 'h.h5'}", "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    enc = encoders.load("small", ckpt, "head")
    source = open_dataset("shapes", "val", num_images=5, native_size=24)
    x = encoder_input(torch.from_numpy(center_crop_arr(source.load(4), 16))[None], "none")
    with h5py.File(tmp_path / "h.h5") as h5:
        assert h5.attrs["encoder_sha256"] == sha256_file(ckpt) and h5.attrs["dim"] == 5
        assert h5.attrs["input_size"] == 16 and h5["features"].shape == (5, 2, 5)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(h5["features"][4, 1]), enc(x.flip(-1))[0])


def test_features_are_fp32_by_default_and_bf16_only_when_asked(tmp_path):
    from rcdm import encoders

    arch = {"widths": [8, 16], "blocks": 1, "stem_stride": 1, "head_dims": [16, 8]}
    torch.manual_seed(0)
    trunk, head = encoders.build_small(arch)
    ckpt = tmp_path / "small.pt"
    torch.save({"format": encoders.SMALL_FORMAT, "arch": arch, "trunk": trunk.state_dict(),
                "head": head.state_dict(), "input_size": 16, "input_norm": "none"}, ckpt)  # fmt: skip
    base = ["extract", "--dataset", "shapes", "--split", "val", "--num-images", "6", "--native-size", "24",
            "--encoder", "small", "--encoder-checkpoint", str(ckpt), "--workers", "0", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert cli_main([*base, "--features-out", f"trunk={tmp_path / 'fp32.h5'}"]) == 0
    assert cli_main([*base, "--features-out", f"trunk={tmp_path / 'bf16.h5'}", "--precision", "bf16"]) == 0
    enc = encoders.load("small", ckpt, "trunk")
    source = open_dataset("shapes", "val", num_images=6, native_size=24)
    crops = np.stack([center_crop_arr(source.load(i), 16) for i in range(6)])
    with torch.no_grad():
        x = encoder_input(torch.from_numpy(crops), "none")
        expected = torch.stack([enc(x), enc(x.flip(-1))], dim=1).numpy()  # plain fp32 forward
    feats = {}
    for name in ("fp32", "bf16"):
        with h5py.File(tmp_path / f"{name}.h5") as h5:
            assert h5.attrs["precision"] == name
            feats[name] = h5["features"][:]
    np.testing.assert_allclose(feats["fp32"], expected, rtol=1e-5, atol=1e-6)
    # bf16 autocast is a different computation: off by far more than the fp32 tolerance, still close
    rel = np.linalg.norm(feats["bf16"] - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert rel.mean() > 1e-3 and rel.max() < 0.1
    # a file made at the other precision is not taken for the requested one
    with pytest.raises(SystemExit, match="precision"):  # one line, no traceback
        cli_main([*base, "--features-out", f"trunk={tmp_path / 'bf16.h5'}"])
    # the old opt-out still works (it asks for what is now the default), and cannot contradict --precision
    assert cli_main([*base, "--features-out", f"trunk={tmp_path / 'fp32.h5'}", "--no-autocast"]) == 0
    with pytest.raises(SystemExit, match="contradicts"):
        cli_main(
            [*base, "--features-out", f"trunk={tmp_path / 'x.h5'}", "--no-autocast", "--precision", "bf16"]
        )


def test_schema_writers_and_checks_name_each_problem(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    hs.write_images_file(tmp_path / "i.h5", images, labels=[0, 1, 1, 0], paths=list("abcd"))
    feats = rng.standard_normal((4, 2, 3)).astype(np.float32)
    hs.write_features_file(tmp_path / "f.h5", feats, paths=list("abcd"), attrs={"encoder": "x"})
    attrs = hs.check_features_file(tmp_path / "f.h5", tmp_path / "i.h5")
    assert attrs["dim"] == 3 and attrs["num_images"] == 4 and attrs["encoder"] == "x"
    assert hs.check_images_file(tmp_path / "i.h5")["image_size"] == 8

    hs.write_features_file(tmp_path / "other.h5", feats, paths=list("abce"))
    with pytest.raises(hs.H5SchemaError, match="does not belong"):
        hs.check_features_file(tmp_path / "other.h5", tmp_path / "i.h5")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        hs.check_images_file(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(hs.H5SchemaError, match="not a readable HDF5"):
        hs.check_images_file(tmp_path / "junk.h5")
    with pytest.raises(hs.H5SchemaError, match="kind"):
        hs.check_images_file(tmp_path / "f.h5")

    def broken(name, edit):
        path = tmp_path / name
        hs.write_features_file(path, feats, paths=list("abcd"))
        with h5py.File(path, "r+") as h5:
            edit(h5)
        return path

    with pytest.raises(hs.H5SchemaError, match="NaN"):
        hs.check_features_file(broken("nan.h5", lambda h5: h5["features"].__setitem__((2, 1, 0), np.nan)))
    with pytest.raises(hs.H5SchemaError, match="complete"):
        hs.check_features_file(broken("inc.h5", lambda h5: h5.attrs.__setitem__("complete", False)))
    with pytest.raises(hs.H5SchemaError, match="missing dataset 'features'"):
        hs.check_features_file(broken("miss.h5", lambda h5: h5.__delitem__("features")))
    with pytest.raises(hs.H5SchemaError, match="paths_sha256"):
        hs.check_features_file(broken("sha.h5", lambda h5: h5["paths"].__setitem__(0, "z")))
    with pytest.raises(ValueError, match="uint8"):
        hs.write_images_file(tmp_path / "bad.h5", images.astype(np.float32))
    assert hs.parse_part_path(hs.part_path(tmp_path / "x.h5", 3, 12)) == (tmp_path / "x.h5", 3, 12)
    assert [hs.shard_range(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_read_rows_equals_fancy_indexing_for_any_order(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((50, 2, 3)).astype(np.float32)
    hs.write_features_file(tmp_path / "f.h5", data)
    with h5py.File(tmp_path / "f.h5") as h5:
        for rows in ([7], [3, 4, 5, 9, 1, 1, 49, 0], rng.integers(0, 50, 40), []):
            np.testing.assert_array_equal(
                hs.read_rows(h5["features"], rows), data[np.asarray(rows, dtype=int)]
            )
        with pytest.raises(IndexError):
            hs.read_rows(h5["features"], [50])


def test_a_deleted_finished_shard_is_linked_back_from_its_kept_copy(tmp_path):
    """What the retry of a failed grouped job does (rcdm.finished): Snakemake deleted the finished shard's
    outputs; the rerun links them back from the keep folder without loading the encoder, and a kept copy
    made with other settings is dropped and the shard made again."""
    source = open_dataset("shapes", "val", num_images=6, native_size=16)
    keep = tmp_path / ".finished" / "run"
    features = {"trunk": tmp_path / "t.h5", "head": tmp_path / "h.h5"}
    kw = dict(image_size=8, features_out=features, encoder_name="tiny", shard=1, num_shards=2)
    job = _job(source, tmp_path, **kw)
    summary = run_extraction(job, lambda layers: FakePair(), progress=False, keep_finished=keep)
    assert len(summary.written) == 3
    for path in summary.written:
        assert os.path.samefile(path, finished.kept_path(path, keep))
        path.unlink()

    def must_not_load(layers):
        raise AssertionError("encoder loaded although the kept copies were complete")

    again = run_extraction(job, must_not_load, progress=False, keep_finished=keep)
    assert again.written == [] and sorted(again.skipped) == sorted(summary.written)
    for path in summary.written:
        assert os.path.samefile(path, finished.kept_path(path, keep))
        hs.check_file(path)

    images = hs.part_path(tmp_path / "img.h5", 1, 2)
    images.unlink()
    other = _job(source, tmp_path, image_size=12, shard=1, num_shards=2)  # another resolution
    redone = run_extraction(other, progress=False, keep_finished=keep)
    assert redone.written == [images] and hs.check_file(images)["image_size"] == 12
    assert os.path.samefile(images, finished.kept_path(images, keep))  # the new one is kept instead
    one = _job(source, tmp_path / "one", image_size=8, num_shards=1)
    run_extraction(one, progress=False, keep_finished=keep)  # one shard: nothing to restore, nothing kept
    assert not finished.kept_path(tmp_path / "one" / "img.h5", keep).exists()


def test_cli_shapes_style_is_drawn_recorded_and_guards_the_file(tmp_path, capsys):
    """`--shapes-*` draw the style asked for and record it; a rerun in another style is refused (the file
    holds other images), and a bad style or a style for another dataset fails as one line, writing nothing."""
    out = tmp_path / "images.h5"
    base = ["extract", "--dataset", "shapes", "--split", "val", "--num-images", "12", "--image-size", "16",
            "--images-out", str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    style = ["--shapes-kinds", "square", "cross", "--shapes-max-count", "1", "--shapes-rotation", "0"]
    assert cli_main([*base, *style]) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["shape_kinds"] == "square,cross" and f.attrs["max_count"] == 1
        assert f.attrs["max_rotation"] == 0.0 and f.attrs["primary_size_min"] == 0.3
        assert {KINDS[k] for k in f["factors/kind"][:]} == {"square", "cross"}
        assert set(f["factors/rotation"][:]) == {0.0} and set(f["factors/count"][:]) == {1}
    with pytest.raises(SystemExit, match="exists with other settings .*shape_kinds"):
        cli_main(base)  # the default style: other images than the file holds
    for bad, message in (
        ([*base[:-5], "--images-out", str(tmp_path / "b.h5"), "--shapes-kinds", "blob"], "kinds ['blob']"),
        (["extract", "--dataset", "photos", "--image-size", "16", "--images-out", str(tmp_path / "c.h5"),
          "--shapes-rotation", "0"], "--shapes-rotation set the shapes style; --dataset photos is not"),
    ):  # fmt: skip
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli_main(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.h5"]
