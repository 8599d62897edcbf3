import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_train import FLAGS, write_pair

from rcdm.distributed import first_host, slurm_to_torch_env
from rcdm.stages.train import TrainConfig, Trainer


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cfg(out, img, feat, **kw):
    base = dict(images=str(img), features=str(feat), out=str(out), model_flags={**FLAGS, "dropout": 0.0},
                steps=4, batch_size=4, save_interval=2, log_interval=2, workers=0, seed=5, ema_rates=[0.9],
                deterministic=True, progress=False, schedule_sampler="loss-second-moment")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _slurm_worker(rank, port, cfg):
    """One srun task: ranks come from SLURM_* alone (no RANK/WORLD_SIZE), as under srun."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                      SLURM_NODELIST="localhost", SLURM_JOB_ID="77", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from rcdm.distributed import cleanup, init_distributed

    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, 2, "gloo")
    try:
        assert Trainer(cfg, ctx).train() == 0
    finally:
        cleanup(ctx)


def test_two_gloo_processes_equal_one_process(tmp_path):
    img, feat, _, _ = write_pair(tmp_path)
    single = Trainer(_cfg(tmp_path / "one", img, feat))
    assert single.train() == 0
    # 2 ranks x micro-batch 1: exercises DDP no_sync accumulation and the loss-aware sampler's all-gather
    mp.spawn(_slurm_worker, args=(_free_port(), _cfg(tmp_path / "two", img, feat, microbatch=1)), nprocs=2)
    two = torch.load(tmp_path / "two" / "model_final.pt", weights_only=True)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5)
    ema = torch.load(tmp_path / "two" / "ema_0.9_final.pt", weights_only=True)
    torch.testing.assert_close(ema["out.2.weight"], single.ema.export(single.model, 0.9)["out.2.weight"])
    ckpt_dir = tmp_path / "two" / "checkpoints" / single.ckpt_dir.name  # same run identity for any world size
    ckpt = torch.load(ckpt_dir / "ckpt_000004.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    torch.testing.assert_close(ckpt["sampler"]["history"], single.sampler.state_dict()["history"])

    def rows(run):
        return list(csv.DictReader((tmp_path / run / "progress.csv").read_text().splitlines()))

    for r1, r2 in zip(rows("one"), rows("two"), strict=True):  # logged statistics cover the global batch
        assert r1["step"] == r2["step"]
        assert float(r1["loss"]) == pytest.approx(float(r2["loss"]), rel=1e-4)


def test_slurm_environment_translation():
    assert first_host("gpu[03-05,09],cpu01") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a-b[1,2]") == "a-b1"
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "n[10-11]",
           "SLURM_JOB_ID": "123"}  # fmt: skip
    out = slurm_to_torch_env(env)
    assert out["RANK"] == "5" and out["WORLD_SIZE"] == "8" and out["LOCAL_RANK"] == "1"
    assert out["MASTER_ADDR"] == "n10" and out["MASTER_PORT"] == str(15000 + 123)
    assert slurm_to_torch_env({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # a one-task srun step
    assert slurm_to_torch_env({**env, "RANK": "0", "WORLD_SIZE": "8"}) == {}  # torchrun wins
    assert slurm_to_torch_env({"SLURM_NTASKS": "4"}) == {}  # no task id: not inside srun
