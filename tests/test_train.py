import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rcdm.errors import InputFileError
from rcdm.formats import hdf5
from rcdm.stages.train import (
    EXIT_PREEMPTED,
    EXIT_TIME_BUDGET,
    NonFiniteLossError,
    TrainConfig,
    TrainConfigError,
    Trainer,
    find_resume_checkpoint,
    load_model_flags,
)
from rcdm.train_data import H5PairDataset, StepBatchSampler, to_model_images

FLAGS = {
    "image_size": 8,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 1,
    "attention_resolutions": "4",
    "num_heads": 2,
    "learn_sigma": True,
    "diffusion_steps": 40,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "dropout": 0.1,
}


def write_pair(tmp_path, n=12, size=8, dim=6, seed=0, name="d"):
    """Tiny images + features files in the extraction layout (issue 3); features[:, 1] = f(mirror)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    proj = rng.standard_normal((size * size * 3, dim)).astype(np.float32)
    feats = np.stack(
        [images.reshape(n, -1) @ proj / 1e3, images[:, :, ::-1].reshape(n, -1) @ proj / 1e3], axis=1
    ).astype(np.float32)
    paths = [f"img{i:03d}.png" for i in range(n)]
    digest = hdf5.PathsDigest()
    digest.update(paths)
    common = {"format_version": hdf5.FORMAT_VERSION, "num_images": n, "paths_sha256": digest.hexdigest(),
              "num_bad": 0, "complete": True}  # fmt: skip
    img_path, feat_path = tmp_path / f"{name}_images.h5", tmp_path / f"{name}_features.h5"
    with h5py.File(img_path, "w") as h5:
        h5.create_dataset("images", data=images)
        h5.create_dataset("labels", data=np.arange(n, dtype=np.int64))
        hdf5.write_strings(h5, "paths", paths)
        hdf5.set_attrs(h5, {**common, "kind": "images", "image_size": size})
    with h5py.File(feat_path, "w") as h5:
        h5.create_dataset("features", data=feats)
        hdf5.write_strings(h5, "paths", paths)
        hdf5.set_attrs(h5, {**common, "kind": "features", "dim": dim, "encoder": "toy", "layer": "trunk",
                                "images_file": img_path.name})  # fmt: skip
    return img_path, feat_path, images, feats


def make_cfg(tmp_path, img, feat, **kw):
    base = dict(images=str(img), features=str(feat), out=str(tmp_path / "run"), model_flags=dict(FLAGS),
                steps=20, batch_size=4, save_interval=10, log_interval=5, workers=0, seed=3,
                ema_rates=[0.9, 0.99], deterministic=True, progress=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------------------------------ data
def test_dataset_flip_selects_mirrored_feature_and_image(pair):
    img, feat, images, feats = pair
    ds = H5PairDataset(img, feat)
    assert (ds.num_images, ds.image_size, ds.feature_dim) == (12, 8, 6)
    x, f = ds[(np.array([5, 2, 9]), np.array([True, False, True]))]
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(x[0].numpy(), images[5, :, ::-1])
    np.testing.assert_array_equal(x[1].numpy(), images[2])
    np.testing.assert_array_equal(f.numpy(), feats[[5, 2, 9], [1, 0, 1]])
    # the handle opens lazily, and never crosses a pickle (DataLoader workers open their own after fork)
    assert ds._handles is not None
    import pickle

    assert pickle.loads(pickle.dumps(ds))._handles is None
    ds.close()


def test_to_model_images_range_and_layout():
    u8 = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 1, 3, 3).contiguous()
    x = to_model_images(u8, "cpu")
    assert x.shape == (1, 3, 1, 3) and x.is_contiguous()
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    assert to_model_images(u8, "cpu", channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_step_sampler_order_is_rank_invariant_and_epoch_seeded():
    one = StepBatchSampler(10, 4, seed=1)
    halves = [StepBatchSampler(10, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(6):  # 2 steps per epoch: crosses epochs
        idx, fl = one.batch_for_step(step)
        parts = [h.batch_for_step(step) for h in halves]
        np.testing.assert_array_equal(idx, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(fl, np.concatenate([p[1] for p in parts]))
    epoch0 = np.concatenate([one.batch_for_step(s)[0] for s in range(2)])
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    assert not np.array_equal(one.batch_for_step(0)[0], one.batch_for_step(2)[0])
    resumed = list(StepBatchSampler(10, 4, seed=1, start_step=3, stop_step=5))
    np.testing.assert_array_equal(resumed[0][0], one.batch_for_step(3)[0])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(3, 4)


# ------------------------------------------------------------------------------------------ training
def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_exact_and_exports_load(tmp_path, pair):
    img, feat, _, _ = pair
    straight = Trainer(make_cfg(tmp_path / "a", img, feat))
    assert straight.train() == 0
    final = _weights(straight)
    ema_final = straight.ema.params[1]

    cfg = make_cfg(tmp_path / "b", img, feat, steps=10, export_interval=10)
    assert Trainer(cfg).train() == 0
    # new object, same folder, more steps (not part of the run's identity): resumes at step 10
    resumed = Trainer(make_cfg(tmp_path / "b", img, feat, export_interval=10))
    assert resumed.step == 10 and resumed.resumed_from.name == "ckpt_000010.pt"
    assert resumed.train() == 0
    for k, v in final.items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)
    for a, b in zip(resumed.ema.params[1], ema_final):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    untrained = Trainer(make_cfg(tmp_path / "c", img, feat)).model.state_dict()  # same seed: same init
    assert max((final[k] - v).abs().max() for k, v in untrained.items()) > 1e-3

    out = tmp_path / "b" / "run"
    ema = torch.load(out / "ema_0.99_final.pt", weights_only=True)
    assert torch.equal(ema["out.2.weight"], resumed.ema.export(resumed.model, 0.99)["out.2.weight"])
    assert (out / "ema_0.9_000020.pt").is_file() and (out / "model_000010.pt").is_file()
    assert not list((tmp_path / "a" / "run").glob("*_0000*.pt"))  # default: final exports only (disk)
    from rcdm.checkpoint import load_model
    from rcdm.factory import create_model_from_flags

    plain = create_model_from_flags(**{**FLAGS, "ssl_dim": 6})
    plain.load_state_dict(ema, strict=True)
    loaded, diffusion = load_model(out / "ema_0.99_final.pt", flags={**FLAGS, "ssl_dim": 6})
    assert diffusion.num_timesteps == 40
    from_ckpt, _ = load_model(resumed.ckpt_dir / "ckpt_000020.pt")  # flags recorded in the checkpoint
    assert resumed.ckpt_dir.parent == out / "checkpoints" and resumed.ckpt_dir.name.startswith("run-")
    first_rate = resumed.ema.export(resumed.model, 0.9)
    assert torch.equal(from_ckpt.state_dict()["out.2.weight"], first_rate["out.2.weight"])
    assert json.loads((out / "train_summary.json").read_text())["step"] == 20
    rows = list(csv.DictReader((out / "progress.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]  # no duplicate rows after the resume
    for key in ("loss", "mse", "vb", "loss_q0", "vb_q3", "grad_norm", "data_wait_frac", "images_per_s"):
        assert np.isfinite(float(rows[-1][key])), key
    # loss = mse + vb, per quartile too (uniform weights)
    r = rows[-1]
    assert abs(float(r["loss"]) - float(r["mse"]) - float(r["vb"])) < 1e-4 * max(1, float(r["loss"]))
    ckpts = sorted(p.name for p in resumed.ckpt_dir.glob("ckpt_*.pt"))
    assert ckpts == ["ckpt_000010.pt", "ckpt_000020.pt"]
    # rerunning a finished run is a no-op that keeps the outputs
    assert Trainer(make_cfg(tmp_path / "b", img, feat)).train() == 0


def test_exports_follow_their_own_interval_not_the_checkpoints(tmp_path, pair):
    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=9, save_interval=4, export_interval=3, ema_rates=[0.99])
    trainer = Trainer(cfg)
    assert trainer.train() == 0
    out = tmp_path / "run"
    tags = sorted(p.name for p in out.glob("model_*.pt"))
    assert tags == ["model_000003.pt", "model_000006.pt", "model_000009.pt", "model_final.pt"]
    assert sorted(p.name for p in trainer.ckpt_dir.glob("ckpt_*.pt")) == [
        "ckpt_000004.pt", "ckpt_000008.pt", "ckpt_000009.pt"]  # fmt: skip
    # the step-9 export is the final weights; the step-3 one is not
    last, first = (torch.load(out / f"ema_0.99_{t}.pt", weights_only=True) for t in ("000009", "000003"))
    final = torch.load(out / "ema_0.99_final.pt", weights_only=True)
    assert all(torch.equal(last[k], v) for k, v in final.items())
    assert not all(torch.equal(first[k], v) for k, v in final.items())
    with pytest.raises(TrainConfigError, match="--export-interval must be >= 0"):
        Trainer(make_cfg(tmp_path / "bad", img, feat, export_interval=-1))


def test_a_job_killed_while_saving_still_has_that_steps_export(tmp_path, pair, monkeypatch):
    img, feat, _, _ = pair
    kw = dict(steps=9, save_interval=3, export_interval=3, ema_rates=[0.99])
    real_save = Trainer.save

    def dies_at_step_6(self):
        if self.step == 6:
            raise KeyboardInterrupt("killed while writing the step-6 checkpoint")
        return real_save(self)

    monkeypatch.setattr(Trainer, "save", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(make_cfg(tmp_path, img, feat, **kw)).train()
    out = tmp_path / "run"
    assert (out / "model_000006.pt").is_file()  # written before the checkpoint that never landed
    monkeypatch.setattr(Trainer, "save", real_save)
    again = Trainer(make_cfg(tmp_path, img, feat, **kw))
    assert again.step == 3 and again.train() == 0
    assert sorted(p.name for p in out.glob("model_0*.pt")) == [
        "model_000003.pt", "model_000006.pt", "model_000009.pt"]  # fmt: skip


def test_microbatches_equal_full_batch(tmp_path, pair):
    img, feat, _, _ = pair
    kw = dict(steps=2, save_interval=100, model_flags={**FLAGS, "dropout": 0.0})
    full = Trainer(make_cfg(tmp_path / "f", img, feat, **kw))
    full.train()
    micro = Trainer(make_cfg(tmp_path / "m", img, feat, microbatch=1, **kw))
    micro.train()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(micro.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_and_fp16_options(tmp_path, pair):
    img, feat, _, _ = pair
    flags = {**FLAGS, "dropout": 0.0}
    kw = dict(steps=2, save_interval=2)
    plain = Trainer(make_cfg(tmp_path / "p", img, feat, model_flags=flags, **kw))
    plain.train()
    ckpt = Trainer(make_cfg(tmp_path / "c", img, feat, model_flags={**flags, "use_checkpoint": True}, **kw))
    ckpt.train()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(ckpt.model.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    # use_fp16 in the published flags selects fp16 autocast + grad scaler with fp32 master weights
    half = Trainer(make_cfg(tmp_path / "h", img, feat, model_flags={**flags, "use_fp16": True}, **kw))
    assert half.precision == "fp16" and half.scaler.is_enabled()
    assert half.train() == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in half.params)
    state = torch.load(half.ckpt_dir / "ckpt_000002.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    init = Trainer(make_cfg(tmp_path / "i", img, feat, model_flags=flags, **kw)).model.state_dict()
    du_plain = torch.cat([(v - init[k]).flatten() for k, v in plain.model.state_dict().items()])
    du_half = torch.cat([(v - init[k]).flatten() for k, v in half.model.state_dict().items()])
    assert du_plain.abs().max() > 1e-5  # both trained ...
    assert torch.nn.functional.cosine_similarity(du_plain, du_half, dim=0) > 0.95  # ... the same way


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, pair):
    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=4, save_interval=2, keep=5)
    first = Trainer(cfg)
    first.train()
    ckpt_dir = first.ckpt_dir
    (ckpt_dir / "ckpt_000004.pt").write_bytes(b"\x80garbage")
    (ckpt_dir / "ckpt_000006.pt").write_bytes((ckpt_dir / "ckpt_000002.pt").read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        path, state = find_resume_checkpoint(ckpt_dir)
    assert path.name == "ckpt_000002.pt" and state["step"] == 2
    with pytest.warns(UserWarning):
        assert Trainer(make_cfg(tmp_path, img, feat, steps=4, save_interval=2)).step == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, pair):
    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=6, save_interval=2, log_interval=100)
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def poisoned(images, feats):
        if trainer.step == 3:
            feats = feats.clone()
            feats[0, 0] = float("nan")
        real_step(images, feats)

    trainer.train_step = poisoned
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
        trainer.train()
    names = sorted(p.name for p in trainer.ckpt_dir.glob("ckpt_*.pt"))
    assert names == ["ckpt_000002.pt"]
    state = torch.load(trainer.ckpt_dir / names[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_signal_saves_and_exits_with_requeue_code(tmp_path, pair, capfd):
    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=50, save_interval=100, workers=1)
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def step_then_signal(images, feats):
        real_step(images, feats)
        if trainer.step == 3:  # like SLURM: the signal reaches the data worker too, which must survive it
            children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
            for pid in children.read_text().split() if children.exists() else []:
                os.kill(int(pid), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = step_then_signal
    assert threading.current_thread() is threading.main_thread()
    assert trainer.train() == EXIT_PREEMPTED
    assert capfd.readouterr().err.count("received SIGUSR1") == 1  # the worker ignored it
    assert [p.name for p in trainer.ckpt_dir.glob("ckpt_*.pt")] == ["ckpt_000003.pt"]
    assert not (tmp_path / "run" / "train_summary.json").exists()
    assert signal.getsignal(signal.SIGUSR1) is not trainer._on_signal  # handler restored


def test_resume_from_a_plain_state_dict_starts_from_its_weights(tmp_path, pair):
    img, feat, _, _ = pair
    Trainer(make_cfg(tmp_path / "a", img, feat, steps=2, save_interval=2)).train()
    export = tmp_path / "a" / "run" / "ema_0.9_final.pt"
    fine = Trainer(make_cfg(tmp_path / "b", img, feat, resume=str(export)))
    assert fine.step == 0
    sd = torch.load(export, weights_only=True)
    assert all(torch.equal(fine.model.state_dict()[k], v) for k, v in sd.items())
    assert torch.equal(fine.ema.params[0][0], fine.params[0].detach())  # EMA starts from those weights too
    fine.cfg.steps = fine.cfg.save_interval = 2
    fine.train()
    # the same command again (a requeued job) continues this run instead of restarting from the export
    assert Trainer(make_cfg(tmp_path / "b", img, feat, resume=str(export))).step == 2


def test_time_budget_is_a_safety_cap_that_fails_loudly(tmp_path, pair, capfd):
    """Spent before --steps: saved where it stopped, exit 4, one line saying so; a rerun continues."""
    from rcdm.cli import main as cli_main

    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=10**6, save_interval=10**6, time_budget=1.0)
    trainer = Trainer(cfg)
    assert trainer.train() == EXIT_TIME_BUDGET
    err = capfd.readouterr().err
    line = f"ran out at step {trainer.step} of the planned 1000000 (--steps)"
    assert "error: the --time-budget safety cap (1 s, workflow: train.time_budget)" in err and line in err
    assert [p.name for p in trainer.ckpt_dir.glob("ckpt_*.pt")] == [f"ckpt_{trainer.step:06d}.pt"]
    assert 0 < trainer.step < 10**6 and not (tmp_path / "run" / "train_summary.json").exists()
    resumed = Trainer(make_cfg(tmp_path, img, feat, steps=trainer.step + 2, time_budget=1000.0))
    assert resumed.step == trainer.step and resumed.train() == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["reason"] == "done" and summary["step"] == trainer.step + 2
    # through the CLI: exit 4, the last line of stderr says what happened and what to do
    args = ["train", "--images", str(img), "--features", str(feat), "--out", str(tmp_path / "cli"),
            "--model-flags", json.dumps(FLAGS), "--batch-size", "4", "--workers", "0", "--steps", "1000000",
            "--time-budget", "0.5", "--no-progress"]  # fmt: skip
    assert cli_main(args) == EXIT_TIME_BUDGET
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rcdm train: error: the --time-budget safety cap (0.5 s") and "rerun" in last
    # a run always has a fixed number of steps: no budget-only runs
    with pytest.raises(TrainConfigError, match="give --steps N > 0"):
        Trainer(make_cfg(tmp_path / "zero", img, feat, steps=0, time_budget=10.0))


def test_same_seed_same_weights_whatever_workers_and_threads(tmp_path, pair):
    """Weights depend on the configuration and seed only: a rerun with other DataLoader workers is
    bit-identical; other intra-op threads change the rounding only."""
    img, feat, _, _ = pair
    kw = dict(steps=6, save_interval=100, lr=1e-3)
    runs = []
    saved_threads = torch.get_num_threads()
    try:
        for name, workers, n_threads in (("a", 0, 1), ("b", 2, 1), ("c", 0, 2)):
            torch.set_num_threads(n_threads)
            trainer = Trainer(make_cfg(tmp_path / name, img, feat, workers=workers, **kw))
            assert trainer.train() == 0
            runs.append(_weights(trainer))
    finally:
        torch.set_num_threads(saved_threads)
    first, workers, threads = runs
    assert all(torch.equal(first[k], workers[k]) for k in first)  # bit-identical
    init = Trainer(make_cfg(tmp_path / "i", img, feat, **kw)).model.state_dict()
    flat = lambda sd: torch.cat([sd[k].flatten() for k in sorted(first)])  # noqa: E731
    trained = (flat(first) - flat(init)).norm()
    rounding = (flat(threads) - flat(first)).norm()
    # other threads: rounding only (Adam turns rounding-level gradients into whole steps for a few weights)
    assert trained > 0.1 and rounding < 0.01 * trained, (float(trained), float(rounding))


def test_bad_configuration_fails_before_compute(tmp_path, pair):
    img, feat, _, _ = pair
    with pytest.raises(InputFileError, match="missing.h5: not found; check the path"):
        Trainer(make_cfg(tmp_path, tmp_path / "missing.h5", feat))
    with pytest.raises(TrainConfigError, match="ssl_dim=7"):
        Trainer(make_cfg(tmp_path, img, feat, model_flags={**FLAGS, "ssl_dim": 7}))
    with pytest.raises(TrainConfigError, match="image_size=16"):
        Trainer(make_cfg(tmp_path, img, feat, model_flags={**FLAGS, "image_size": 16}))
    with pytest.raises(TrainConfigError, match="multiple"):
        Trainer(make_cfg(tmp_path, img, feat, batch_size=0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(make_cfg(tmp_path, img, feat, batch_size=16))
    other_img, other_feat, _, _ = write_pair(tmp_path, n=5, name="other")
    with pytest.raises(InputFileError, match=f"{re.escape(str(other_feat))}: does not belong to .*; delete"):
        Trainer(make_cfg(tmp_path, img, other_feat))
    Trainer(make_cfg(tmp_path, img, feat, steps=1, save_interval=1)).train()
    with pytest.raises(TrainConfigError, match="already holds checkpoints of this run"):
        Trainer(make_cfg(tmp_path, img, feat, resume="none"))


def test_resume_only_with_the_same_inputs_and_settings(tmp_path, pair, capfd):
    """A checkpoint is resumed only by a run whose data, flags and result-changing settings are its own."""
    img, feat, _, _ = pair
    done = Trainer(make_cfg(tmp_path, img, feat, steps=4, save_interval=2))
    assert done.train() == 0
    assert "starting at step 0" in capfd.readouterr().err
    # same everything, more steps: the same run, resumed (and said so)
    again = Trainer(make_cfg(tmp_path, img, feat, steps=6, save_interval=2, log_interval=3, workers=1))
    assert again.step == 4 and again.ckpt_dir == done.ckpt_dir
    again.train()
    assert f"resuming from {done.ckpt_dir / 'ckpt_000004.pt'} at step 4" in capfd.readouterr().err
    # a new encoder file (same images, same width): new features -> a new run from step 0, not the old model
    _, feat2, _, feats2 = write_pair(tmp_path, name="enc2")
    with h5py.File(feat2, "a") as h5:
        h5.attrs["encoder_sha256"] = "e" * 64
        h5.attrs["images_file"] = img.name
    fresh = Trainer(make_cfg(tmp_path, img, feat2, steps=4, save_interval=2))
    assert fresh.step == 0 and fresh.ckpt_dir != done.ckpt_dir and fresh.resumed_from is None
    # a result-changing setting (lr) or flag: a new run; a throughput one (workers, log interval): the same
    assert Trainer(make_cfg(tmp_path, img, feat, steps=4, lr=3e-4)).step == 0
    assert (
        Trainer(make_cfg(tmp_path, img, feat, steps=4, model_flags={**FLAGS, "num_channels": 64})).step == 0
    )
    assert Trainer(make_cfg(tmp_path, img, feat, steps=6, workers=2, log_interval=1)).step == 6
    # the checkpoint records what it was trained on
    state = torch.load(done.ckpt_dir / "ckpt_000006.pt", weights_only=True)
    assert state["identity_sha256"] == done.identity_sha256
    assert state["identity"]["features"]["paths_sha256"] == done.data.features_attrs["paths_sha256"]
    # a checkpoint copied into another run's folder is refused, naming both identities
    fresh.ckpt_dir.mkdir(parents=True, exist_ok=True)
    (fresh.ckpt_dir / "ckpt_000008.pt").write_bytes((done.ckpt_dir / "ckpt_000006.pt").read_bytes())
    with pytest.raises(TrainConfigError, match="belongs to another run"):
        Trainer(make_cfg(tmp_path, img, feat2, steps=4, save_interval=2))


def test_check_only_validates_without_building(tmp_path, pair):
    img, feat, _, _ = pair
    checked = Trainer(make_cfg(tmp_path, img, feat), check_only=True)
    assert checked.resume_plan is None and not hasattr(checked, "model")
    with pytest.raises(TrainConfigError, match="ssl_dim=7"):
        Trainer(make_cfg(tmp_path, img, feat, model_flags={**FLAGS, "ssl_dim": 7}), check_only=True)


def test_end_time_saves_before_the_limit(tmp_path, pair, capfd):
    """With an end time (SLURM's, or --end-time) the run saves a margin before it and exits 75."""
    import time

    img, feat, _, _ = pair
    cfg = make_cfg(tmp_path, img, feat, steps=10**6, save_interval=10**6, end_time=time.time() + 8.0,
                   stop_margin=4.0)  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.train() == EXIT_PREEMPTED
    names = [p.name for p in trainer.ckpt_dir.glob("ckpt_*.pt")]
    assert names == [f"ckpt_{trainer.step:06d}.pt"] and 0 < trainer.step < 10**6  # saved where it stopped
    assert "before the job's time limit" in capfd.readouterr().err
    assert not (tmp_path / "run" / "train_summary.json").exists()  # not finished: the job goes on later
    resumed = Trainer(make_cfg(tmp_path, img, feat, steps=trainer.step + 2))
    assert resumed.step == trainer.step and resumed.train() == 0


def test_model_flags_parsing(tmp_path):
    assert load_model_flags('{"num_channels": 64}') == {"num_channels": 64}
    (tmp_path / "f.yaml").write_text("num_channels: 64\nlearn_sigma: true\n")
    assert load_model_flags(str(tmp_path / "f.yaml")) == {"num_channels": 64, "learn_sigma": True}
    with pytest.raises(TrainConfigError, match="not found"):
        load_model_flags(str(tmp_path / "nope.yaml"))


def test_cli_runs_and_reports_errors(tmp_path, pair):
    img, feat, _, _ = pair
    flags = json.dumps({**FLAGS, "dropout": 0.0})
    base = [sys.executable, "-m", "rcdm", "train", "--images", str(img), "--features", str(feat),
            "--out", str(tmp_path / "cli"), "--model-flags", flags, "--batch-size", "4", "--workers", "1",
            "--log-interval", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(base + ["--steps", "2", "--save-interval", "2", "--precision", "bf16",
                                  "--channels-last", "--grad-clip", "1.0", "--warmup", "5",
                                  "--schedule-sampler", "loss-second-moment"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "cli" / "progress.csv").read_text().splitlines()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-5, 4e-5])  # warm-up
    bad = subprocess.run(base + ["--steps", "2", "--model-flags", json.dumps({"ssl_dim": 3})],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "ssl_dim=3" in bad.stderr


def test_one_trainer_per_run(tmp_path, pair):
    """A second trainer of the same run fails at once while the first holds the run (no shared folder)."""
    from rcdm.stages.train import RunLock

    img, feat, _, _ = pair
    first = Trainer(make_cfg(tmp_path, img, feat, steps=2, save_interval=1))
    held = RunLock(first.ckpt_dir)
    held.acquire()  # stands in for a trainer of this run in another process
    try:
        with pytest.raises(TrainConfigError, match="another trainer is writing this run"):
            first.train()
    finally:
        held.release()
    late = Trainer(make_cfg(tmp_path, img, feat, steps=2, save_interval=1))
    assert first.train() == 0  # wrote ckpt_000001/2 after `late` chose to start at step 0
    with pytest.raises(TrainConfigError, match="appeared after this run chose to start"):
        late.train()
