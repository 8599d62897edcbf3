import argparse
import hashlib
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rcdm.formats import hdf5
from rcdm.formats.metrics_csv import COLUMNS
from rcdm.formats.npz import write_npz
from rcdm.inception import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FIDInception,
    InceptionWeightsMissing,
    build_fid_inception_v3,
    load_inception,
)
from rcdm.metrics import RunningStats, frechet_distance, inception_score
from rcdm.scoring import evaluate, select_rows
from rcdm.stages import evaluate as ev_mod

SIZE, DIM, SMALL_INPUT = 16, 8, 75


def _random_inception_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = build_fid_inception_v3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # keep activations O(1) through the 94 conv layers
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    torch.save(_random_inception_state(), d / INCEPTION_FILE)
    return d


def _write_h5(path, kind: str, n: int, data: dict, attrs: dict) -> None:
    paths = [f"img{i:03d}.png" for i in range(n)]
    digest = hdf5.PathsDigest()
    digest.update(paths)
    with h5py.File(path, "w") as h5:
        for k, v in data.items():
            h5.create_dataset(k, data=v)
        hdf5.write_strings(h5, hdf5.PATHS, paths)
        base = {"kind": kind, "format_version": hdf5.FORMAT_VERSION, "num_images": n, "complete": True}
        hdf5.set_attrs(h5, {**base, "paths_sha256": digest.hexdigest(), **attrs})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """4 conditioning images, their features under a small encoder, and 8 'samples' made of those images."""
    from rcdm import encoders
    from rcdm.encoders import SMALL_FORMAT, build_small
    from rcdm.preprocess import center_crop_arr, encoder_input

    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8)
    _write_h5(
        root / "images.h5", "images", 4,
        {hdf5.IMAGES: images, hdf5.LABELS: np.full(4, -1, dtype=np.int64)},
        {"image_size": SIZE, "dataset": "toy", "split": "val"},
    )  # fmt: skip
    arch = {"widths": [8, 8], "blocks": 1, "stem_stride": 1, "head_dims": [16, DIM]}
    torch.manual_seed(1)
    trunk, head = build_small(arch)
    enc_path = root / "enc.pt"
    ckpt = {"format": SMALL_FORMAT, "arch": arch, "trunk": trunk.state_dict(), "head": head.state_dict()}
    torch.save({**ckpt, "input_size": 24}, enc_path)
    enc = encoders.load("small", enc_path, "head")
    crops = np.stack([center_crop_arr(Image.fromarray(im), 24) for im in images])
    with torch.inference_mode():
        emb = enc(encoder_input(torch.from_numpy(crops), enc.input_norm)).numpy()
    feats = np.stack([emb, emb[::-1]], axis=1)  # index 1 is unused by evaluation
    from rcdm.io import sha256_file

    _write_h5(
        root / "features.h5", "features", 4, {hdf5.FEATURES: feats.astype(np.float32)},
        {"dim": DIM, "encoder": "small", "layer": "head", "input_size": 24, "input_norm": "none",
         "encoder_sha256": sha256_file(enc_path), "images_file": str(root / "images.h5"),
         "dataset": "toy"},
    )  # fmt: skip
    # sample (c, 0) reproduces image c exactly; sample (c, 1) is image c+1: a wrong conditioning
    cond_index = np.repeat(np.arange(4), 2)
    sample_index = np.tile([0, 1], 4)
    src = cond_index + sample_index
    src[src == 4] = 0
    samples = images[src]
    settings = {"sampler": "ddim", "steps": 5, "num_steps": 5, "seed": 3, "eta": 0.0, "samples_per_image": 2,
                "dataset": "toy", "encoder": "small", "layer": "head",
                "encoder_sha256": "abc"}  # fmt: skip
    run_dir = root / "run1"
    write_npz(run_dir / "samples.npz", samples.shape, iter([(samples, cond_index, sample_index)]), settings)
    return {"root": root, "images": images, "emb": emb, "src": src, "cond_index": cond_index, "enc": enc_path,
            "samples": run_dir / "samples.npz"}  # fmt: skip


def _small_inception(weights_dir) -> FIDInception:
    inc = load_inception(weights_dir)
    inc.input_size = SMALL_INPUT
    return inc


# --- Inception network


def test_inception_equals_pytorch_fid_network(weights_dir, monkeypatch):
    import pytorch_fid.inception as pfi

    state = torch.load(weights_dir / INCEPTION_FILE, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    ref = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = load_inception(weights_dir)
    assert len(ours.weights_sha256) == 64
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        expect = ref(x)[0].flatten(1)
        pool, logits = ours(x)
    assert expect.abs().mean() > 1e-2  # a meaningful, non-vanishing comparison
    torch.testing.assert_close(pool, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, pool @ state["fc.weight"].T)
    assert logits.shape == (1, 1008)
    # at the small test resolution (no resize), too
    ref.resize_input = False
    ours.input_size = SMALL_INPUT
    x = torch.rand(2, 3, SMALL_INPUT, SMALL_INPUT)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x)[0], ref(x)[0].flatten(1), rtol=1e-4, atol=1e-5)


def test_missing_inception_file_names_file_and_url(tmp_path):
    with pytest.raises(InceptionWeightsMissing) as err:
        load_inception(tmp_path)
    assert INCEPTION_FILE in str(err.value) and INCEPTION_URL in str(err.value)
    (tmp_path / INCEPTION_FILE).write_bytes(b"")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / INCEPTION_FILE)
    with pytest.raises(ValueError, match="not the pytorch-fid Inception state dict"):
        load_inception(tmp_path)


# --- evaluation


def _fd_svd(x1: np.ndarray, x2: np.ndarray) -> float:
    """Frechet distance of the Gaussian fits of two small row sets, computed independently: with centred
    rows A1, A2, tr((s1^1/2 s2 s1^1/2)^1/2) = sum of singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)).
    """
    a1, a2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1), len(x2)
    tr = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = x1.mean(0) - x2.mean(0)
    return float(diff @ diff + (a1**2).sum() / (n1 - 1) + (a2**2).sum() / (n2 - 1) - 2 * tr)


def _expected(toy, inc):
    images, emb, src, cond_index = toy["images"], toy["emb"], toy["src"], toy["cond_index"]
    with torch.inference_mode():
        pool, logits = inc.embed_uint8(torch.from_numpy(images))
    pool, logits = pool.double().numpy(), logits.double().numpy()
    fid = _fd_svd(pool[src], pool)
    e = emb.astype(np.float64)
    s_emb = e[src]
    fd_rep = frechet_distance(s_emb.mean(0), np.cov(s_emb, rowvar=False), e.mean(0), np.cov(e, rowvar=False))
    assert fd_rep == pytest.approx(_fd_svd(s_emb, e), rel=1e-8, abs=1e-10)
    # brute-force ranks (cosine)
    sn = s_emb / np.linalg.norm(s_emb, axis=1, keepdims=True)
    cn = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = sn @ cn.T
    true = sim[np.arange(8), cond_index]
    ranks = 1 + (sim > true[:, None] + 1e-9).sum(1)
    return {"fid": fid, "fd_rep": fd_rep, "ranks": ranks, "is": inception_score(logits[src], splits=2)}


def test_evaluate_computes_every_metric_from_its_definition(toy, weights_dir):
    from rcdm import encoders

    inc = _small_inception(weights_dir)
    enc = encoders.load("small", toy["enc"], "head")
    ev = evaluate(
        toy["samples"], features=toy["root"] / "features.h5", encoder=enc, inception=inc,
        reference_images=toy["root"] / "images.h5", cache_dir=toy["root"] / "cache", is_splits=2,
        batch_size=3, workers=2, progress=False, with_precision_recall=True,
    )  # fmt: skip
    row = ev.row()
    exp = _expected(toy, inc)
    assert row["status"] == "ok"
    assert row["n_samples"] == 8 and row["n_reference"] == 4 and row["n_cond"] == 4
    assert row["fid"] == pytest.approx(exp["fid"], rel=1e-4)
    assert row["fid"] > 0
    assert (row["is_mean"], row["is_std"]) == pytest.approx(exp["is"], rel=1e-4)
    assert row["fd_rep"] == pytest.approx(exp["fd_rep"], rel=1e-4, abs=1e-6)
    ranks = exp["ranks"]
    assert (ranks[::2] == 1).all() and (ranks[1::2] >= 2).all()  # right conditioning first, wrong one not
    assert row["mean_rank"] == pytest.approx(ranks.mean())
    assert row["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert row["top1"] == pytest.approx(0.5)
    assert row["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert row["precision"] == 1.0 and row["recall"] == 1.0  # samples are reference images
    assert row["sampler"] == "ddim" and row["steps"] == 5 and row["inception_sha256"] == inc.weights_sha256
    assert len(list((toy["root"] / "cache").glob("fid_ref_*.npz"))) == 1


def test_n_fid_uses_a_seeded_random_subset_of_the_samples(toy, weights_dir):
    from rcdm import encoders

    inc = _small_inception(weights_dir)
    enc = encoders.load("small", toy["enc"], "head")
    row = evaluate(
        toy["samples"], features=toy["root"] / "features.h5", encoder=enc, inception=inc, n_fid=5,
        reference_images=toy["root"] / "images.h5", cache_dir=toy["root"] / "cache5", is_splits=2,
        batch_size=3, workers=2, progress=False,
    ).row()  # fmt: skip
    images, src = toy["images"], toy["src"]
    with torch.inference_mode():
        pool, logits = inc.embed_uint8(torch.from_numpy(images))
    pool, logits = pool.double().numpy(), logits.double().numpy()
    # the toy images are unlabelled (-1): a uniform draw, seed 0, as the docstring states
    rows = np.sort(np.random.default_rng(0).choice(8, size=5, replace=False))
    assert rows.tolist() != [0, 1, 2, 3, 4]
    assert row["n_fid"] == 5 and row["n_samples"] == 8
    assert row["fid_selection"] == "random" and row["fid_seed"] == 0 and row["fid_classes"] is None
    assert row["fid_rows_sha256"] == hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()[:16]
    assert row["fid"] == pytest.approx(_fd_svd(pool[src[rows]], pool), rel=1e-4)
    expected_is = inception_score(logits[src[rows]], splits=2)
    assert (row["is_mean"], row["is_std"]) == pytest.approx(expected_is, rel=1e-4)
    ranks = _expected(toy, inc)["ranks"]  # rank/MRR still use every sample
    assert row["mean_rank"] == pytest.approx(ranks.mean())
    # every reference image (no n_reference), recorded as such
    assert row["reference_selection"] == "all" and row["n_reference"] == 4
    assert (
        row["reference_rows_sha256"] == hashlib.sha256(np.arange(4).astype("<i8").tobytes()).hexdigest()[:16]
    )
    # another seed, another subset (and another FID)
    other = evaluate(
        toy["samples"], features=toy["root"] / "features.h5", inception=inc, n_fid=5, fid_seed=3,
        reference_images=toy["root"] / "images.h5", is_splits=2, batch_size=3, progress=False,
    ).row()  # fmt: skip
    rows3 = np.sort(np.random.default_rng(3).choice(8, size=5, replace=False))
    assert rows3.tolist() != rows.tolist() and other["fid_seed"] == 3
    assert other["fid"] == pytest.approx(_fd_svd(pool[src[rows3]], pool), rel=1e-4)


def test_select_rows_stratifies_by_largest_remainder():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(100)]
    for n_pick, counts in ((10, [5, 3, 2]), (7, [4, 2, 1]), (3, [1, 1, 1])):
        # exact shares 0.5/0.3/0.2 * n_pick; floors, then the largest remainders get the rest (3: 1.5/0.9/0.6)
        sel = select_rows(100, n_pick, seed=1, labels=labels)
        assert sel.method == "stratified" and len(sel.rows) == n_pick
        assert (np.diff(sel.rows) > 0).all()
        assert np.bincount(labels[sel.rows], minlength=3).tolist() == counts
    # equal remainders: the seed decides which class gets the extra row
    halves = np.repeat([0, 1], 50)
    extra = {int(np.argmax(np.bincount(halves[select_rows(100, 3, seed, halves).rows]))) for seed in range(8)}
    assert extra == {0, 1}
    a, b = select_rows(100, 10, 1, labels), select_rows(100, 10, 2, labels)
    assert a.rows.tolist() == select_rows(100, 10, 1, labels).rows.tolist()
    assert a.digest != b.digest and a.n_classes == 3
    # unlabelled rows are one more group; all -1 is a uniform draw
    mixed = np.where(np.arange(100) < 40, -1, labels)
    sel = select_rows(100, 10, 0, mixed)
    assert (mixed[sel.rows] == -1).sum() == 4
    uniform = select_rows(100, 10, 0, np.full(100, -1))
    assert uniform.method == "random" and uniform.n_classes is None
    assert uniform.rows.tolist() == sorted(np.random.default_rng(0).choice(100, 10, replace=False).tolist())
    assert select_rows(100, None, 0, labels).method == "all" and select_rows(5, 9, 0).rows.tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def _class_folder(root, sizes) -> None:
    """Class folders ``k<j>`` sorted by name (k0 ... k9), ``sizes[j]`` small photos each."""
    rng = np.random.default_rng(0)
    for j, size in enumerate(sizes):
        (root / f"k{j}").mkdir(parents=True)
        for i in range(size):
            base = rng.integers(0, 256, 3)
            noise = rng.integers(-40, 40, (20, 24, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
                root / f"k{j}" / f"{i:02d}.png"
            )


def test_fid_subsets_cover_every_class_of_a_class_per_folder_set_in_proportion(weights_dir, tmp_path):
    from rcdm import encoders
    from rcdm.cli import main

    sizes = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # 75 images; the first 40 samples would be 4 classes only
    _class_folder(tmp_path / "data", sizes)
    arch = {"widths": [4, 8], "blocks": 1, "stem_stride": 1, "head_dims": [8, 5]}
    trunk, head = encoders.build_small(arch)
    torch.save({"format": encoders.SMALL_FORMAT, "arch": arch, "trunk": trunk.state_dict(),
                "head": head.state_dict(), "input_size": 16}, tmp_path / "small.pt")  # fmt: skip
    images_file, features_file = tmp_path / "val.h5", tmp_path / "trunk.h5"
    assert main(["extract", "--dataset", str(tmp_path / "data"), "--split", "val", "--image-size", "16",
                 "--images-out", str(images_file), "--encoder", "small", "--encoder-checkpoint",
                 str(tmp_path / "small.pt"), "--features-out", f"trunk={features_file}", "--workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    with h5py.File(images_file) as h5:
        images = h5["images"][:]
        folder = np.array([int(p.split("/")[0][1:]) for p in hdf5.read_strings(h5["paths"])])
    assert np.bincount(folder).tolist() == sizes and (np.diff(folder) >= 0).all()  # sorted by folder
    # two samples per image, in conditioning order (each sample is its conditioning image)
    cond_index = np.repeat(np.arange(75), 2)
    samples = images[cond_index]
    npz = tmp_path / "run" / "samples.npz"
    write_npz(npz, samples.shape, iter([(samples, cond_index, np.tile([0, 1], 75))]),
              {"sampler": "ddim", "steps": 5, "samples_per_image": 2})  # fmt: skip
    inc = _small_inception(weights_dir)
    row = evaluate(
        npz, features=features_file, inception=inc, reference_images=images_file, n_fid=40, n_reference=30,
        is_splits=2, batch_size=16, progress=False,
    ).row()  # fmt: skip

    sample_rows = select_rows(150, 40, 0, folder[cond_index]).rows
    ref_rows = select_rows(75, 30, 1, folder).rows
    for sel, rows, share in (
        ("fid", sample_rows, 40 / 150),
        ("reference", ref_rows, 30 / 75),
    ):
        assert row[f"{sel}_selection"] == "stratified" and row[f"{sel}_classes"] == 10
        assert row[f"{sel}_rows_sha256"] == hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()[:16]
        per_image = 2 if sel == "fid" else 1
        counts = np.bincount(folder[rows // per_image], minlength=10)
        expected = share * per_image * np.array(sizes)
        assert (counts >= 1).all() and (np.abs(counts - expected) < 1).all(), (sel, counts, expected)
    assert (
        row["fid_seed"] == 0
        and row["reference_seed"] == 1
        and row["n_fid"] == 40
        and row["n_reference"] == 30
    )
    # the FID is that of exactly these samples against exactly these reference images
    with torch.inference_mode():
        pool = inc.embed_uint8(torch.from_numpy(images))[0].double().numpy()
    assert row["fid"] == pytest.approx(_fd_svd(pool[cond_index[sample_rows]], pool[ref_rows]), rel=1e-4)
    assert row["status"] == "fd_rep, rank: no encoder given"


def test_old_metrics_files_without_selection_columns_still_tabulate(tmp_path):
    from rcdm.cli import main
    from rcdm.formats.metrics_csv import read_metrics

    new = {c for c in COLUMNS if c.startswith(("fid_", "reference_"))}
    assert len(new) == 8
    old_columns = [c for c in COLUMNS if c not in new]
    values = {"run_id": "r", "dataset": "d", "encoder": "dino", "layer": "trunk", "sampler": "ddim",
              "steps": 5, "fid": 12.5, "status": "ok", "timestamp": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    pd.DataFrame([values], columns=old_columns).to_csv(tmp_path / "metrics.csv", index=False)
    df = read_metrics([tmp_path / "metrics.csv"])
    assert df.iloc[0]["fid"] == 12.5 and df[sorted(new)].isna().all().all()
    assert main(["tabulate", str(tmp_path / "metrics.csv"), "--out-dir", str(tmp_path / "tables")]) == 0
    assert "12.50" in (tmp_path / "tables" / "table1.md").read_text()


def test_cli_writes_metrics_csv_and_reuses_reference_cache(toy, weights_dir, monkeypatch, tmp_path):
    import rcdm.inception

    real = rcdm.inception.load_inception
    monkeypatch.setattr(rcdm.inception, "load_inception", lambda *a, **k: _inception_small(real(*a, **k)))
    parser = argparse.ArgumentParser()
    ev_mod.add_arguments(parser)
    argv = [
        "--samples", str(toy["samples"]), "--out", str(tmp_path / "metrics.csv"), "--weights-dir",
        str(weights_dir), "--reference-images", str(toy["root"] / "images.h5"), "--features",
        str(toy["root"] / "features.h5"), "--encoder-checkpoint", str(toy["enc"]), "--is-splits", "2",
        "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert ev_mod.run(parser.parse_args(argv)) == 0
    first = pd.read_csv(tmp_path / "metrics.csv")
    assert list(first.columns) == list(COLUMNS) and len(first) == 1
    r = first.iloc[0]
    assert (
        r["run_id"] == "run1" and r["dataset"] == "toy" and r["encoder"] == "small" and r["layer"] == "head"
    )
    assert r["status"] == "ok" and r["fid"] > 0 and r["mrr"] > 0.5
    # second run: reference statistics come from the cache (no reference images pass)
    cached = list((tmp_path / "cache").glob("fid_ref_*.npz"))
    assert len(cached) == 1
    calls = []
    orig = RunningStats.update
    monkeypatch.setattr(RunningStats, "update", lambda self, x: (calls.append(len(x)), orig(self, x))[1])
    ev_mod.run(parser.parse_args(argv))
    assert sum(calls) == 8 + 8  # Inception and encoder statistics of the 8 samples only
    second = pd.read_csv(tmp_path / "metrics.csv")
    assert second.iloc[0]["fid"] == pytest.approx(r["fid"], rel=1e-5)


def _inception_small(inc: FIDInception) -> FIDInception:
    inc.input_size = SMALL_INPUT
    return inc


def test_missing_inception_and_encoder_leave_metrics_empty_with_reasons(toy, tmp_path):
    parser = argparse.ArgumentParser()
    ev_mod.add_arguments(parser)
    argv = [
        "--samples", str(toy["samples"]), "--out", str(tmp_path / "m.csv"), "--weights-dir", str(tmp_path),
        "--reference-images", str(toy["root"] / "images.h5"), "--features", str(toy["root"] / "features.h5"),
        "--device", "cpu", "--no-progress", "--run-id", "r",
    ]  # fmt: skip
    ev_mod.run(parser.parse_args(argv))
    r = pd.read_csv(tmp_path / "m.csv").iloc[0]
    assert np.isnan(r["fid"]) and np.isnan(r["is_mean"]) and np.isnan(r["mrr"]) and np.isnan(r["fd_rep"])
    assert INCEPTION_FILE in r["status"] and INCEPTION_URL in r["status"]
    assert "--encoder-checkpoint" in r["status"]
    assert r["n_cond"] == 4 and r["chance_mrr"] == pytest.approx(25 / 48)  # needs no network
    # with the encoder but still without Inception: faithfulness metrics are computed, FID stays empty
    ev_mod.run(parser.parse_args(argv + ["--encoder-checkpoint", str(toy["enc"])]))
    r = pd.read_csv(tmp_path / "m.csv").iloc[0]
    assert np.isnan(r["fid"]) and r["top1"] == pytest.approx(0.5) and r["fd_rep"] >= 0
    assert r["status"].startswith("fid, is:")
    assert r["encoder"] == "small"  # the encoder's kind, unless the configured name is given:
    ev_mod.run(parser.parse_args(argv + ["--encoder-checkpoint", str(toy["enc"]), "--encoder-name", "demo"]))
    assert pd.read_csv(tmp_path / "m.csv").iloc[0]["encoder"] == "demo"


def test_wrong_encoder_file_is_refused(toy, tmp_path, capsys):
    other = tmp_path / "other.pt"
    ckpt = torch.load(toy["enc"], weights_only=True)
    ckpt["trunk"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["trunk"].items()}
    torch.save(ckpt, other)
    parser = argparse.ArgumentParser()
    ev_mod.add_arguments(parser)
    argv = [
        "--samples", str(toy["samples"]), "--out", str(tmp_path / "m.csv"), "--weights-dir", str(tmp_path),
        "--features", str(toy["root"] / "features.h5"), "--encoder-checkpoint", str(other), "--no-progress",
    ]  # fmt: skip
    assert ev_mod.run(parser.parse_args(argv)) == 2
    assert "not the encoder file the features were extracted with" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_samples_file_problems_are_clear(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="samples file not found"):
        evaluate(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        evaluate(bad)
    assert json.loads(str(np.load(toy["samples"])["settings_json"]))["sampler"] == "ddim"


def test_truncated_input_is_one_line_naming_the_file_and_the_fix(toy, tmp_path, capsys):
    """(The missing and broken inputs of every stage: tests/test_file_errors.py.)"""
    from rcdm.cli import main

    data = (toy["root"] / "features.h5").read_bytes()
    (tmp_path / "f.h5").write_bytes(data[: len(data) // 2])
    argv = [
        "evaluate", "--samples", str(toy["samples"]), "--out", str(tmp_path / "m.csv"), "--weights-dir",
        str(tmp_path), "--features", str(tmp_path / "f.h5"), "--encoder-checkpoint", str(toy["enc"]),
        "--no-progress",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    from rcdm.errors import REMAKE

    assert len(err) == 1 and err[0] == (
        f"rcdm evaluate: error: {tmp_path / 'f.h5'}: not a readable HDF5 file (Unable to synchronously open "
        f"file (truncated file: eof = {len(data) // 2}, sblock->base_addr = 0, stored_eof = {len(data)})); "
        f"{REMAKE}"
    )
    assert not (tmp_path / "m.csv").exists()
