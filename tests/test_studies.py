"""The studies (`rcdm study NAME`): their maths on closed-form cases, and each study end to end on a tiny
random RCDM model, a tiny `small` encoder and a few 16 px shapes images written by the real `rcdm extract`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import probe
from rcdm.cli import main
from rcdm.formats import hdf5
from rcdm.representations import cosine_distance, encoder_forward
from rcdm.shapes import COLOURS
from rcdm.stages.study import adversarial, augment, common, interpolate, manipulate
from rcdm.study_images import factor_names_of, to_unit

SIZE = 16
N_IMAGES = 6


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Encoder, trunk and head RCDM checkpoints (random weights), images and features files, a probe."""
    from rcdm.encoders import SMALL_FORMAT, build_small
    from rcdm.factory import create_model_and_diffusion

    root = tmp_path_factory.mktemp("study_assets")
    torch.manual_seed(0)
    arch = {"widths": [8, 16], "blocks": 1, "stem_stride": 1, "head_dims": [16, 8]}
    trunk, head = build_small(arch)
    enc = root / "enc.pt"
    torch.save(
        {
            "format": SMALL_FORMAT,
            "arch": arch,
            "trunk": trunk.state_dict(),
            "head": head.state_dict(),
            "input_size": SIZE,
        },
        enc,
    )
    paths = {"enc": enc, "root": root}
    for layer, dim, seed in (("trunk", 16, 1), ("head", 8, 2)):
        flags = dict(
            image_size=SIZE,
            num_channels=32,
            num_res_blocks=1,
            channel_mult="1,2",
            attention_resolutions="8",
            num_heads=1,
            learn_sigma=True,
            diffusion_steps=100,
            ssl_dim=dim,
        )
        model, _ = create_model_and_diffusion(**flags)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # ADM zero-initialises output layers: randomise all so conditioning matters
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        paths[f"rcdm_{layer}"] = root / f"rcdm_{layer}.pt"
        torch.save(model.state_dict(), paths[f"rcdm_{layer}"])
        paths[f"flags_{layer}"] = root / f"flags_{layer}.json"
        paths[f"flags_{layer}"].write_text(json.dumps(flags))
    for name in ("images", "trunk", "head"):
        paths[name] = root / f"{name}.h5"
    main(
        ["extract", "--dataset", "shapes", "--split", "val", "--num-images", str(N_IMAGES), "--native-size",
         str(SIZE), "--image-size", str(SIZE), "--images-out", str(paths["images"]), "--encoder", "small",
         "--encoder-checkpoint", str(enc), "--features-out", f"trunk={paths['trunk']}",
         f"head={paths['head']}", "--workers", "0", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    probe_dir = root / "probe"
    main(
        ["study", "probe", "--dataset", "shapes", "--num-images", "300", "--num-val-images", "60",
         "--image-size", str(SIZE), "--steps", "20", "--width", "8", "--out", str(probe_dir), "--no-progress"]
    )  # fmt: skip
    paths["probe"] = probe_dir / "probe.pt"
    return paths


CLASS_SIZES = [4 + k for k in range(10)]  # class k (folder "class_k") holds 4 + k images: 85 in all


@pytest.fixture(scope="session")
def class_folder(assets, tmp_path_factory) -> dict[str, Path]:
    """A class-per-folder image set (10 classes sorted by folder name, unequal sizes), extracted by the real
    `rcdm extract` into an images file (labels = folder index) and a trunk features file."""
    root = tmp_path_factory.mktemp("class_folder")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for k, size in enumerate(CLASS_SIZES):
        (folder / f"class_{k}").mkdir(parents=True)
        for j in range(size):
            pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{k}" / f"img_{j:03d}.png")
    out = {"folder": folder, "images": root / "images.h5", "trunk": root / "trunk.h5"}
    main(
        ["extract", "--dataset", str(folder), "--split", "val", "--image-size", str(SIZE), "--images-out",
         str(out["images"]), "--encoder", "small", "--encoder-checkpoint", str(assets["enc"]),
         "--features-out", f"trunk={out['trunk']}", "--workers", "0", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    return out


def _common(a: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(a["rcdm_trunk"]), "--model-flags", str(a["flags_trunk"]), "--encoder", "small",
        "--encoder-checkpoint", str(a["enc"]), "--images", str(a["images"]), "--features", str(a["trunk"]),
        "--sampler", "ddim", "--steps", "4", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.width > 64 and im.height > 64


def _context(a: dict[str, Path], tmp_path: Path, *extra: str) -> common.StudyContext:
    import argparse

    parser = argparse.ArgumentParser()
    interpolate.add_arguments(parser)
    args = parser.parse_args(_common(a, tmp_path, *extra))
    return common.StudyContext.from_args(args)


# ------------------------------------------------------------------------------------------ closed forms


def test_lerp_and_slerp_closed_form():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    t = torch.tensor([0.0, 0.5, 1.0])
    lin = interpolate.lerp(a, b, t)
    assert torch.equal(lin[0], a) and torch.equal(lin[2], b)
    assert torch.allclose(lin[1], torch.tensor([0.5, 1.0]))
    sph = interpolate.slerp(a, b, t)
    assert torch.equal(sph[0], a) and torch.equal(sph[2], b)
    # halfway: direction at 45 degrees, norm halfway between 1 and 2
    assert torch.allclose(sph[1], 1.5 * torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    # the angle grows linearly with t along the great circle
    ts = torch.linspace(0, 1, 7)
    path = interpolate.slerp(a, b, ts)
    angles = torch.atan2(path[:, 1], path[:, 0])
    assert torch.allclose(angles, ts * math.pi / 2, atol=1e-5)
    # parallel vectors fall back without NaN
    assert torch.isfinite(interpolate.slerp(a, 3 * a, t)).all()


def test_nearest_neighbours_equal_brute_force(tmp_path):
    g = torch.Generator().manual_seed(0)
    db = torch.randn(1000, 12, generator=g)
    q = torch.randn(5, 12, generator=g)
    sims, idx = manipulate.nearest_neighbours(q, db, 7, block_size=64)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(db, dim=1).T
    ref = torch.argsort(full, dim=1, descending=True)[:, :7]
    assert torch.equal(idx, ref)
    assert torch.allclose(sims, torch.gather(full, 1, ref), atol=1e-6)
    # streamed from a features file in blocks: the same answer
    path = tmp_path / "f.h5"
    hdf5.write_features_file(path, torch.stack([db, -db], 1).numpy())
    s2, i2 = manipulate.nearest_neighbours(q, manipulate.h5_feature_blocks(path, block_size=100), 7)
    assert torch.equal(i2, ref)
    assert torch.allclose(s2, sims, atol=1e-6)
    with pytest.raises(ValueError, match="only 1000 vectors"):
        manipulate.nearest_neighbours(q, db, 1001)


def test_shared_dimensions_and_manipulation():
    neigh = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.5, 0.0], [1.0, 4.0, 0.0, 0.0]])
    dims = manipulate.shared_dimensions(neigh, n_common=1)  # active in more than 1 of 3 neighbours
    assert dims.tolist() == [0, 2]
    assert manipulate.shared_dimensions(neigh, n_common=1, threshold=0.9).tolist() == [0]
    feat, target = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([9.0, 8.0, 7.0, 6.0])
    zeroed, replaced = manipulate.manipulate(feat, target, dims)
    assert zeroed.tolist() == [0.0, 2.0, 0.0, 4.0]
    assert replaced.tolist() == [9.0, 2.0, 7.0, 4.0]
    assert feat.tolist() == [1.0, 2.0, 3.0, 4.0]
    # a database smaller than --neighbours: all of it, with n_common scaled by the same ratio
    assert manipulate.effective_neighbours(100, 20, 14) == (20, 14)
    assert manipulate.effective_neighbours(10, 20, 14) == (10, 7)


def test_stratified_draw_covers_classes_in_proportion():
    from rcdm.subsets import stratified_draw

    labels = np.repeat(np.arange(10), CLASS_SIZES)  # sorted by class, like a class-per-folder dataset
    for n in (17, 40):
        drawn = stratified_draw(labels, n, seed=3)
        assert len(drawn) == n and len(set(drawn.tolist())) == n
        counts = np.bincount(labels[drawn], minlength=10)
        expected = n * np.asarray(CLASS_SIZES) / len(labels)
        assert (np.abs(counts - expected) < 1).all(), (counts, expected)
        # round robin over the classes: consecutive images (the studies' pairs) are of different classes
        assert len(set(labels[drawn[:10]].tolist())) == 10
        assert (labels[drawn][:-1] != labels[drawn][1:]).all()
    assert np.array_equal(stratified_draw(labels, 17, seed=3), stratified_draw(labels, 17, seed=3))
    assert not np.array_equal(stratified_draw(labels, 17, seed=3), stratified_draw(labels, 17, seed=4))
    # fewer images than classes: distinct classes; equal classes are picked at random, not the first ones
    equal = np.repeat(np.arange(100), 5)
    picked = [np.sort(equal[stratified_draw(equal, 8, seed=s)]) for s in range(3)]
    assert all(len(set(p.tolist())) == 8 for p in picked) and not np.array_equal(picked[0], picked[1])
    # unlabelled (-1 everywhere): a plain seeded random draw over the whole set
    unlabelled = stratified_draw(np.full(1000, -1), 10, seed=0)
    assert len(set(unlabelled.tolist())) == 10 and unlabelled.max() >= 100
    assert sorted(stratified_draw(np.full(5, -1), 10, seed=0).tolist()) == [0, 1, 2, 3, 4]


def test_augmentations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    assert torch.equal(augment.augment(augment.augment(x, "flip", 1.0), "flip", 1.0), x)
    gray = augment.augment(x, "grayscale", 1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    sol = augment.augment(x, "solarize", 1.0)
    assert torch.equal(sol, torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(augment.augment(x, "solarize", 0.5), torch.where(x >= 0.75, 1 - x, x))
    for name in augment.AUGMENTATIONS:
        for s in (0.5, 1.0):
            y1 = augment.augment(x, name, s, torch.Generator().manual_seed(3))
            y2 = augment.augment(x, name, s, torch.Generator().manual_seed(3))
            assert y1.shape == x.shape and torch.equal(y1, y2), name
            assert float(y1.min()) >= 0 and float(y1.max()) <= 1, name
            assert not torch.allclose(y1, x), name
    # translate moves a square by 0.25 of the side; scale changes its area by 2^(+-1); hue turns red to cyan
    sq = torch.zeros(1, 3, 32, 32)
    sq[:, 0, 12:20, 12:20] = 1.0
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def centre(img):
        m = img[0, 0]
        return torch.stack([(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()])

    moved = augment.augment(sq, "translate", 1.0, torch.Generator().manual_seed(0))
    assert math.isclose(float((centre(moved) - centre(sq)).norm()), 8.0, abs_tol=0.3)
    area = float(augment.augment(sq, "scale", 1.0, torch.Generator().manual_seed(0))[0, 0].sum())
    assert min(abs(area / 64 - 2), abs(area / 64 - 0.5)) < 0.1
    cyan = augment.augment(sq, "hue", 1.0, torch.Generator().manual_seed(0))[0, :, 16, 16]
    assert torch.allclose(cyan, torch.tensor([0.0, 1.0, 1.0]), atol=1e-3)
    # blur smooths: lower total variation, same mean (reflect padding)
    blur = augment.augment(x, "blur", 1.0)
    assert (blur.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()).item()
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.augment(x, "warp", 1.0)


def test_pgd_stays_in_ball_and_moves_representation(assets):
    from rcdm.encoders import load

    enc = load("small", assets["enc"], "trunk")
    with h5py.File(assets["images"]) as f:
        x = to_unit(f["images"][:4])
    eps = 4 / 255
    forward = lambda z: encoder_forward(enc, z)  # noqa: E731
    adv = adversarial.pgd_linf(forward, x, eps, steps=10, generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    rnd = adversarial.random_sign(x, eps, torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0, fa, fr = forward(x), forward(adv), forward(rnd)
    d_adv, d_rnd = cosine_distance(fa, f0), cosine_distance(fr, f0)
    assert (d_adv > 0).all() and (d_adv > 2 * d_rnd).all()
    assert not any(p.grad is not None for p in enc.parameters())


def _shapes(split: str, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, dict, dict]:
    """``n`` shapes images of ``split`` rendered as `rcdm extract` stores them (64 px, centre-cropped)."""
    from rcdm.preprocess import center_crop_arr
    from rcdm.shapes import ShapesSource

    src = ShapesSource(split, n, seed=seed, size=64)
    images = np.stack([center_crop_arr(src.load(i), size) for i in range(n)])
    factors = {k: np.asarray([src.factors(i)[k] for i in range(n)]) for k in src.factor_specs}
    return images, factors, factor_names_of(src)


@pytest.mark.parametrize("size", [16, 32])
def test_probe_pixel_measurements_are_exact_on_rendered_shapes(size):
    """Colour, size and position are measured from pixels: on real validation images (distractors
    included) at least 98 % keep their recorded factors; single-shape images are measured nearly exactly."""
    images, factors, names = _shapes("val", 200, size, seed=1)
    net = probe.FactorProbe(
        probe.make_specs(names["kind"], names["colour"]),
        [[c / 255 for c in v] for v in COLOURS.values()],
        size,
    )
    got, truth = net.measure(to_unit(images)), net.truth(factors)
    hit = net.matches(got, truth)
    for name in ("colour", "size", "position"):
        assert float(hit[name].float().mean()) >= 0.98, name
    single = torch.as_tensor(factors["count"] == 1)
    assert single.sum() > 60
    rel = (got["size"] / truth["size"] - 1).abs()[single]
    dist = torch.hypot(got["x"] - truth["x"], got["y"] - truth["y"])[single]
    assert float(rel.median()) < 0.02 and float(rel.max()) < 0.06
    assert float(dist.max()) < 0.02 * 16 / size + 0.01  # about a third of a pixel
    assert bool((got["colour"][single] == truth["colour"][single]).all())
    # a blurred shape (a sample's soft edges) keeps its colour, centre and size
    import torchvision.transforms.v2.functional as TF

    blurred = net.matches(net.measure(TF.gaussian_blur(to_unit(images), [5, 5], [0.6, 0.6])), truth)
    assert all(float(blurred[name].float().mean()) >= 0.97 for name in ("colour", "size", "position"))
    # nothing to find: nothing is kept
    blank = net.measure(torch.full((2, 3, size, size), 0.5))
    assert not blank["found"].any() and (blank["kind"] == -1).all()
    assert not any(
        v.any() for v in net.matches(blank, net.truth({k: v[:2] for k, v in factors.items()})).values()
    )


def test_probe_kind_classifier_on_real_validation_images(tmp_path):
    """The kind classifier, trained on training-split silhouettes, scores >= 95 % on REAL validation images;
    the report, the file round trip and keep_fractions agree; forward is differentiable (attacks use it)."""
    images, factors, names = _shapes("train", 1000, 32)
    val, val_factors, _ = _shapes("val", 300, 32, seed=1)
    net = probe.train_probe(images, factors, names, steps=250, progress=False)
    report = probe.accuracy_report(
        net,
        val,
        val_factors,
        train_images=images[:300],
        train_factors={k: v[:300] for k, v in factors.items()},
    )
    acc = {r["factor"]: r for r in report}
    assert list(acc) == ["kind", "colour", "size", "position"]
    for name, r in acc.items():
        assert r["val_accuracy"] >= 0.95, (name, r["val_accuracy"])
        assert r["val_accuracy_blurred"] >= 0.93, (name, r["val_accuracy_blurred"])  # soft edges, at 32 px
        assert r["n_val"] == 300 and r["image_size"] == 32
    assert math.isclose(acc["kind"]["chance"], 1 / 6, abs_tol=0.02)
    assert math.isclose(acc["colour"]["chance"], 1 / 8, abs_tol=0.02)
    assert 0 < acc["position"]["chance"] < 0.25 and 0 < acc["size"]["chance"] < 0.5
    probe.save_probe(net, tmp_path / "p.pt", report)
    loaded = probe.load_probe(tmp_path / "p.pt")
    assert loaded.accuracy == {k: r["val_accuracy"] for k, r in acc.items()}
    x = to_unit(val)
    a, b = net.measure(x), loaded.measure(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = probe.keep_fractions(loaded, x[:, None], val_factors)
    assert math.isclose(float(keep["kind"].float().mean()), acc["kind"]["val_accuracy"], abs_tol=1e-6)
    assert all(bool(v.all()) for v in probe.agreement(loaded, x[:20], x[:20]).values())
    xg = x[:4].clone().requires_grad_(True)
    logits = loaded(xg)
    assert set(logits) == {"kind", "colour"} and logits["kind"].shape == (4, 6)
    logits["kind"].logsumexp(1).sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="not a factor probe"):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        probe.load_probe(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------ end to end


def test_conditioned_and_resume(assets, tmp_path):
    out = tmp_path / "cond"
    assert main(["study", "conditioned", *_common(assets, out, "--num-images", "3", "--samples", "2")]) == 0
    _check_png(out / "conditioned.png")
    rows = _read_csv(out / "conditioned.csv")
    assert len(rows) == 6
    assert {"image", "sample", "cos_dist_to_cond", "rank", "image_pixel_spread", "image_rep_spread"} <= set(
        rows[0]
    )
    assert all(1 <= int(r["rank"]) <= 3 and float(r["cos_dist_to_cond"]) >= 0 for r in rows)
    assert float(rows[0]["image_pixel_spread"]) > 0
    # a rerun with the same settings is skipped; another setting recomputes
    stamp = (out / "conditioned.csv").stat().st_mtime_ns
    assert main(["study", "conditioned", *_common(assets, out, "--num-images", "3", "--samples", "2")]) == 0
    assert (out / "conditioned.csv").stat().st_mtime_ns == stamp
    assert main(["study", "conditioned", *_common(assets, out, "--num-images", "2", "--samples", "2")]) == 0
    assert len(_read_csv(out / "conditioned.csv")) == 4
    # with the probe: whether each sample keeps each factor, the probe's validation accuracy beside it
    args = _common(
        assets, tmp_path / "condp", "--num-images", "2", "--samples", "2", "--probe", str(assets["probe"])
    )
    assert main(["study", "conditioned", *args]) == 0
    acc = {r["factor"]: r["val_accuracy"] for r in _read_csv(assets["root"] / "probe" / "probe.csv")}
    for r in _read_csv(tmp_path / "condp" / "conditioned.csv"):
        assert all(r[f"{f}_keep"] in ("0", "1") and r[f"{f}_probe_acc"] == acc[f] for f in acc)
    # a changed input file (same path) is not a finished run either
    flags = tmp_path / "flags.json"
    flags.write_text(assets["flags_trunk"].read_text())
    args = [*_common(assets, out, "--num-images", "2", "--samples", "2"), "--model-flags", str(flags)]
    assert main(["study", "conditioned", *args]) == 0
    stamp = (out / "conditioned.csv").stat().st_mtime_ns
    assert main(["study", "conditioned", *args]) == 0
    assert (out / "conditioned.csv").stat().st_mtime_ns == stamp
    flags.write_text(assets["flags_trunk"].read_text() + " ")
    assert main(["study", "conditioned", *args]) == 0
    assert (out / "conditioned.csv").stat().st_mtime_ns != stamp


def test_interpolation_endpoints_equal_pure_samples(assets, tmp_path):
    ctx = _context(assets, tmp_path, "--samples", "2")
    feats = ctx.clean_features()
    t = torch.linspace(0, 1, 3)
    conds, samples, meta = interpolate.interpolation_samples(
        ctx, feats, [(0, 1)], ["linear", "spherical"], t, 2
    )
    pure = ctx.repeat_samples(feats[[0, 1]], 2)
    for r, (_, _, _, _, s, n) in enumerate(meta):
        if s == 0:
            assert torch.allclose(samples[r], pure[n], atol=1e-5)
        if s == 2:
            assert torch.allclose(samples[r], pure[2 + n], atol=1e-5)
    # the middle differs from both ends: the representation drives the sample
    mid = [r for r, m in enumerate(meta) if m[4] == 1 and m[5] == 0][0]
    assert not torch.allclose(samples[mid], pure[0], atol=1e-3)

    out = tmp_path / "interp"
    assert main(["study", "interpolate", *_common(assets, out, "--steps-between", "3")]) == 0
    _check_png(out / "interpolate.png")
    rows = _read_csv(out / "interpolate.csv")
    assert len(rows) == 2 * 3
    for r in rows:
        if float(r["t"]) == 0:
            assert float(r["cond_cos_dist_a"]) < 1e-6
        if float(r["t"]) == 1:
            assert float(r["cond_cos_dist_b"]) < 1e-6


def test_augment_with_probe(assets, tmp_path):
    out = tmp_path / "aug"
    args = _common(
        assets, out, "--augmentations", "flip,grayscale", "--strengths", "1", "--probe", str(assets["probe"])
    )
    assert main(["study", "augment", *args]) == 0
    _check_png(out / "augment.png")
    _check_png(out / "augment_invariance.png")
    rows = _read_csv(out / "augment.csv")  # per condition, invariance over all 6 images in both spaces
    assert [r["augmentation"] for r in rows] == ["none", "flip", "grayscale"]
    assert all(r["ref_images"] == "6" and r["sampled_images"] == "2" for r in rows)
    for space in ("trunk", "head"):
        assert float(rows[0][f"invariance_{space}_median"]) == 0
        assert all(float(r[f"invariance_{space}_median"]) > 0 for r in rows[1:])
    per_image = _read_csv(out / "augment_images.csv")
    assert len(per_image) == 2 * 3  # 2 sampled images x (clean + 2 augmentations)
    acc = {r["factor"]: r["val_accuracy"] for r in _read_csv(assets["root"] / "probe" / "probe.csv")}
    for name in ("kind", "colour", "size", "position"):
        assert all(float(r[f"{name}_keep"]) in (0.0, 0.5, 1.0) for r in per_image)
        assert all(r[f"{name}_probe_acc"] == acc[name] for r in per_image + rows)
        # the summary's keep-rate is the mean over the sampled images
        for r in rows:
            mine = [float(x[f"{name}_keep"]) for x in per_image if x["augmentation"] == r["augmentation"]]
            assert math.isclose(float(r[f"{name}_keep"]), np.mean(mine), abs_tol=1e-5)
    # the ratio: distance to the augmented copy in units of the median distance between two images
    from rcdm.encoders import load
    from rcdm.representations import encode_inputs

    with h5py.File(assets["images"]) as f:
        x = to_unit(f["images"][:])
    for space in ("trunk", "head"):
        enc = load("small", assets["enc"], space)
        f0, f1 = encode_inputs(enc, x), encode_inputs(enc, x.flip(-1))
        d = (f1 - f0).norm(dim=1) / torch.pdist(f0).median()
        assert math.isclose(float(rows[1][f"invariance_{space}_median"]), float(d.median()), rel_tol=1e-4)


def test_invariance_ratio_reads_the_same_in_any_space():
    """normalised_distance: the same geometry at any scale and dimension gives the same ratios; two
    different images are one typical distance apart (median over pairs = 1)."""
    from rcdm.representations import normalised_distance, typical_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=g)
    b = a + 0.1 * torch.randn(40, 8, generator=g)
    big = torch.randn(8, 2048, generator=g)  # a linear map with near-orthogonal rows, scaled up
    r1 = normalised_distance(a, b, typical_distance(a))
    r2 = normalised_distance(1000 * a @ big, 1000 * b @ big, typical_distance(1000 * a @ big))
    assert torch.allclose(r1, r2, rtol=0.15) and 0.02 < float(r1.median()) < 0.2
    pairs = torch.combinations(torch.arange(40), 2)
    ratio = normalised_distance(a[pairs[:, 0]], a[pairs[:, 1]], typical_distance(a))
    assert math.isclose(float(ratio.median()), 1.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        typical_distance(a[:1])


def test_adversarial(assets, tmp_path):
    out = tmp_path / "adv"
    args = _common(assets, out, "--num-images", "2", "--samples", "2", "--classifier", str(assets["probe"]))
    assert main(["study", "adversarial", *args]) == 0
    _check_png(out / "adversarial.png")
    rows = [r for r in _read_csv(out / "adversarial.csv") if r["attack"] == "representation"]
    assert len(rows) == 2  # (the classifier attack's rows: tests/test_adversarial.py)
    for r in rows:
        assert float(r["linf"]) <= 4 / 255 + 1e-6
        assert float(r["rep_cos_dist_adv"]) > float(r["rep_cos_dist_random"])
        assert 0 <= float(r["sample_pixel_l1"]) <= 1
        assert -1 <= float(r["sample_rep_cos_sim"]) <= 1 + 1e-6
        assert 0 <= int(r["class_clean"]) < 6 and r["class_flipped"] in ("0", "1")  # six shapes kinds
        assert int(r["class_flipped"]) == int(r["class_clean"] != r["class_adv"])


def test_active_threshold():
    relu = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]])
    dense = torch.tensor([[-0.5, 2.0, 1.0], [3.0, -0.1, 0.25], [2.5, 0.2, -0.05]])
    assert manipulate.active_threshold(relu, "auto") == 0.0  # exact zeros: the published "non-zero"
    assert manipulate.active_threshold(dense, "auto") == pytest.approx(0.5)  # the median |value|
    assert manipulate.active_threshold(dense, 0.3) == 0.3
    with pytest.raises(ValueError, match="no exact zeros.*--layer trunk"):
        manipulate.active_threshold(dense, 0.0)
    # the degenerate case it prevents: with threshold 0 every dense dimension is shared
    assert manipulate.shared_dimensions(dense, 1, 0.0).tolist() == [0, 1, 2]
    assert manipulate.shared_dimensions(dense, 1, 0.5).tolist() == [0]


def _manipulate(assets, out: Path, *extra: str) -> list[dict[str, str]]:
    args = _common(assets, out, "--neighbours", "4", "--n-common", "2", "--samples", "1", *extra)
    assert main(["study", "manipulate", *args]) == 0
    _check_png(out / "manipulate.png")
    rows = _read_csv(out / "manipulate.csv")
    assert [r["variant"] for r in rows] == ["original", "shared dims zeroed", "shared dims <- target"]
    assert float(rows[0]["cond_cos_dist_source"]) < 1e-6
    return rows


def _exact_neighbours(feats: torch.Tensor, source: int, among: np.ndarray, k: int) -> list[int]:
    sims = torch.nn.functional.normalize(feats[among], dim=1) @ torch.nn.functional.normalize(
        feats[source], dim=0
    )
    return [int(among[i]) for i in torch.argsort(sims, descending=True)[:k]]


def test_manipulate_uses_exact_neighbours(assets, tmp_path):
    with h5py.File(assets["trunk"]) as f:
        feats = torch.from_numpy(f["features"][:, 0])
    with h5py.File(assets["images"]) as f:
        labels = f["labels"][:]
    # over the whole set
    rows = _manipulate(assets, tmp_path / "all", "--neighbours-from", "all")
    source = int(rows[0]["source"])  # the image's position in the images file
    neigh = _exact_neighbours(feats, source, np.arange(len(feats)), 4)
    assert rows[0]["neighbour_indices"] == " ".join(map(str, neigh)) and rows[0]["neighbours_from"] == "all"
    threshold = float(rows[0]["active_threshold"])
    assert threshold == (0.0 if (feats[neigh] == 0).any() else float(feats[neigh].abs().median()))
    expected = int(((feats[neigh].abs() > threshold).sum(0) > 2).sum())
    assert all(int(r["n_shared_dims"]) == expected for r in rows)
    # by default (as published) within the source image's class
    rows = _manipulate(assets, tmp_path / "class")
    source = int(rows[0]["source"])
    same = np.flatnonzero(labels == labels[source])
    k = min(4, len(same))
    assert rows[0]["neighbours_from"] == f"class {labels[source]}" and int(rows[0]["n_neighbours"]) == k
    assert int(rows[0]["n_common"]) == 2 * k // 4
    assert rows[0]["neighbour_indices"] == " ".join(map(str, _exact_neighbours(feats, source, same, k)))


def test_manipulate_head_threshold(assets, tmp_path):
    """A head has no exact zeros: auto uses the neighbours' median |value| (not every dim shared); an
    explicit threshold 0 is refused with a message that says why and what to do."""
    head = [
        "--checkpoint", str(assets["rcdm_head"]), "--model-flags", str(assets["flags_head"]),
        "--layer", "head", "--features", str(assets["head"]), "--neighbours-from", "all",
    ]  # fmt: skip
    rows = _manipulate(assets, tmp_path / "head", *head)
    assert float(rows[0]["active_threshold"]) > 0
    assert 0 < int(rows[0]["n_shared_dims"]) < int(rows[0]["dim"]) == 8
    with pytest.raises(ValueError, match="no exact zeros"):
        _manipulate(assets, tmp_path / "head0", *head, "--active-threshold", "0")


def test_trunk_head_and_ood(assets, tmp_path):
    out = tmp_path / "th"
    args = [
        "--checkpoint", str(assets["rcdm_trunk"]), "--model-flags", str(assets["flags_trunk"]),
        "--head-checkpoint", str(assets["rcdm_head"]), "--head-model-flags", str(assets["flags_head"]),
        "--encoder", "small", "--encoder-checkpoint", str(assets["enc"]), "--images", str(assets["images"]),
        "--features", str(assets["trunk"]), "--head-features", str(assets["head"]), "--num-images", "2",
        "--samples", "2", "--steps", "3", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    probe_args = ["--keep-images", "3", "--probe", str(assets["probe"]), "--encoder-name", "demo"]
    assert main(["study", "trunk-head", *args, *probe_args]) == 0
    _check_png(out / "trunk-head.png")
    rows = _read_csv(out / "trunk-head_images.csv")  # 3 keep-rate images, each with both layers
    assert [r["layer"] for r in rows] == ["trunk", "head"] * 3
    for r in rows:
        assert 0 < float(r["pixel_spread"]) <= 0.25 and 0 <= float(r["rep_spread_trunk_space"]) <= 1
        assert all(float(r[f"{f}_keep"]) in (0.0, 0.5, 1.0) for f in ("kind", "colour", "size", "position"))
    assert rows[0]["rep_spread_trunk_space"] == rows[0]["rep_spread_own_space"]
    summary = _read_csv(out / "trunk-head.csv")  # one row per layer: keep-rates over 3 x 2 samples
    report = {r["factor"]: r for r in _read_csv(assets["root"] / "probe" / "probe.csv")}
    assert [(r["encoder"], r["layer"]) for r in summary] == [("demo", "trunk"), ("demo", "head")]
    for r in summary:
        assert (r["images"], r["samples"]) == ("3", "6")
        for f in ("kind", "colour", "size", "position"):
            mine = [x for x in rows if x["layer"] == r["layer"]]
            assert math.isclose(
                float(r[f"{f}_keep"]), np.mean([float(x[f"{f}_keep"]) for x in mine]), abs_tol=1e-5
            )
            assert (
                r[f"{f}_probe_acc"] == report[f]["val_accuracy"] and r[f"{f}_chance"] == report[f]["chance"]
            )
    table = (out / "trunk-head.md").read_text()
    assert (
        "| factor | trunk samples keep | head samples keep | chance | probe accuracy (real val images) |"
        in table
    )
    assert "| position | " in table and "6 samples per layer" in table
    # the Markdown table from summary rows
    from rcdm.stages.study import trunk_head

    fake = {"trunk": [{"layer": "trunk", "images": 1, "samples": 2, "kind_keep": 1.0, "kind_chance": 0.2,
                       "kind_probe_acc": 0.97}],}  # fmt: skip
    fake["head"] = [{**fake["trunk"][0], "layer": "head", "kind_keep": 0.5}]
    md = trunk_head.keep_table(fake["trunk"] + fake["head"], "test")
    assert "| kind | 100 % | 50 % | 20 % | 97 % |" in md

    out = tmp_path / "ood"
    args = [
        "--checkpoint", str(assets["rcdm_trunk"]), "--model-flags", str(assets["flags_trunk"]), "--encoder",
        "small", "--encoder-checkpoint", str(assets["enc"]), "--num-images", "2", "--samples", "1", "--steps",
        "3", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(["study", "ood", *args]) == 0  # default --dataset photos
    _check_png(out / "ood.png")
    rows = _read_csv(out / "ood.csv")
    assert len(rows) == 2 and rows[0]["image"] != rows[1]["image"] and "." not in rows[0]["image"]


def test_study_images_drawn_from_every_class(assets, class_folder, tmp_path):
    """Study images: a seeded draw over the whole class-sorted set, every class in proportion (never the
    first N, which would all be class 0), or explicit names."""
    out = tmp_path / "cond"
    args = [
        "--images", str(class_folder["images"]), "--features", str(class_folder["trunk"]),
        "--num-images", "17", "--samples", "1", "--steps", "2", "--batch-size", "32",
    ]  # fmt: skip
    assert main(["study", "conditioned", *_common(assets, out)[:-2], *args, "--out", str(out)]) == 0
    rows = _read_csv(out / "conditioned.csv")
    with h5py.File(class_folder["images"]) as f:
        labels = f["labels"][:]
        paths = f["paths"].asstr()[:]
    assert [int(labels[int(r["image"])]) for r in rows] == [int(r["label"]) for r in rows]
    counts = np.bincount([int(r["label"]) for r in rows], minlength=10)
    expected = 17 * np.asarray(CLASS_SIZES) / sum(CLASS_SIZES)
    assert (counts >= 1).all() and (np.abs(counts - expected) < 1).all(), (counts, expected)
    assert paths[int(rows[0]["image"])].split("/")[0] != paths[int(rows[1]["image"])].split("/")[0]
    # another seed, other images; explicit names (a recorded path, or a unique file name) pick exactly those
    ctx_args = (class_folder["images"], class_folder["trunk"])
    draw = lambda **kw: common.load_sources(_source_args(*ctx_args, **kw), SIZE, SIZE).indices  # noqa: E731
    assert draw(num_images=17, image_seed=0) != draw(num_images=17, image_seed=1)
    assert draw(image_names="class_3/img_002.png,class_9/img_012") == [
        list(paths).index("class_3/img_002.png"),
        list(paths).index("class_9/img_012.png"),
    ]
    with pytest.raises(ValueError, match="matches several images"):
        draw(image_names="img_000.png")
    with pytest.raises(ValueError, match="not one of its images"):
        draw(image_names="class_3/missing.png")


def _extract(assets, out: Path, dataset: str, *extra: str) -> dict[str, Path]:
    """Images (16 px) and trunk features of ``dataset`` with the small encoder at a 32 px input: the encoder's
    crop is not the stored one, so the studies that re-encode need the originals."""
    paths = {"images": out / "images.h5", "trunk": out / "trunk.h5"}
    main(
        ["extract", "--dataset", dataset, "--split", "val", "--image-size", str(SIZE), "--input-size", "32",
         "--images-out", str(paths["images"]), "--encoder", "small", "--encoder-checkpoint",
         str(assets["enc"]), "--features-out", f"trunk={paths['trunk']}", "--workers", "0", "--device", "cpu",
         "--no-progress", *extra]
    )  # fmt: skip
    return paths


def test_encoder_crops_come_from_the_originals_or_fail(assets, tmp_path):
    """No silent substitution: the encoder-size crop is the original's (recorded folder, --image-root, or a
    regenerated dataset); otherwise an error naming the image and the settings, unless
    --allow-upsampled-crops, which the CSV then records."""
    from rcdm.data import decode_image
    from rcdm.preprocess import center_crop_arr
    from rcdm.shapes import KINDS, ShapesSource, Style
    from rcdm.study_images import SourceImageError

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"im{j}.png")
    files = _extract(assets, tmp_path, str(folder))
    originals = {f"im{j}.png": center_crop_arr(decode_image(folder / f"im{j}.png"), 32) for j in range(3)}

    def sources(**kw):
        return common.load_sources(
            _source_args(files["images"], files["trunk"], num_images=3, **kw), SIZE, 32
        )

    src = sources()  # the folder the images file records
    with h5py.File(files["images"]) as f:
        keys = [f["paths"].asstr()[i] for i in src.indices]
    assert all(np.array_equal(src.enc[i], originals[key]) for i, key in enumerate(keys))
    assert not src.any_upsampled

    moved = tmp_path / "moved"
    folder.rename(moved)
    with pytest.raises(
        SourceImageError, match=r"image \d \('im\d\.png'\).*--image-root.*--allow-upsampled-crops"
    ):
        _ = sources().enc
    src = sources(image_root=str(moved))
    assert all(np.array_equal(src.enc[i], originals[key]) for i, key in enumerate(keys))
    other = tmp_path / "other"  # same names, other pictures: found, but not the stored images
    other.mkdir()
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(other / f"im{j}.png")
    with pytest.raises(SourceImageError, match="not the stored image"):
        _ = sources(image_root=str(other)).enc
    src = sources(allow_upsampled_crops=True)
    assert src.enc.shape == (3, 32, 32, 3) and src.upsampled.all()  # read on first use of enc

    out = tmp_path / "aug"
    args = [*_common(assets, out)[:-2], "--images", str(files["images"]), "--features", str(files["trunk"]),
            "--augmentations", "flip", "--samples", "1", "--num-images", "2", "--out", str(out)]  # fmt: skip
    with pytest.raises(SourceImageError, match="--image-root"):
        main(["study", "augment", *args])
    assert not (out / "augment.csv").exists()
    assert main(["study", "augment", *args, "--image-root", str(moved)]) == 0
    assert {r["encoder_input"] for r in _read_csv(out / "augment.csv")} == {"original"}
    assert main(["study", "augment", *args, "--allow-upsampled-crops"]) == 0
    assert {r["encoder_input"] for r in _read_csv(out / "augment.csv")} == {"upsampled stored crop"}
    out = tmp_path / "adv"
    args = [*args[: args.index("--augmentations")], "--samples", "1", "--num-images", "2", "--out", str(out)]
    assert main(["study", "adversarial", *args, "--allow-upsampled-crops", "--pgd-steps", "2"]) == 0
    assert {r["encoder_input"] for r in _read_csv(out / "adversarial.csv")} == {"upsampled stored crop"}

    # a generated dataset (shapes) is regenerated from the settings the images file records
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    files = _extract(assets, shapes, "shapes", "--num-images", "5", "--native-size", "32", "--seed", "3")
    src = common.load_sources(_source_args(files["images"], files["trunk"], num_images=3), SIZE, 32)
    regenerated = ShapesSource("val", 5, seed=3, size=32)
    assert all(
        np.array_equal(src.enc[i], center_crop_arr(regenerated.load(j), 32))
        for i, j in enumerate(src.indices)
    )
    assert not src.any_upsampled

    # in the style the file records (kinds, count, rotation, size), not the default one
    styled = tmp_path / "styled"
    styled.mkdir()
    style = ["--shapes-kinds", "cross", "triangle", "--shapes-max-count", "1", "--shapes-rotation", "0",
             "--shapes-size", "0.5", "0.9"]  # fmt: skip
    files = _extract(
        assets, styled, "shapes", "--num-images", "5", "--native-size", "32", "--seed", "3", *style
    )
    src = common.load_sources(_source_args(files["images"], files["trunk"], num_images=3), SIZE, 32)
    regenerated = ShapesSource(
        "val", 5, seed=3, size=32, style=Style(("cross", "triangle"), 1, 0.0, (0.5, 0.9))
    )
    assert all(
        np.array_equal(src.enc[i], center_crop_arr(regenerated.load(j), 32))
        for i, j in enumerate(src.indices)
    )
    assert {KINDS[k] for k in src.factors["kind"]} <= {"cross", "triangle"}


def _source_args(images, features, **kw):
    import argparse

    parser = argparse.ArgumentParser()
    common.add_source_arguments(parser)
    args = parser.parse_args(["--images", str(images), "--features", str(features)])
    args.seed = 0
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_bad_inputs_are_clear_errors(assets, tmp_path, capsys):
    missing = tmp_path / "missing.h5"  # one line naming it (tests/test_file_errors.py: every stage)
    assert main(["study", "conditioned", *_common(assets, tmp_path, "--images", str(missing))]) == 1
    assert f"{missing}: images file not found; check the path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="16-d"):
        main(["study", "conditioned", *_common(assets, tmp_path, "--features", str(assets["head"]))])
    with pytest.raises(IndexError, match="outside"):
        main(["study", "conditioned", *_common(assets, tmp_path, "--indices", "0,99")])
    other = tmp_path / "other.h5"
    other.write_bytes(assets["trunk"].read_bytes())
    with h5py.File(other, "r+") as f:
        f.attrs["paths_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="other images"):
        main(["study", "conditioned", *_common(assets, tmp_path, "--features", str(other))])
    assert not (tmp_path / "conditioned.csv").exists()
