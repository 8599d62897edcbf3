"""Time limits on a real (one-node, localhost) SLURM cluster: training that needs several allocations.

A one-rule Snakefile submits ``rcdm train`` through the SLURM executor plugin, as the workflow does (the job
runs Snakemake, which runs the rule under ``srun``), with a one-minute time limit (two under torchrun). The
trainer reads the job's end time, saves before it, requeues its own job and exits; SLURM starts the job again
and the trainer resumes. The final weights must be bit-identical to an uninterrupted run's, with one process
and under torchrun with two. Two more stop the main Snakemake process: SIGINT (Ctrl-C) cancels its running job
(``scancel``: the trainer saves on the SIGTERM that brings), SIGTERM lets the running job finish and submits
nothing more. Each test costs minutes (SLURM holds a requeued job ~2 minutes before it is eligible again).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_slurm_profile import _cluster_problem
from test_train import FLAGS, write_pair

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PLUGIN_FLAGS = [
    "--executor", "slurm", "--jobs", "1", "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--slurm-requeue",
    "--default-resources", "slurm_partition=debug", "mem_mb=1500", "runtime=1",
]  # fmt: skip
STOP_MARGIN = 10  # seconds before the job's end: the save and the requeue happen inside the minute


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tl")
    img, feat, _, _ = write_pair(root, n=16)
    flags = root / "flags.json"
    flags.write_text(json.dumps({**FLAGS, "dropout": 0.0}))
    return root, img, feat, flags


def _train_args(img, feat, flags, out, steps: int) -> list[str]:
    return ["train", "--images", str(img), "--features", str(feat), "--model-flags", str(flags),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--save-interval", "100000",
            "--log-interval", "50", "--workers", "0", "--no-progress", "--deterministic", "--ema", "0.99",
            "--device", "cpu", "--stop-margin", str(STOP_MARGIN)]  # fmt: skip


def _launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "rcdm"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m",
            "rcdm"]  # fmt: skip


def _steps_for(seconds: float, data, procs: int) -> int:
    """Steps that take about ``seconds`` here (the trainer's own steps/s on a short run), so the job needs
    two allocations whatever this machine's speed and load."""
    root, img, feat, flags = data
    out = root / f"calib{procs}"
    args = _train_args(img, feat, flags, out, 150)
    args[args.index("--log-interval") + 1] = "50"
    subprocess.run(_launcher(procs) + args, check=True, env=_env(), capture_output=True, timeout=600)
    rows = list(csv.DictReader((out / "progress.csv").read_text().splitlines()))
    return max(100, int(seconds * float(rows[-1]["steps_per_s"])))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs: bit-identical arithmetic


def _snakefile(tmp: Path, command: list[str], threads: int) -> Path:
    shell = " ".join(command)
    path = tmp / "Snakefile"
    path.write_text(
        f"rule train:\n    output: 'run/model_final.pt'\n    threads: {threads}\n"
        f"    log: 'train.log'\n    shell: 'OMP_NUM_THREADS=1 {shell} > {{log}} 2>&1'\n"
    )
    return path


@pytest.mark.parametrize(("procs", "minutes"), [(1, 1), (2, 2)])
def test_time_limit_resumes_bit_identical(cluster, data, tmp_path, procs, minutes):
    """A one-minute limit for one process; two minutes under torchrun with two, whose start-up inside the
    job (torchrun and two interpreters importing torch) would otherwise take most of a minute on 2 cores.
    The rule asks for 2 threads, so Snakemake exports MKL_NUM_THREADS=2 to the job: each torchrun process
    must still train on its one CPU (rcdm.distributed.rank_threads), or it runs ~13x slower."""
    root, img, feat, flags = data
    # 1.5x the training an allocation can hold after the margin (even with no start-up at all): the job
    # needs a second allocation even if this machine runs up to 1.5x faster than at calibration (its speed
    # varied that much between runs here), and the second one still finishes it
    steps = _steps_for(1.5 * (60.0 * minutes - STOP_MARGIN), data, procs)
    ref = root / f"ref{procs}"
    subprocess.run(_launcher(procs) + _train_args(img, feat, flags, ref, steps), check=True, env=_env(),
                   capture_output=True, timeout=600)  # fmt: skip
    snakefile = _snakefile(tmp_path, _launcher(procs) + _train_args(img, feat, flags, "run", steps), procs)
    cmd = ["timeout", "-k", "10", "1500", sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d",
           str(tmp_path), *PLUGIN_FLAGS]  # fmt: skip
    cmd[cmd.index("runtime=1")] = f"runtime={minutes}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1560)
    log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + log[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["step"] == steps and summary["resumed_from"], summary  # it did need a second allocation
    for name in ("model_final.pt", "ema_0.99_final.pt"):
        ours = torch.load(tmp_path / "run" / name, weights_only=True)
        theirs = torch.load(ref / name, weights_only=True)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def _jobs() -> list[str]:
    """``JOBID NAME STATE`` of every job in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    return out.splitlines()


def _start_snakemake(snakefile: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Snakemake (5-minute job limit) in the background, once its job runs: (process, SLURM job id)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(tmp_path), *PLUGIN_FLAGS]
    cmd[cmd.index("runtime=1")] = "runtime=5"
    # SIGINT as in a terminal: a shell without job control starts background commands with SIGINT ignored,
    # the child would inherit that, and Python installs no KeyboardInterrupt handler then
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(line.endswith("RUNNING") for line in _jobs()):
        time.sleep(2)
    running = [line for line in _jobs() if line.endswith("RUNNING")]
    if not running:
        proc.kill()
        pytest.fail("the training job never started")
    return proc, running[0].split()[0]


def test_sigint_to_snakemake_cancels_its_job(cluster, data, tmp_path):
    root, img, feat, flags = data
    snakefile = _snakefile(tmp_path, _launcher(1) + _train_args(img, feat, flags, "run", 10**7), 1)
    proc, job = _start_snakemake(snakefile, tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(
                "Snakemake still ran 120 s after SIGINT:\n"
                + proc.communicate()[0][-4000:]
                + "\n"
                + "\n".join(_jobs())
            )
        deadline = time.time() + 60
        while time.time() < deadline and any(line.startswith(job + " ") for line in _jobs()):
            time.sleep(2)
        assert not any(line.startswith(job + " ") for line in _jobs()), _jobs()
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-u", "root"], capture_output=True)


def test_sigterm_to_snakemake_finishes_the_running_job_and_submits_no_more(cluster, data, tmp_path):
    root, img, feat, flags = data
    train = " ".join(_launcher(1) + _train_args(img, feat, flags, "run", 300))
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        "rule after:\n    input: 'run/model_final.pt'\n    output: 'after.txt'\n"
        "    shell: 'touch {output}'\n\n"
        "rule train:\n    output: 'run/model_final.pt'\n    threads: 1\n"
        f"    shell: 'OMP_NUM_THREADS=1 {train}'\n"
    )
    proc, _ = _start_snakemake(snakefile, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=600)
        assert "Will exit after finishing currently running jobs" in out, out[-3000:]
        assert (tmp_path / "run" / "model_final.pt").is_file()  # the running job finished
        assert not (tmp_path / "after.txt").exists()  # nothing new was submitted
        assert not _jobs()
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-u", "root"], capture_output=True)
