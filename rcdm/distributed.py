"""Process-group setup for one process, torchrun, or srun under SLURM; rank-0-only helpers.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. srun exports SLURM_PROCID,
SLURM_LOCALID and SLURM_STEP_NUM_TASKS (SLURM_NTASKS in older versions) instead; we translate those into the
torchrun names so a multi-node job needs no wrapper script. The master address is the first host of
SLURM_NODELIST (expanded by ``scontrol show hostnames`` when available, else parsed here) and the port is
derived from the job id so concurrent jobs on one node do not collide.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rcdm.device import resolve_device, usable_cpus


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    # A gloo group for small CPU-side agreements (stop flags) that must not synchronise the GPU stream.
    cpu_group: object | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[03-05,09],cpu01`` (-> ``gpu03``)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _master_addr_from_nodelist(nodelist: str) -> str:
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return first_host(nodelist)


def slurm_to_torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables implied by an srun task's SLURM_* environment ({} when not under srun)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}  # torchrun (or the user) already set them
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if "SLURM_PROCID" not in environ or not ntasks or int(ntasks) <= 1:
        return {}
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST", "")
    )
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(int(ntasks)),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = _master_addr_from_nodelist(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in environ:
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "0"
        env["MASTER_PORT"] = str(15000 + int(re.sub(r"\D", "", job) or 0) % 20000)
    return env


def rank_threads(environ: Mapping[str, str], world_size: int, affinity: int) -> int:
    """CPU threads for one process of a ``world_size`` group: its share of the CPUs the job step gave
    (``SLURM_CPUS_PER_TASK``, else the ``affinity`` CPUs it may run on) among the processes that share them
    (torchrun's ``LOCAL_WORLD_SIZE``; one under srun with CPUs per task; else, not knowing, the whole group),
    never more than ``OMP_NUM_THREADS`` when it is set.

    Snakemake exports the rule's ``threads`` as OMP_NUM_THREADS *and* MKL_NUM_THREADS, OPENBLAS_NUM_THREADS,
    ... for the whole job; each torchrun process would take them all. Two gloo processes on 2 CPUs ran 0.9
    steps/s so (MKL_NUM_THREADS=2 each), against 11.5 with one thread each.
    """
    per_task = environ.get("SLURM_CPUS_PER_TASK")
    sharing = int(environ.get("LOCAL_WORLD_SIZE") or (1 if per_task else world_size))
    share = max(1, int(per_task or affinity) // max(1, sharing))
    omp = environ.get("OMP_NUM_THREADS", "")
    return min(share, int(omp)) if omp.isdigit() and int(omp) > 0 else share


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by the environment; a single process gets a trivial context.

    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    Backend: nccl on CUDA, gloo on CPU. Each process of a group sets its CPU threads (torch's intra-op pool,
    which also sets MKL's) to its share of the node (:func:`rank_threads`).
    """
    os.environ.update(slurm_to_torch_env(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)  # a bare "cuda" becomes cuda:LOCAL_RANK
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(device=dev)
    torch.set_num_threads(rank_threads(os.environ, world, usable_cpus()))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"distributed run (WORLD_SIZE={world}) but {key} is not set")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistContext(rank, world, local_rank, dev, backend, cpu_group)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)


def torchrun_launcher(nodes: int = 1, procs_per_node: int = 1, cpus_per_node: int = 1, gpus_per_node: int = 0,
                      port_base: int = 40000) -> str:  # fmt: skip
    """The shell words that start ``-m rcdm ...`` (they end in ``-m``; empty for one process) on ``nodes`` x
    ``procs_per_node`` processes, as the workflow's train rule and its SLURM test run them.

    One node: ``torchrun --standalone``. Several, inside a SLURM job of one task per node whose shell runs
    directly (not under ``srun -n1``): ``srun`` starts one torchrun per task, spread over the job's nodes, and
    they meet in a c10d rendezvous on the job's first node (port ``port_base`` + job id mod 20000, so jobs
    sharing a node do not collide); ``--kill-on-bad-exit`` ends every torchrun when one fails. The SLURM
    plugin's job step keeps only ``SLURM_JOB_ID`` of the job's variables, so the node list and count come
    from ``squeue`` and the step's CPUs and GPUs per task are given explicitly.
    """
    if nodes <= 1:
        return f"torchrun --standalone --nproc-per-node={procs_per_node} -m" if procs_per_node > 1 else ""
    job = "squeue -h -j $SLURM_JOB_ID -o"
    head = f"$(scontrol show hostnames $({job} %N) | head -n1)"
    gres = f" --gres=gpu:{gpus_per_node}" if gpus_per_node else ""
    return (
        f"srun --ntasks={nodes} --nodes=$({job} %D) --cpus-per-task={cpus_per_node}{gres} "
        "--kill-on-bad-exit=1 "
        f"torchrun --nnodes={nodes} --nproc-per-node={procs_per_node} --rdzv-backend=c10d "
        f"--rdzv-endpoint={head}:$(({port_base} + SLURM_JOB_ID % 20000)) --rdzv-id=$SLURM_JOB_ID -m"
    )
