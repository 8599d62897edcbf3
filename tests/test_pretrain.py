"""Small SSL pretraining: augmentations and losses against closed forms, probes, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcdm import encoders
from rcdm.cli import main as cli_main
from rcdm.stages import pretrain as P


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_with_full_scale_is_identity_or_mirror():
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    keep = P.Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0)
    torch.testing.assert_close(P.random_resized_crop_flip(x, 12, keep, _gen()), x, atol=1e-5, rtol=0)
    mirror = P.Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=1.0)
    torch.testing.assert_close(
        P.random_resized_crop_flip(x, 12, mirror, _gen()), x.flip(-1), atol=1e-5, rtol=0
    )


def test_crop_takes_a_region_of_the_requested_area():
    # an image whose value is its x coordinate: a crop's values span width w = sqrt(area) of [-1, 1]
    ramp = torch.linspace(-1, 1, 257).view(1, 1, 1, 257).expand(64, 3, 257, 257).contiguous()
    aug = P.Augment(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip=0.0)
    out = P.random_resized_crop_flip(ramp, 33, aug, _gen(1))
    # output pixel centres span (33 - 1) / 33 of the crop width 2 * 0.5 (normalised units); the ramp's
    # value grows 257/256 per normalised unit (pixel centres of 257 columns sit at (2i + 1) / 257 - 1)
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    torch.testing.assert_close(span, torch.full((64,), 32 / 33 * 257 / 256), atol=1e-4, rtol=0)
    assert out.min() >= -1 and out.max() <= 1 and out[:, 0, 0, 0].std() > 0.1  # positions vary


def test_rotation_turns_about_the_centre():
    # value = distance from the centre: unchanged by any turn about it (inside the inscribed disc)
    c = (torch.arange(33) + 0.5) / 33 * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    radius = torch.sqrt(xx**2 + yy**2).expand(16, 3, 33, 33).contiguous()
    aug = P.Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, rotation=180.0)
    out = P.random_resized_crop_flip(radius, 33, aug, _gen(4))
    inside = radius[0, 0] < 0.9
    torch.testing.assert_close(out[:, :, inside], radius[:, :, inside], atol=0.02, rtol=0)
    # value = x: turned by a different angle per image, so the x ramp becomes some mix of x and y
    ramp = xx.expand(16, 3, 33, 33).contiguous()
    turned = P.random_resized_crop_flip(ramp, 33, aug, _gen(4))
    slope_y = (turned[:, 0, -2, 16] - turned[:, 0, 1, 16]) / (c[-2] - c[1])  # d value / d y at x = 0
    assert slope_y.abs().max() > 0.5 and slope_y.std() > 0.3  # turns vary per image


def test_colour_jitter_closed_forms():
    x = torch.rand(5, 3, 6, 6) * 2 - 1
    none = P.Augment(brightness=0, contrast=0, saturation=0, hue=0, grayscale=0)
    torch.testing.assert_close(P.colour_jitter_gray(x, none, _gen()), x, atol=1e-6, rtol=0)
    gray = P.Augment(brightness=0, contrast=0, saturation=0, hue=0, grayscale=1.0)
    y = P.colour_jitter_gray(x, gray, _gen())
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]) * 0.5 + 0.5
    for c in range(3):
        torch.testing.assert_close(y[:, c], luma * 2 - 1, atol=1e-6, rtol=0)
    m = P._hue_matrices(torch.tensor([0.0, 1.0, math.pi]))
    torch.testing.assert_close(m[0], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(m @ torch.ones(3), torch.ones(3, 3), atol=1e-5, rtol=0)  # gray stays gray
    luma = torch.tensor([0.299, 0.587, 0.114])
    v = torch.tensor([0.9, 0.2, 0.4])
    torch.testing.assert_close(luma @ (m[1] @ v), luma @ v, atol=1e-5, rtol=0)  # hue turns keep luma
    assert (m[1] @ v - v).abs().max() > 0.1


def test_nt_xent_matches_a_loop():
    z = torch.randn(8, 5, generator=_gen(2))
    tau, n = 0.3, 4
    zn = F.normalize(z, dim=1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        num = math.exp(float(zn[i] @ zn[j]) / tau)
        den = sum(math.exp(float(zn[i] @ zn[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    assert P.nt_xent(z, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_vicreg_loss_matches_numpy():
    z = torch.randn(12, 4, generator=_gen(3))
    a, b = z[:6].double().numpy(), z[6:].double().numpy()
    inv = ((a - b) ** 2).mean()
    std = np.mean([np.maximum(0, 1 - np.sqrt(v.var(0, ddof=1) + 1e-4)).mean() for v in (a, b)])
    cov = 0.0
    for v in (a, b):
        c = np.cov(v, rowvar=False)
        cov += (c**2).sum() - (np.diag(c) ** 2).sum()
    want = 25 * inv + 25 * std + cov / 4
    assert P.vicreg_loss(z).item() == pytest.approx(want, rel=1e-5)


def test_linear_probe_on_closed_form_features():
    rng = np.random.default_rng(0)
    n = 400
    f = {"kind": rng.integers(0, 3, n), "size": rng.uniform(0.3, 0.7, n)}
    feats = np.concatenate([np.eye(3)[f["kind"]], f["size"][:, None], rng.normal(size=(n, 4))], 1)
    x = torch.tensor(feats, dtype=torch.float32)
    res = P.linear_probe(
        x[:300], {k: v[:300] for k, v in f.items()}, x[300:], {k: v[300:] for k, v in f.items()}
    )
    assert res["kind_acc"] == 1.0 and res["size_r2"] > 0.999
    noise = torch.tensor(rng.normal(size=(n, 4)), dtype=torch.float32)
    with pytest.raises(ValueError, match="factor 'kind' has 400 values for 300 feature rows"):
        P.linear_probe(noise[:300], f, noise[300:], {k: v[300:] for k, v in f.items()})
    res = P.linear_probe(
        noise[:300], {k: v[:300] for k, v in f.items()}, noise[300:], {k: v[300:] for k, v in f.items()}
    )
    assert res["kind_acc"] < 0.6 and res["size_r2"] < 0.1


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory):
    """A tiny images file in the `rcdm extract` layout, with the shapes factors."""
    from rcdm.shapes import ShapesSource

    path = tmp_path_factory.mktemp("shapes") / "shapes_train.h5"
    src = ShapesSource("train", 96, seed=0, size=16)
    factors = [src.factors(i) for i in range(len(src))]
    with h5py.File(path, "w") as h5:
        h5["images"] = np.stack([np.asarray(src.load(i)) for i in range(len(src))])
        for k in factors[0]:
            h5[f"factors/{k}"] = np.array([f[k] for f in factors])
    return path


def test_pretrain_end_to_end(tmp_path, shapes_file):
    out = tmp_path / "small.pt"
    args = ["pretrain", "--images", str(shapes_file), "--out", str(out), "--steps", "40"]
    args += ["--batch-size", "48", "--input-size", "16", "--widths", "8", "16", "--head-dims", "32", "16"]
    args += ["--lr", "3e-3", "--probe", str(shapes_file), "--device", "cpu"]
    assert cli_main(args) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "rcdm-small-encoder" and ckpt["method"] == "simclr" and ckpt["input_size"] == 16
    assert set(ckpt["probe"]) == {"trunk", "head"} and "colour_acc" in ckpt["probe"]["trunk"]
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(3e-3 / 30, rel=1e-4) and lrs[-1] < 3e-3 * 0.01  # warmup, cosine to ~0
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3

    trunk = encoders.load("small", out, "trunk")
    head = encoders.load("small", out, "head")
    pair = encoders.load_pair("small", out)
    assert (trunk.dim, head.dim, trunk.input_size, trunk.input_norm) == (16, 16, 16, "none")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        both = pair(x)
        torch.testing.assert_close(both["trunk"], trunk(x))
        torch.testing.assert_close(both["head"], head(x))
    ref_trunk, ref_head = encoders.build_small(ckpt["arch"])
    ref_trunk.load_state_dict(ckpt["trunk"])
    with torch.inference_mode():
        torch.testing.assert_close(trunk(x), ref_trunk.eval()(x))

    mtime = out.stat().st_mtime_ns
    assert cli_main(args) == 0 and out.stat().st_mtime_ns == mtime  # a rerun skips finished work


def test_vicreg_method_runs(shapes_file):
    imgs = P.resize_to(P.read_images(shapes_file, 32), 16)
    s = P.TrainSettings(method="vicreg", steps=3, batch_size=16, input_size=16, widths=[8], head_dims=[16, 8])
    trunk, head, history = P.train(imgs, s, progress=False)
    assert len(history) == 3 and all(math.isfinite(loss) for _, loss in history)


def test_same_seed_same_weights_and_a_schedule_of_steps_only(shapes_file, monkeypatch):
    """The weights depend on the settings and seed only: a rerun is bit-identical, whatever the clock."""
    imgs = P.resize_to(P.read_images(shapes_file, 32), 16)
    s = P.TrainSettings(steps=6, batch_size=8, input_size=16, widths=[8], head_dims=[8], warmup=2)
    first = P.train(imgs, s, progress=False)
    clock = iter(range(0, 10**6, 1000))  # a slow machine: 1000 s per clock reading
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(clock)))
    again = P.train(imgs, s, progress=False)
    for a, b in zip(first[:2], again[:2]):
        sd_a, sd_b = a.state_dict(), b.state_dict()
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert first[2] == again[2]  # (lr, loss) of every step
    lrs = [lr for lr, _ in first[2]]
    want = [s.lr * min(1, (k + 1) / 2) * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == pytest.approx(want)
    other = P.train(imgs, P.TrainSettings(**{**vars(s), "seed": 1}), progress=False)
    assert not torch.equal(other[0].state_dict()["stem.0.weight"], first[0].state_dict()["stem.0.weight"])


def test_time_budget_is_a_safety_cap_that_fails(tmp_path, shapes_file, monkeypatch, capsys):
    clock = iter(range(10_000))  # a fake clock: one second per reading
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(clock)))
    imgs = P.resize_to(P.read_images(shapes_file, 32), 16)
    s = P.TrainSettings(steps=1000, batch_size=8, input_size=16, widths=[8], head_dims=[8], time_budget=10.0)
    # start reads 0; before step k the clock reads k + 1: over 10 s before step 10
    with pytest.raises(P.TimeBudgetError, match=r"cap \(10 s\) ran out at step 10 of the planned 1000"):
        P.train(imgs, s, progress=False)
    out = tmp_path / "e.pt"
    args = ["pretrain", "--images", str(shapes_file), "--out", str(out), "--steps", "1000"]
    args += ["--batch-size", "8", "--input-size", "16", "--widths", "8", "--head-dims", "8"]
    args += ["--time-budget", "5", "--device", "cpu"]
    assert cli_main(args) == P.EXIT_TIME_BUDGET == 4
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rcdm pretrain: error: the --time-budget safety cap (5 s) ran out at step")
    assert "raise the cap or lower the steps" in last
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        P.read_images(tmp_path / "nothing.h5")
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["pixels"] = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(KeyError, match="no 'images' dataset"):
        P.read_images(tmp_path / "f.h5")
    with h5py.File(tmp_path / "g.h5", "w") as h5:
        h5["images"] = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        P.read_images(tmp_path / "g.h5")
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(encoders.EncoderLayoutError, match="not a small-encoder checkpoint"):
        encoders.load("small", tmp_path / "x.pt")
