"""``rcdm train``: train the representation-conditioned diffusion model from the extraction's HDF5 files.

One process, torchrun (``torchrun --nproc-per-node 8 -m rcdm train ...``) or srun under SLURM (ranks from
SLURM_*). Files under ``--out`` (only rank 0 writes):

- ``checkpoints/run-<identity>/ckpt_NNNNNN.pt``: resumable state (model, EMA, optimizer, grad scaler, timestep
  sampler, step, RNG states, configuration), written atomically every ``--save-interval`` steps, on
  SIGTERM/SIGUSR1 and before the job's time limit; the last ``--keep`` are kept. ``<identity>`` is a digest of
  what determines the weights (:func:`run_identity`: which images, which encoder file and layer, the model
  flags, the result-changing settings), so a restarted run resumes from the newest checkpoint that loads
  (``--resume auto``) only if nothing that changes its result changed; otherwise it starts afresh in its own
  folder, and says which. Keep this folder out of a workflow's declared outputs (Snakemake deletes those).
- ``model_NNNNNN.pt``, ``ema_<rate>_NNNNNN.pt``: plain state dicts (published naming) every
  ``--export-interval`` steps (default 0: none; each is as large as the model, 1.7 GB at 128 px).
- ``ema_<rate>_final.pt`` (per rate), ``model_final.pt`` and, last, ``train_summary.json``: written when the
  run reaches ``--steps``; the workflow's output.
- ``progress.csv``: loss, mse, vb, their per-quartile-of-t means, grad norm, lr, data-wait fraction,
  throughput, every ``--log-interval`` steps. ``train_config.json``: the configuration.

Time limits: under SLURM the trainer reads its job's end time (``squeue -O EndTime``; or ``--end-time``),
saves ``--stop-margin`` seconds before it, requeues its own job (``scontrol requeue``: the same job restarts
later and resumes; no retry is used up) and exits 75. No signal is needed, so no wrapper process (the job's
Snakemake, bash, torchrun) dies first. SIGTERM (preemption, ``scancel``, requeue) and SIGUSR1 still save and
exit 75.

A run always trains ``--steps`` steps, so its weights depend on its configuration and seed only, never on
the machine's speed. ``--time-budget`` is a safety cap, not a stopping rule: a run still short of ``--steps``
when it is spent saves a checkpoint and fails (exit 4) with one line saying so.

Exit codes: 0 finished (``--steps`` done), 75 stopped after saving (rerun the same command to continue),
1 bad configuration or data (permanent: retrying cannot help), 3 non-finite loss (the last good checkpoint is
kept), 4 the ``--time-budget`` cap ran out before ``--steps`` (saved: rerun to continue, or raise the cap).
``--check`` runs every configuration and data check, and finds the checkpoint to resume, without building
the network.

Departures from guided-diffusion's TrainLoop, on purpose: the batch size is global (split over ranks);
micro-batch losses are averaged (not summed) so the gradient equals the full batch's; timesteps and noise of
the whole global batch come from a generator seeded by (seed, step), so results do not depend on the number of
processes and resume exactly; mixed precision uses autocast with fp32 master weights (``use_fp16`` in the
model flags selects ``--precision fp16``); the loss-aware sampler is updated once per step with its losses.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rcdm.device import default_workers, resolve_device
from rcdm.distributed import DistContext, barrier, cleanup, init_distributed
from rcdm.ema import EMA, rate_tag
from rcdm.errors import EXIT_PERMANENT, InputFileError, reading
from rcdm.factory import read_model_flags
from rcdm.io import atomic_path, safe_torch_load
from rcdm.schedule_sampler import LossAwareSampler, create_named_schedule_sampler
from rcdm.train_data import H5PairDataset, StepBatchSampler, ignore_stop_signals, to_model_images

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume
EXIT_CONFIG = EXIT_PERMANENT  # 1
EXIT_NONFINITE = 3
EXIT_TIME_BUDGET = 4  # the --time-budget safety cap ran out before --steps (saved; rerun to continue)
CHECKPOINT_FORMAT = "rcdm-train-checkpoint"
CHECKPOINT_VERSION = 1
#: flags that change neither the architecture nor the diffusion: may differ between a checkpoint and a resume
RUNTIME_FLAGS = ("use_checkpoint", "use_fp16", "dropout")
_NO_BAD_STEP = 2**62


class TrainConfigError(ValueError):
    """A training configuration that cannot work (reported before any compute)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in every checkpoint)."""

    images: str
    features: str
    out: str
    model_flags: dict[str, Any] = field(default_factory=dict)
    steps: int = 0  # optimizer steps in total: required (> 0)
    batch_size: int = 32  # global, over all ranks
    microbatch: int = 0  # per rank; 0 = the whole per-rank batch
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0
    lr_anneal_steps: int = 0
    grad_clip: float = 0.0
    ema_rates: list[float] = field(default_factory=lambda: [0.9999])
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    schedule_sampler: str = "uniform"
    save_interval: int = 10000
    keep: int = 3
    export_interval: int = 0  # plain model/EMA exports every N steps besides the final ones (0: final only)
    log_interval: int = 100
    workers: int = field(default_factory=default_workers)  # DataLoader processes, <= the CPUs
    seed: int = 0
    time_budget: float = 0.0  # safety cap (seconds in this process): fail, saved, if --steps are not done
    end_time: float = 0.0  # epoch seconds the job must stop by (0: SLURM's end time when under SLURM)
    stop_margin: float = 180.0  # seconds before end_time to stop, save and requeue
    requeue: bool = True  # under SLURM, requeue the own job after a save before the time limit
    resume: str = "auto"  # auto | none | PATH
    ckpt_dir: str = ""  # "" = <out>/checkpoints
    random_flip: bool = True
    deterministic: bool = False
    deep_check: bool = False
    trust_checkpoint: bool = False  # --resume PATH may unpickle code (only for files you trust)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.ckpt_dir) if self.ckpt_dir else Path(self.out) / "checkpoints"


def load_model_flags(spec: str | os.PathLike | dict | None) -> dict[str, Any]:
    """Model flags (:func:`rcdm.factory.read_model_flags`); a bad value is a :class:`TrainConfigError`."""
    try:
        return read_model_flags(spec) or {}
    except ValueError as err:
        raise TrainConfigError(str(err)) from err


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integers (independent streams for (seed, step, purpose, rank))."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise TrainConfigError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("bf16 is not supported on this GPU; use --precision fp16 or fp32")
    return precision


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, cuda, numpy, python), as types ``weights_only`` loading accepts."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_rng_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    _set_numpy_rng_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_step(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[-1])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Resumable checkpoints in ``ckpt_dir``, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("ckpt_*.pt") if p.stem.rsplit("_", 1)[-1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable checkpoint, checked for completeness; raises ValueError for anything else."""
    try:
        state = safe_torch_load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated or corrupt file: torch raises several types
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    return validate_checkpoint(state, path)


def validate_checkpoint(state: Any, path: Path) -> dict[str, Any]:
    """``state`` if it is a complete resumable checkpoint, else ValueError naming ``path``."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rcdm training checkpoint")
    required = ("step", "model", "ema_state", "optimizer", "model_flags", "complete")
    missing = [k for k in required if k not in state]
    if missing or not state["complete"]:
        raise ValueError(f"{path}: incomplete checkpoint (missing {missing})")
    return state


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt or partial ones are skipped with a warning."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def flag_differences(
    a: dict[str, Any], b: dict[str, Any], ignore: Sequence[str] = RUNTIME_FLAGS
) -> list[str]:
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


#: settings that change the trained weights (besides the model flags and the data): part of a run's identity.
#: Steps, intervals, workers, device, micro-batching and the number of processes are not: a run may be
#: continued with more steps, other intervals or another number of GPUs and stays the same run.
RESULT_SETTINGS = (
    "batch_size", "lr", "weight_decay", "warmup", "lr_anneal_steps", "grad_clip", "ema_rates",
    "schedule_sampler", "seed", "random_flip",
)  # fmt: skip
IMAGES_IDENTITY = ("paths_sha256", "num_images", "image_size", "dataset", "split")
FEATURES_IDENTITY = (
    "paths_sha256", "num_images", "encoder", "layer", "encoder_sha256", "checkpoint_sha256", "dim", "dtype",
    "input_size", "input_norm",
)  # fmt: skip


def run_identity(
    cfg: TrainConfig, flags: dict[str, Any], precision: str, images_attrs: dict, features_attrs: dict
) -> tuple[dict[str, Any], str]:
    """What determines a run's weights, and its digest: the data (digests recorded by extraction: which
    images, which encoder file), the model/diffusion flags and the result-changing settings.

    A checkpoint is resumed only by a run of the same identity: each identity has its own checkpoint folder.
    """

    def pick(attrs: dict, keys: Sequence[str]) -> dict[str, Any]:
        return {k: _plain(attrs[k]) for k in keys if k in attrs}

    identity = {
        "images": pick(images_attrs, IMAGES_IDENTITY),
        "features": pick(features_attrs, FEATURES_IDENTITY),
        "model_flags": {k: v for k, v in sorted(flags.items()) if k not in RUNTIME_FLAGS},
        "settings": {k: getattr(cfg, k) for k in RESULT_SETTINGS},
        "precision": precision,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return identity, hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """HDF5 attribute values (numpy scalars) as plain JSON types."""
    return value.item() if hasattr(value, "item") else value


def slurm_end_time(environ: dict[str, str] | None = None) -> float | None:
    """The epoch second at which this SLURM job's time limit ends (``squeue``), or None outside SLURM."""
    import datetime
    import subprocess

    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-O", "EndTime"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return datetime.datetime.strptime(out, "%Y-%m-%dT%H:%M:%S").timestamp()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None  # no squeue, an unlimited job ("N/A", "UNLIMITED"): no end time to stop before


def requeue_slurm_job(environ: dict[str, str] | None = None) -> bool:
    """``scontrol requeue`` this job (it restarts later with the same command); False where that fails."""
    import subprocess

    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"rcdm train: scontrol requeue {job} failed: {err}", file=sys.stderr)
        return False
    if done.returncode:
        print(f"rcdm train: scontrol requeue {job} failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


class RunLock:
    """Exclusive lock (``flock`` on ``<run folder>/.lock``): one trainer writes a run's checkpoints at a time.

    A second trainer of the same run (a job resubmitted while the first still runs, two workflow processes)
    fails at once, naming the holder, instead of both saving into one folder. The lock dies with its process.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self._fh = None

    def acquire(self) -> None:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the lock lives as long as it)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise TrainConfigError(
                f"another trainer is writing this run ({self.path.parent}; holder: {holder}); "
                "wait for it to end or stop it (scancel) first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"host={socket.gethostname()} pid={os.getpid()} job={os.environ.get('SLURM_JOB_ID', '-')}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


class _Autocast:
    """Calls ``model`` under autocast (``dtype`` None: plain fp32)."""

    def __init__(self, model, device_type: str, dtype: torch.dtype | None):
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(*args, **kwargs)


class Trainer:
    """A training run: validates the configuration, builds or resumes the state, runs ``train()``."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext | None = None, check_only: bool = False):
        """``check_only``: validate everything (configuration, data, flags, the checkpoint to resume) and
        stop before building the network (``rcdm train --check``, the workflow's pre-flight)."""
        from rcdm.factory import create_diffusion_from_flags, create_model_from_flags, resolve_flags

        self.cfg = cfg
        self.ctx = ctx or DistContext(device=resolve_device("auto"))
        self.device = self.ctx.device
        self._validate_numbers()
        with reading(cfg.images, cfg.features):
            self.data = H5PairDataset(cfg.images, cfg.features, deep_check=cfg.deep_check)
        self.flags = resolve_flags(**self._flags_for_data(load_model_flags(cfg.model_flags)))
        precision = "fp16" if self.flags["use_fp16"] and cfg.precision == "auto" else cfg.precision
        self.precision = resolve_precision(precision, self.device)
        self.local_batch = cfg.batch_size // self.ctx.world_size
        self.microbatch = cfg.microbatch or self.local_batch
        # the data order must have at least one batch per epoch
        try:
            StepBatchSampler(self.data.num_images, cfg.batch_size, cfg.seed, world_size=self.ctx.world_size)
        except ValueError as err:
            msg = f"{cfg.images}: {err}; lower --batch-size or train on more images"
            raise TrainConfigError(msg) from None
        self.identity, self.identity_sha256 = run_identity(
            cfg, self.flags, self.precision, self.data.images_attrs, self.data.features_attrs
        )
        self.ckpt_dir = cfg.checkpoint_dir / f"run-{self.identity_sha256[:12]}"

        resume = self._find_resume()  # before any weights are built: a mismatch is reported for free
        self.resume_plan = resume[0] if resume is not None else None
        if check_only:
            return
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(seed_for(cfg.seed, 0, 2))  # same initial weights on every rank
        self.model = create_model_from_flags(**{**self.flags, "use_fp16": False}).to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.diffusion = create_diffusion_from_flags(**self.flags)
        self.params = list(self.model.parameters())
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.ema = EMA(self.model, cfg.ema_rates)
        self.sampler = create_named_schedule_sampler(
            cfg.schedule_sampler, self.diffusion.num_timesteps, self.device
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.resumed_from: Path | None = None
        if resume is not None:
            self._restore(*resume)
        if self._init_weights is not None:
            self._load_initial_weights(self._init_weights)

        self.ddp = None
        fwd = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            fwd = self.ddp
        if cfg.compile:
            fwd = torch.compile(fwd)
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.forward_model = _Autocast(fwd, self.device.type, amp)
        self._gen = torch.Generator(device=self.device)
        self._keys: list[str] | None = None
        self._stop_signal: int | None = None
        self._pending_stop = None
        self._end_time = 0.0
        self._reset_stats()

    # ----------------------------------------------------------------------------------- configuration
    def _validate_numbers(self) -> None:
        cfg, world = self.cfg, self.ctx.world_size
        problems = []
        if cfg.batch_size < 1 or cfg.batch_size % world:
            problems.append(
                f"--batch-size {cfg.batch_size} must be a positive multiple of the {world} processes"
            )
        local = cfg.batch_size // max(world, 1)
        if cfg.microbatch < 0 or cfg.microbatch > local:
            problems.append(f"--microbatch {cfg.microbatch} must be in [0, per-process batch {local}]")
        if cfg.steps < 1:
            problems.append("give --steps N > 0 (training runs fixed steps; workflow: train.steps)")
        if cfg.time_budget < 0:
            problems.append("--time-budget must be >= 0 (0: no cap)")
        if cfg.export_interval < 0:
            problems.append("--export-interval must be >= 0 (0: only the final exports)")
        for name in ("save_interval", "log_interval", "keep"):
            if getattr(cfg, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if cfg.lr <= 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.warmup < 0 or cfg.workers < 0:
            problems.append("lr must be > 0; weight decay, grad clip, warmup and workers >= 0")
        if problems:
            raise TrainConfigError("; ".join(problems))

    def _flags_for_data(self, flags: dict[str, Any]) -> dict[str, Any]:
        flags = dict(flags)
        for key, value, what in (
            ("image_size", self.data.image_size, f"images of {self.cfg.images}"),
            ("ssl_dim", self.data.feature_dim, f"features of {self.cfg.features}"),
        ):
            if key not in flags:
                flags[key] = value
            elif int(flags[key]) != value:
                raise TrainConfigError(
                    f"model flag {key}={flags[key]} but the {what} have {key.split('_')[0]} {value}"
                )
        return flags

    def _find_resume(self) -> tuple[Path, dict[str, Any]] | None:
        cfg = self.cfg
        self._init_weights = None
        self._ckpts_seen = set(list_checkpoints(self.ckpt_dir))
        legacy = list_checkpoints(cfg.checkpoint_dir)
        if legacy and self.ctx.is_main:
            warnings.warn(
                f"{cfg.checkpoint_dir} holds checkpoints of unknown inputs ({legacy[0].name}, written before "
                "runs were keyed by their inputs); they are not resumed: delete them",
                stacklevel=2,
            )
        if cfg.resume == "none":
            existing = list_checkpoints(self.ckpt_dir)
            if existing:
                raise TrainConfigError(
                    f"--resume none but {self.ckpt_dir} already holds checkpoints of this run "
                    f"({existing[0].name}); use --resume auto to continue or remove them"
                )
            return None
        # The newest checkpoint of this run wins even over an explicit path: rerunning the same command after
        # a preemption must continue the run, not restart it from that path.
        found = find_resume_checkpoint(self.ckpt_dir)
        if found is not None and found[1].get("identity_sha256") != self.identity_sha256:
            raise TrainConfigError(
                f"{found[0]} belongs to another run (identity {str(found[1].get('identity_sha256'))[:12]}, "
                f"this run {self.identity_sha256[:12]}): move it out of {self.ckpt_dir}"
            )
        if found is None and cfg.resume != "auto":
            path = Path(cfg.resume)
            if not path.is_file():
                raise TrainConfigError(f"--resume checkpoint not found: {path}")
            with reading(path, fix="give another --resume file (or --resume auto / none)"):
                state = safe_torch_load(path, trust=cfg.trust_checkpoint)
                if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
                    found = (path, validate_checkpoint(state, path))
                else:  # a plain state dict (an export or a published checkpoint): initial weights, step 0
                    from rcdm.checkpoint import unwrap_state_dict

                    self._init_weights = (path, unwrap_state_dict(state, str(path)))
                    return None
        if found is None:
            return None
        path, state = found
        diffs = flag_differences(state["model_flags"], self.flags)
        if diffs:
            raise TrainConfigError(
                f"cannot resume from {path}: it was trained with other model/diffusion flags "
                f"({'; '.join(diffs)})"
            )
        return path, state

    def _load_initial_weights(self, init: tuple[Path, dict[str, torch.Tensor]]) -> None:
        from rcdm.checkpoint import check_state_dict

        path, sd = init
        check_state_dict(self.model, sd, self.flags, source=str(path))
        self.model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        self.ema = EMA(self.model, self.cfg.ema_rates)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        from rcdm.checkpoint import check_state_dict

        check_state_dict(self.model, state["model"], self.flags, source=str(path))
        self.model.load_state_dict(state["model"], strict=True)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.ema.load_state_dict(state["ema_state"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            if state.get("sampler"):
                self.sampler.load_state_dict(state["sampler"])
        except (ValueError, KeyError) as err:
            raise TrainConfigError(f"cannot resume from {path}: {err}") from err
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank])
        self.step = int(state["step"])
        self.resumed_from = path
        old = state.get("config", {})
        for key in ("batch_size", "seed", "random_flip", "schedule_sampler"):
            if key in old and old[key] != getattr(self.cfg, key):
                warnings.warn(
                    f"resuming with {key}={getattr(self.cfg, key)!r} (checkpoint: {old[key]!r}); the run "
                    "will not equal an uninterrupted one",
                    stacklevel=2,
                )

    # ----------------------------------------------------------------------------------- one step
    def _reset_stats(self) -> None:
        dev = self.device
        self._sums = torch.zeros(3, 5, dtype=torch.float64, device=dev)  # key x (q0..q3, all)
        self._counts = torch.zeros(5, dtype=torch.float64, device=dev)
        self._grad_norm = torch.zeros((), dtype=torch.float64, device=dev)
        self._bad_step = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=dev)
        self._stat_steps = 0
        self._wait = 0.0
        self._interval_start = time.perf_counter()

    def lr_at(self, step: int) -> float:
        lr = self.cfg.lr
        if self.cfg.warmup:
            lr *= min(1.0, (step + 1) / self.cfg.warmup)
        if self.cfg.lr_anneal_steps:
            lr *= max(0.0, 1.0 - step / self.cfg.lr_anneal_steps)
        return lr

    def _accumulate(self, t: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        if self._keys is None:
            self._keys = [k for k in ("loss", "mse", "vb") if k in terms]
        quart = (4 * t // self.diffusion.num_timesteps).clamp_(max=3)
        ones = torch.ones_like(t, dtype=torch.float64)
        self._counts[:4].index_add_(0, quart, ones)
        self._counts[4] += t.shape[0]
        for j, key in enumerate(self._keys):
            v = terms[key].detach().double()
            self._sums[j, :4].index_add_(0, quart, v)
            self._sums[j, 4] += v.sum()

    def train_step(self, images: torch.Tensor, feats: torch.Tensor) -> None:
        """One optimizer step on this rank's share ``images`` (uint8 NHWC) / ``feats`` of the global batch."""
        cfg, dev = self.cfg, self.device
        b, m = self.local_batch, self.microbatch
        # Timesteps and noise of the whole global batch from (seed, step): identical for any world size.
        self._gen.manual_seed(seed_for(cfg.seed, self.step, 0))
        t_all, w_all = self.sampler.sample(cfg.batch_size, dev, generator=self._gen)
        s = self.data.image_size
        noise_all = torch.randn((cfg.batch_size, 3, s, s), generator=self._gen, device=dev)
        torch.manual_seed(seed_for(cfg.seed, self.step, 1, self.ctx.rank))  # dropout
        lo = self.ctx.rank * b
        t, w, noise = t_all[lo : lo + b], w_all[lo : lo + b], noise_all[lo : lo + b]
        x = to_model_images(images, dev, cfg.channels_last)
        if cfg.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        f = feats.to(dev, non_blocking=True).float()

        self.opt.zero_grad(set_to_none=True)
        step_losses = []
        for i in range(0, b, m):
            last = i + m >= b
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                terms = self.diffusion.training_losses(
                    self.forward_model, x[i : i + m], t[i : i + m], model_kwargs={"feat": f[i : i + m]},
                    noise=noise[i : i + m],
                )  # fmt: skip
                wm = w[i : i + m]
                loss = (terms["loss"] * wm).sum() / b  # mean over the rank's batch; DDP averages over ranks
                self.scaler.scale(loss).backward()
            step_losses.append(terms["loss"].detach())
            self._accumulate(t[i : i + m], {k: v * wm for k, v in terms.items()})
        losses = torch.cat(step_losses)
        if self.precision != "fp16":  # fp16: the grad scaler skips overflowing steps instead
            bad = ~torch.isfinite(losses).all()
            self._bad_step = torch.where(bad, self._bad_step.clamp(max=self.step), self._bad_step)
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.update_with_local_losses(t, losses, max_batch=b)

        lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.opt)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        self._grad_norm += torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True).double()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.params)
        self.step += 1
        self._stat_steps += 1

    # ----------------------------------------------------------------------------------- logging
    def _reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.ctx.distributed:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a loss since the last log was NaN/inf (one host sync)."""
        bad = int(self._reduce(self._bad_step.clone(), dist.ReduceOp.MIN).item())
        if bad != _NO_BAD_STEP:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad + 1} (optimizer step {bad} -> {bad + 1}); training stopped. "
                f"The last good checkpoint in {self.ckpt_dir} is kept. Lower --lr, add "
                "--grad-clip, use --precision fp32/bf16, or check the features for NaN (--deep-check)."
            )

    def _log(self, bar: tqdm | None) -> None:
        self.check_finite()
        packed = torch.cat([self._sums.flatten(), self._counts, self._grad_norm.reshape(1)])
        packed = self._reduce(packed).cpu().numpy()
        k = 3 * 5
        sums, counts, grad = packed[:k].reshape(3, 5), packed[k : k + 5], packed[k + 5] / self.ctx.world_size
        now = time.perf_counter()
        elapsed = max(now - self._interval_start, 1e-9)
        steps = max(self._stat_steps, 1)
        row: dict[str, Any] = {"step": self.step, "samples": self.step * self.cfg.batch_size,
                               "lr": self.lr_at(self.step - 1)}  # fmt: skip
        for j, key in enumerate(self._keys or []):
            row[key] = sums[j, 4] / max(counts[4], 1)
            for q in range(4):
                row[f"{key}_q{q}"] = sums[j, q] / counts[q] if counts[q] else float("nan")
        row["grad_norm"] = grad / steps
        if self.scaler.is_enabled():
            row["loss_scale"] = float(self.scaler.get_scale())
        row["data_wait_frac"] = self._wait / elapsed
        row["steps_per_s"] = self._stat_steps / elapsed
        row["images_per_s"] = self._stat_steps * self.cfg.batch_size / elapsed
        if self.ctx.is_main:
            self._write_csv(row)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{row.get('loss', float('nan')):.4f}", wait=f"{row['data_wait_frac']:.2f}"
                )
        self._reset_stats()

    def _write_csv(self, row: dict[str, Any]) -> None:
        path = Path(self.cfg.out) / "progress.csv"
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh))
        else:
            header = list(row)
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(header)
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=header, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )

    def _truncate_csv(self) -> None:
        """After a resume, drop log rows written after the checkpoint (they will be logged again)."""
        path = Path(self.cfg.out) / "progress.csv"
        if not (self.ctx.is_main and path.is_file()):
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.step]
        if len(kept) != len(rows):
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows(kept)

    # ----------------------------------------------------------------------------------- saving
    def checkpoint_state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            # "ema": the first rate as a plain state dict, so model loaders (rcdm.checkpoint) read this file
            "ema": self.ema.export(self.model, self.ema.rates[0]),
            "ema_state": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "model_flags": self.flags,
            "world_size": self.ctx.world_size,
            "identity": self.identity,
            "identity_sha256": self.identity_sha256,
            "complete": True,
        }

    def save(self) -> Path | None:
        """Write a resumable checkpoint of this step (rank 0); keep the last K."""
        self.check_finite()
        rngs = [rng_state()]
        if self.ctx.distributed:
            rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rngs, rng_state(), group=self.ctx.cpu_group)
        path = None
        if self.ctx.is_main:
            ckpt_dir = self.ckpt_dir
            path = ckpt_dir / f"ckpt_{self.step:06d}.pt"
            with atomic_path(path) as tmp:
                torch.save(self.checkpoint_state(rngs), tmp)
            # prune among checkpoints up to this step: a stray newer file (e.g. corrupt) never evicts ours
            mine = [p for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) <= self.step]
            for old in mine[self.cfg.keep :]:
                old.unlink(missing_ok=True)
        barrier(self.ctx)
        return path

    def export_step(self) -> None:
        """The ``--export-interval`` exports of this step (rank 0), on their own schedule."""
        self.check_finite()
        if self.ctx.is_main:
            self.export(f"{self.step:06d}")
        barrier(self.ctx)

    def export(self, tag: str) -> list[Path]:
        """``model_<tag>.pt`` and ``ema_<rate>_<tag>.pt``: plain state dicts loadable by any RCDM loader."""
        out = Path(self.cfg.out)
        written = []
        items = [(f"model_{tag}.pt", {k: v.detach().cpu() for k, v in self.model.state_dict().items()})]
        items += [(f"ema_{rate_tag(r)}_{tag}.pt", self.ema.export(self.model, r)) for r in self.ema.rates]
        for name, sd in items:
            with atomic_path(out / name) as tmp:
                torch.save(sd, tmp)
            written.append(out / name)
        return written

    def _finish(self, reason: str, started: float) -> None:
        if not self.ctx.is_main:
            return
        files = self.export("final")
        summary = {
            "step": self.step, "reason": reason, "ema_rates": self.ema.rates,
            "files": [p.name for p in files], "model_flags": self.flags,
            "seconds_this_process": time.perf_counter() - started,
            "processes": self.ctx.world_size, "cpu_threads_per_process": torch.get_num_threads(),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "checkpoint_dir": str(self.ckpt_dir), "identity_sha256": self.identity_sha256,
            "identity": self.identity, "images": self.cfg.images, "features": self.cfg.features,
        }  # fmt: skip
        with atomic_path(Path(self.cfg.out) / "train_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str))

    # ----------------------------------------------------------------------------------- the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        print(f"rcdm train: received {signal.Signals(signum).name}; saving after this step", file=sys.stderr)

    def _should_stop(self, started: float, steps_done: int) -> int:
        """0 = go on, then by priority 1 = signal, 3 = the job's end time is near, 2 = the time-budget cap is
        spent (a failure: the run was planned to reach ``steps`` within it); agreed by every rank (one step
        late when distributed)."""
        flag = 1 if self._stop_signal is not None else 0
        if steps_done and not flag:
            elapsed = time.perf_counter() - started
            per_step = elapsed / steps_done
            if self._end_time and time.time() + self.cfg.stop_margin + 2.0 * per_step > self._end_time:
                flag = 3
            elif self.cfg.time_budget > 0 and elapsed > self.cfg.time_budget:
                flag = 2
        if not self.ctx.distributed:
            return flag
        decided = 0
        if self._pending_stop is not None:
            work, tensor = self._pending_stop
            work.wait()
            decided = int(tensor[0])
        # MAX over ranks of an encoding that keeps the priority: signal > end time > budget
        tensor = torch.tensor([{0: 0, 2: 1, 3: 2, 1: 3}[flag]], dtype=torch.int64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group, async_op=True)
        self._pending_stop = (work, tensor)
        return {0: 0, 1: 2, 2: 3, 3: 1}[decided]

    def _announce(self) -> None:
        """Say which run this is and where it starts: a resume is never silent."""
        if not self.ctx.is_main:
            return
        run = f"run {self.identity_sha256[:12]} ({self.cfg.images}, {self.cfg.features})"
        if self.resumed_from is not None:
            print(
                f"rcdm train: {run}: resuming from {self.resumed_from} at step {self.step}", file=sys.stderr
            )
        else:
            print(f"rcdm train: {run}: starting at step 0; checkpoints in {self.ckpt_dir}", file=sys.stderr)
        if self._end_time:
            left = self._end_time - time.time()
            print(
                f"rcdm train: the job ends in {left:.0f} s; stopping {self.cfg.stop_margin:.0f} s before it",
                file=sys.stderr,
            )

    def _loader(self):
        from torch.utils.data import DataLoader

        cfg = self.cfg
        sampler = StepBatchSampler(
            self.data.num_images, cfg.batch_size, cfg.seed, self.ctx.rank, self.ctx.world_size,
            start_step=self.step, stop_step=cfg.steps or None, random_flip=cfg.random_flip,
        )  # fmt: skip
        return DataLoader(
            self.data, batch_size=None, sampler=sampler, num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals,
        )  # fmt: skip

    def train(self) -> int:
        """Run to ``steps`` (or a signal, the job's end time, the time-budget cap). Returns the exit code."""
        lock = RunLock(self.ckpt_dir)
        if self.ctx.is_main:
            lock.acquire()
        try:
            return self._train()
        finally:
            lock.release()

    def _train(self) -> int:
        cfg = self.cfg
        out = Path(cfg.out)
        if self.ctx.is_main:
            new = sorted(set(list_checkpoints(self.ckpt_dir)) - self._ckpts_seen)
            if new:  # written since this run chose where to start
                raise TrainConfigError(
                    f"{new[0]} appeared after this run chose to start at step {self.step}: another "
                    "trainer wrote it; rerun to resume from it"
                )
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / "train_config.json") as tmp:
                tmp.write_text(
                    json.dumps({**cfg.to_dict(), "model_flags": self.flags}, indent=2, default=str)
                )
            if self.resumed_from is not None:
                self._truncate_csv()
        started = time.perf_counter()
        self._end_time = cfg.end_time or slurm_end_time() or 0.0
        self._announce()
        if self.step >= cfg.steps:
            self._finish("done", started)
            return 0
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                handlers[sig] = signal.signal(sig, self._on_signal)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", file=sys.stderr, unit="step",
                   dynamic_ncols=True, disable=not (self.ctx.is_main and cfg.progress))  # fmt: skip
        self.model.train()
        stop, steps_done, last_bar = 0, 0, self.step
        try:
            self._reset_stats()
            it = iter(self._loader())
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                images, feats = next(it)
                self._wait += time.perf_counter() - t0
                self.train_step(images, feats)
                steps_done += 1
                finished = self.step >= cfg.steps
                stop = 0 if finished else self._should_stop(started, steps_done)
                finished = finished or bool(stop)
                if self.step % cfg.log_interval == 0 or finished:
                    self._log(bar)
                    bar.update(self.step - last_bar)
                    last_bar = self.step
                # export before the checkpoint: a job killed between the two resumes before this step and
                # writes the export again, instead of resuming after it without one
                if cfg.export_interval and self.step % cfg.export_interval == 0:
                    self.export_step()
                if self.step % cfg.save_interval == 0 or finished:
                    self.save()
                if stop:
                    break
        finally:
            bar.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
            if self._pending_stop is not None:
                self._pending_stop[0].wait()
                self._pending_stop = None
        if stop == 3:
            if self.ctx.is_main:
                print(f"rcdm train: saved at step {self.step} before the job's time limit", file=sys.stderr)
            barrier(self.ctx)
            if cfg.requeue and self.ctx.is_main and requeue_slurm_job():
                print("rcdm train: job requeued; it resumes from this checkpoint", file=sys.stderr)
        if stop in (1, 3):
            return EXIT_PREEMPTED
        if stop == 2:
            if self.ctx.is_main:
                print(
                    f"rcdm train: error: the --time-budget safety cap ({cfg.time_budget:g} s, workflow: "
                    f"train.time_budget) ran out at step {self.step} of the planned {cfg.steps} (--steps); "
                    f"saved in {self.ckpt_dir}: rerun to continue, or raise the cap or lower the steps for "
                    "this machine",
                    file=sys.stderr,
                )
            barrier(self.ctx)
            return EXIT_TIME_BUDGET
        self._finish("done", started)
        barrier(self.ctx)
        return 0


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(images="", features="", out="")
    a = parser.add_argument
    a("--images", required=True, help="images HDF5 file of the extraction stage")
    a("--features", required=True, help="features HDF5 file (same images) of the extraction stage")
    a("--out", required=True, help="output folder (exports, progress.csv; checkpoints/ unless --ckpt-dir)")
    a("--model-flags", default="", help="published model/diffusion flags: a JSON string or a YAML/JSON file")
    a("--steps", type=int, default=d.steps, help="optimizer steps in total (required)")
    a("--batch-size", type=int, default=d.batch_size, help="global batch, split over the processes")
    a("--microbatch", type=int, default=d.microbatch, help="per-process micro-batch (0: no accumulation)")
    a("--lr", type=float, default=d.lr)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps")
    a(
        "--lr-anneal-steps",
        type=int,
        default=d.lr_anneal_steps,
        help="linear decay to 0 over N steps (0: off)",
    )
    a("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    a("--ema", type=float, nargs="+", default=d.ema_rates, dest="ema_rates", help="EMA rate(s)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=d.precision)
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--use-checkpoint", action="store_true", help="gradient checkpointing (sets the model flag)")
    a("--schedule-sampler", choices=["uniform", "loss-second-moment"], default=d.schedule_sampler)
    a("--save-interval", type=int, default=d.save_interval)
    a("--keep", type=int, default=d.keep, help="resumable checkpoints to keep")
    a(
        "--export-interval",
        type=int,
        default=d.export_interval,
        help="also export model_/ema_ state dicts every N steps (0: only the final ones)",
    )
    a("--log-interval", type=int, default=d.log_interval)
    a("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    a("--seed", type=int, default=d.seed)
    a(
        "--time-budget",
        type=float,
        default=d.time_budget,
        help="safety cap: after SECONDS short of --steps, save and fail (exit 4); 0: none",
    )
    a(
        "--end-time",
        type=float,
        default=d.end_time,
        help="epoch second to stop by (default: SLURM's end time)",
    )
    a(
        "--stop-margin",
        type=float,
        default=d.stop_margin,
        help="save and stop this many seconds before the end time (exit 75)",
    )
    a(
        "--no-requeue",
        dest="requeue",
        action="store_false",
        help="under SLURM, do not requeue after that save",
    )
    a("--check", action="store_true", help="validate configuration, data and resume point, then exit")
    a(
        "--resume",
        default=d.resume,
        help="auto (newest valid checkpoint), none, or a checkpoint/state-dict path",
    )
    a("--ckpt-dir", default=d.ckpt_dir, help="resumable checkpoints folder (default <out>/checkpoints)")
    a("--no-flip", action="store_true", help="no random horizontal flips")
    a("--deterministic", action="store_true", help="deterministic algorithms (slower; exact reruns)")
    a("--deep-check", action="store_true", help="scan the whole features file for NaN before training")
    a("--trust-checkpoint", action="store_true", help="let --resume PATH unpickle code (trusted files only)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = load_model_flags(args.model_flags)
    if args.use_checkpoint:
        flags["use_checkpoint"] = True
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and k != "model_flags"}
    return TrainConfig(
        **values, model_flags=flags, random_flip=not args.no_flip, progress=not args.no_progress
    )


def run(args: argparse.Namespace) -> int:
    from rcdm.checkpoint import CheckpointMismatchError
    from rcdm.factory import UnknownFlagError
    from rcdm.formats.hdf5 import H5SchemaError
    from rcdm.io import UnsafeCheckpointError

    config_errors = (
        TrainConfigError, FileNotFoundError, H5SchemaError, UnknownFlagError, CheckpointMismatchError,
        UnsafeCheckpointError, InputFileError,
    )  # fmt: skip

    try:
        cfg = config_from_args(args)
    except TrainConfigError as err:
        print(f"rcdm train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    ctx = init_distributed(args.device)
    try:
        trainer = Trainer(cfg, ctx, check_only=args.check)
        if args.check:
            where = f"resumes from {trainer.resume_plan}" if trainer.resume_plan else "starts at step 0"
            print(f"rcdm train: check passed: run {trainer.identity_sha256[:12]} {where}", file=sys.stderr)
            return 0
        return trainer.train()
    except config_errors as err:
        print(f"rcdm train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as err:
        print(f"rcdm train: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        cleanup(ctx)
