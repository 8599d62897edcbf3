"""Multi-node training's launch on the local (one-node) SLURM cluster: two tasks stand in for two nodes.

The train rule, with ``resources.train.nodes`` > 1, is an MPI-style job of one task per node (``mpi``: the
job's shell runs directly, not under ``srun -n1``) whose shell starts one torchrun per task with ``srun``,
meeting in a c10d rendezvous on the first node (``rcdm.distributed.torchrun_launcher``, which the workflow's
rule uses too). Here a one-rule Snakefile submits that launch through the SLURM executor plugin with
``--ntasks=2`` on the single node (this cluster has no second machine; only ``--nodes`` is left out): two
torchruns, ``--nnodes=2``, gloo on CPU. A few steps must equal one process on the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_slurm_profile import _cluster_problem
from test_train import FLAGS, write_pair

from rcdm.distributed import torchrun_launcher

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PLUGIN_FLAGS = [
    "--executor", "slurm", "--jobs", "1", "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
    "--default-resources", "slurm_partition=debug", "mem_mb=3000", "runtime=10",
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def test_two_node_launch_equals_one_process(cluster, tmp_path):
    img, feat, _, _ = write_pair(tmp_path, n=16)
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({**FLAGS, "dropout": 0.0}))
    args = (f"train --images {img} --features {feat} --model-flags {flags} --steps 6 --batch-size 4 "
            "--save-interval 100000 --log-interval 1 --workers 0 --no-progress --deterministic --ema 0.99 "
            "--device cpu")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "rcdm", *args.split(), "--out", str(ref)], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    launcher = torchrun_launcher(nodes=2, procs_per_node=1)
    assert launcher.startswith("srun --ntasks=2 ") and "--nnodes=2" in launcher and "c10d" in launcher
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        "from rcdm.distributed import torchrun_launcher\n\n"
        "rule train:\n    output: 'run/model_final.pt'\n    threads: 1\n    log: 'train.log'\n"
        # the train rule's resources for nodes: 2 (common.smk: train_resources), less --nodes=2
        "    resources: mpi='srun', tasks=2, launcher=torchrun_launcher(2, 1, 1)\n"
        f"    shell: 'OMP_NUM_THREADS=1 {{resources.launcher}} rcdm {args} --out run > {{log}} 2>&1'\n"
    )
    cmd = ["timeout", "-k", "10", "600", sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d",
           str(tmp_path), *PLUGIN_FLAGS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=660, env=env)
    log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + log[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["step"] == 6, summary
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*/ckpt_*.pt")
    assert torch.load(ckpt, weights_only=True)["world_size"] == 2  # two torchruns of one process each
    ours = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)
    theirs = torch.load(ref / "model_final.pt", weights_only=True)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=key)
