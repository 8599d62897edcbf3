import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_train import FLAGS, write_pair

from rcdm.device import usable_cpus
from rcdm.distributed import first_host, rank_threads, slurm_to_torch_env
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


def test_rank_threads_share_the_job_cpus():
    snakemake_job = {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "SLURM_CPUS_PER_TASK": "8"}
    local = {"LOCAL_WORLD_SIZE": "8"}  # torchrun: 8 processes on this node of a 32-process group
    assert rank_threads({**snakemake_job, **local}, 32, affinity=64) == 1  # 8 CPUs: not 8 x 8 threads
    assert rank_threads({**snakemake_job, "LOCAL_WORLD_SIZE": "2"}, 2, affinity=64) == 4
    assert rank_threads({"SLURM_CPUS_PER_TASK": "64", **local}, 8, affinity=128) == 8  # the step's CPUs
    assert rank_threads({"SLURM_CPUS_PER_TASK": "6"}, 16, affinity=128) == 6  # srun: each task its own CPUs
    assert rank_threads({"LOCAL_WORLD_SIZE": "2"}, 2, affinity=16) == 8
    assert rank_threads({}, 4, affinity=16) == 4  # nothing says who shares: the whole group
    assert rank_threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 2, affinity=16) == 1  # torchrun's
    assert rank_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 4, affinity=2) == 1  # at least 1
    assert rank_threads({"OMP_NUM_THREADS": ""}, 1, affinity=6) == 6


def test_torchrun_processes_take_their_share_of_the_rule_threads(tmp_path):
    """Snakemake exports a rule's threads as OMP_ and MKL_NUM_THREADS for the whole job; under torchrun each
    process must use its share, or two processes on two CPUs run many times slower (MKL's threads spin)."""
    img, feat, _, _ = write_pair(tmp_path)
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({**FLAGS, "dropout": 0.0}))
    env = {**os.environ, **{f"{lib}_NUM_THREADS": "2" for lib in ("OMP", "MKL", "OPENBLAS", "NUMEXPR")}}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rcdm",
           "train", "--images", str(img), "--features", str(feat), "--model-flags", str(flags),
           "--out", str(out), "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-progress",
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["cpu_threads_per_process"] == min(2, max(1, usable_cpus() // 2))
