"""One rule for choosing the torch device, used by every stage: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

import os

import torch

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device ``name`` asks for; ``auto`` (or None / "") is CUDA when available, else the CPU.

    A bare ``cuda`` under torchrun/srun is ``cuda:LOCAL_RANK`` (modulo the visible devices). Asking for CUDA
    on a machine without it is an error, never a silent fall-back to the CPU.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not name or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: choose {DEVICE_HELP}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dev


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(cap: int = 4) -> int:
    """Worker processes/threads for data loading: ``cap``, never more than the CPUs this process may use
    (DataLoader warns, and slows down, when asked for more workers than cores)."""
    return max(1, min(cap, usable_cpus()))
