"""rcdm against the published RCDM code, side by side in one process (issue 16).

Both implementations load the same state dict and get the same conditionings; timings are taken in
interleaved rounds (every round runs every contender once, the order rotating from round to round, so that
load drift on a shared machine hits all of them alike). Parts (``--parts``):

* ``same_maths``: the published DDPM-100 and DDIM-25 loops (fp32) against ours with identical settings, per
  image and per UNet evaluation, plus one UNet forward alone; both get the same x_T and the same per-step
  noise (the global RNG seeded identically before each loop), and the samples must agree within float noise.
* ``training``: one optimiser step with the published ``TrainLoop.run_step`` (forward, hybrid loss,
  backward, its per-parameter norm logging, AdamW, its EMA) against ``rcdm.stages.train.Trainer.train_step``
  with the same flags, batch and learning rate in fp32, then with our recommended CPU precision (bf16).
* ``eval128``: one UNet evaluation of the published 128 px flags (random weights) at small batch sizes.
* ``quality``: the published protocol (its ``p_sample_loop``, DDPM 100 respaced steps, fp32, its batch of
  16) against every candidate setting of ours on a trained model (``--checkpoint``, ``--features`` with at
  least 256 conditionings, the encoder that made them); each setting is sampled with ``--quality-seeds``
  seeds (the rounds), scored by ``rcdm.scoring.evaluate`` (FD_rep, MRR), and the fastest setting whose
  quality is equal to the protocol's within its seed-to-seed spread is reported (see :func:`is_equal`).

Outputs in ``--out``: ``vs_published.csv`` and ``.md`` (one row per comparison: medians, min-max over
rounds, ratio = published time / our time with its min-max over rounds, target, status, check),
``vs_published.json`` (the same plus the machine and load), and for ``quality`` every candidate in
``quality.csv``. The published package is imported from ``--published`` (default
``../shared/reference/published_rcdm`` beside the repository) only here: the ``rcdm`` package never
imports it.

Usage: python benchmarks/vs_published.py --parts same_maths,training,eval128 --out results/bench/vs_published
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PUBLISHED = REPO.parent / "shared" / "reference" / "published_rcdm"
PARTS = ("same_maths", "training", "eval128", "quality")

#: The demo's model flags (config/config.yaml, 16 px data): the model its training benchmark uses.
DEMO_FLAGS: dict[str, Any] = {
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "8",
    "num_heads": 4,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "cosine",
    "predict_xstart": True,
    "image_size": 16,
    "ssl_dim": 128,
}

#: A model for the seconds-long smoke run (tests/test_vs_published.py).
TINY_FLAGS: dict[str, Any] = {
    "image_size": 8,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 1,
    "attention_resolutions": "4",
    "num_heads": 2,
    "learn_sigma": True,
    "diffusion_steps": 100,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "ssl_dim": 16,
}

COLUMNS = (
    "run",
    "part",
    "case",
    "unit",
    "batch",
    "published",
    "ours",
    "clock",
    "published_median",
    "published_min",
    "published_max",
    "ours_median",
    "ours_min",
    "ours_max",
    "published_per_s",
    "ours_per_s",
    "ratio",
    "ratio_min",
    "ratio_max",
    "ratio_other_clock",
    "rounds",
    "target",
    "status",
    "check",
    "published_quality",
    "ours_quality",
    "notes",
)

QUALITY_COLUMNS = (
    "setting",
    "implementation",
    "sampler",
    "steps",
    "precision",
    "batch",
    "nfe",
    "s_per_image_median",
    "s_per_image_min",
    "s_per_image_max",
    "s_per_image_other_clock",
    "images_per_s",
    "fd_rep_mean",
    "fd_rep_min",
    "fd_rep_max",
    "mrr_mean",
    "mrr_min",
    "mrr_max",
    "seeds",
    "equal",
)

#: Equality of samples within float noise (values in [-1, 1], fp32): max |published - ours|.
SAMPLE_ATOL = 1e-4


# ------------------------------------------------------------------------------------- the published code
def import_published(path: str | os.PathLike) -> types.ModuleType:
    """``guided_diffusion_rcdm.script_util`` from ``path`` (the folder holding the package), with the two
    shims its README names for a current PyTorch; FileNotFoundError if the folder is missing."""
    path = Path(path).resolve()
    if not (path / "guided_diffusion_rcdm" / "script_util.py").is_file():
        raise FileNotFoundError(f"the published RCDM package is not under {path} (guided_diffusion_rcdm/)")
    if not hasattr(torch._C, "has_mkldnn"):
        torch._C.has_mkldnn = False
    sys.modules.setdefault("blobfile", types.ModuleType("blobfile"))  # imported, unused for local files
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from guided_diffusion_rcdm import script_util

    return script_util


def published_kwargs(pub: types.ModuleType, flags: dict[str, Any], respacing: str = "") -> dict[str, Any]:
    """Arguments of the published ``create_model_and_diffusion`` for our ``flags`` (published names)."""
    from rcdm.factory import resolve_flags

    full = resolve_flags(**flags)
    kwargs = {k: full[k] for k in pub.model_and_diffusion_defaults()}
    for key in ("channel_mult", "attention_resolutions"):
        value = kwargs[key]
        if not isinstance(value, str):
            kwargs[key] = ",".join(str(int(v)) for v in value)
    kwargs["timestep_respacing"] = respacing
    return {**kwargs, "G_shared": False, "feat_cond": True, "ssl_dim": int(full["ssl_dim"])}


def build_pair(pub: types.ModuleType, flags: dict[str, Any], seed: int = 0):
    """(ours, our diffusion, published model, published module): random weights, one state dict for both.

    Zero-initialised tensors (output convolutions, biases) get small random values so that every layer
    contributes to the output.
    """
    import rcdm

    torch.manual_seed(seed)
    ours, diffusion = rcdm.create_model_and_diffusion(**flags)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    published, _ = pub.create_model_and_diffusion(**published_kwargs(pub, flags))
    published.load_state_dict(ours.state_dict(), strict=True)
    return ours, diffusion, published


def published_diffusion(pub: types.ModuleType, flags: dict[str, Any], respacing: str):
    return pub.create_model_and_diffusion(**published_kwargs(pub, flags, respacing))[1]


# ------------------------------------------------------------------------------------------------- timing
#: The clock ratios are computed on: "cpu" (this process's CPU time: on a shared machine it leaves out the
#: time the scheduler gives to other jobs) or "wall"; the other one is reported beside it.
CLOCKS = ("cpu", "wall")
_clock = "cpu"


class Stopwatch:
    """CPU time of this process and wall time of one timed block (``with Stopwatch() as sw: ...``)."""

    def __enter__(self) -> Stopwatch:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall


def new_times(names: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    return {n: {"cpu": [], "wall": []} for n in names}


def record(times: dict[str, dict[str, list[float]]], name: str, sw: Stopwatch, calls: int = 1) -> None:
    times[name]["cpu"].append(sw.cpu / calls)
    times[name]["wall"].append(sw.wall / calls)


def interleaved(
    tasks: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every task on both clocks, one value per round (mean of ``repeats`` calls); the
    order of the tasks rotates from round to round."""
    names = list(tasks)
    times = new_times(names)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            with Stopwatch() as sw:
                for _ in range(repeats):
                    tasks[name]()
            record(times, name, sw, repeats)
    return times


def compare(
    part: str,
    case: str,
    published: str,
    ours: str,
    pub_times: dict[str, list[float]],
    our_times: dict[str, list[float]],
    *,
    unit: str,
    batch: int | str = "",
    per: float = 1.0,
    throughput: str = "images/s",
    target: float | None = None,
    check: str = "",
    notes: str = "",
    published_quality: str = "",
    ours_quality: str = "",
) -> dict[str, Any]:
    """One comparison row from per-round seconds per call on both clocks (see :data:`CLOCKS`), divided by
    ``per`` (images, or images x evaluations); the ratio is computed on the selected clock."""
    p = [t / per for t in pub_times[_clock]]
    o = [t / per for t in our_times[_clock]]
    ratios = [a / b for a, b in zip(p, o)]
    ratio = statistics.median(p) / statistics.median(o)
    other = "wall" if _clock == "cpu" else "cpu"
    other_ratios = [a / b for a, b in zip(pub_times[other], our_times[other])]
    other_ratio = statistics.median(pub_times[other]) / statistics.median(our_times[other])
    status = ""
    if target is not None:
        status = "met" if ratio >= target else "missed"
        if min(ratios) < target <= max(ratios):
            status += " (target within the spread)"
    return {
        "part": part,
        "case": case,
        "unit": unit,
        "batch": batch,
        "published": published,
        "ours": ours,
        "clock": _clock,
        "published_median": statistics.median(p),
        "published_min": min(p),
        "published_max": max(p),
        "ours_median": statistics.median(o),
        "ours_min": min(o),
        "ours_max": max(o),
        "published_per_s": f"{1.0 / statistics.median(p):.4g} {throughput}",
        "ours_per_s": f"{1.0 / statistics.median(o):.4g} {throughput}",
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_other_clock": f"{other} {other_ratio:.2f}x ({min(other_ratios):.2f}-{max(other_ratios):.2f})",
        "rounds": len(ratios),
        "target": "" if target is None else f">= {target:g}x",
        "status": status,
        "check": check,
        "published_quality": published_quality,
        "ours_quality": ours_quality,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ same maths
def part_same_maths(
    pub: types.ModuleType, args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict]:
    """Published DDPM/DDIM loops vs ours, fp32, identical settings; samples checked equal."""
    from rcdm.samplers import sample

    flags = flags_from_spec(args.sample_flags)
    ours, diffusion, published = build_pair(pub, flags, seed=args.seed)
    ours.eval()
    published.eval()
    b, size, dim = args.sample_batch, int(flags["image_size"]), int(flags["ssl_dim"])
    shape = (b, 3, size, size)
    gen = torch.Generator().manual_seed(args.seed)
    x_t = torch.randn(shape, generator=gen)
    feat = torch.randn(b, dim, generator=gen)
    rows = []
    cases = [
        ("ddpm", args.ddpm_steps, str(args.ddpm_steps)),
        ("ddim", args.ddim_steps, f"ddim{args.ddim_steps}"),
    ]
    for sampler, steps, respacing in cases:
        pd = published_diffusion(pub, flags, respacing)
        loop = pd.p_sample_loop if sampler == "ddpm" else pd.ddim_sample_loop

        def run_published(loop=loop):
            torch.manual_seed(args.seed + 1)  # the per-step noise: the same global stream for both
            return loop(published, shape, noise=x_t.clone(), clip_denoised=True, model_kwargs={"feat": feat})

        def run_ours(sampler=sampler, steps=steps):
            torch.manual_seed(args.seed + 1)
            return sample(
                ours,
                diffusion,
                shape,
                sampler=sampler,
                steps=steps,
                noise=x_t.clone(),
                clip_denoised=True,
                model_kwargs={"feat": feat},
            )

        a, c = run_published(), run_ours()  # warm-up and the equality check
        diff = float((a - c).abs().max())
        equal = diff <= SAMPLE_ATOL
        log(
            f"same maths {sampler}-{steps}: max |published - ours| = {diff:.3g} "
            f"({'equal' if equal else 'DIFFERENT'})"
        )
        times = interleaved({"published": run_published, "ours": run_ours}, args.rounds)
        check = (
            f"samples {'equal' if equal else 'DIFFER'}: max abs diff {diff:.2g} (tolerance {SAMPLE_ATOL:g})"
        )
        setting = f"{sampler.upper()}-{steps}, fp32, {size} px, batch {b}"
        common = dict(batch=b, target=1.0, check=check)
        rows.append(
            compare(
                "same maths",
                f"{setting}: per image",
                "p_sample_loop" if sampler == "ddpm" else "ddim_sample_loop",
                f"samplers.sample('{sampler}', steps={steps})",
                times["published"],
                times["ours"],
                unit="s/image",
                per=b,
                **common,
            )
        )
        rows.append(
            compare(
                "same maths",
                f"{setting}: per UNet evaluation",
                rows[-1]["published"],
                rows[-1]["ours"],
                times["published"],
                times["ours"],
                unit="s/(image x eval)",
                per=b * steps,
                throughput="image-evals/s",
                **common,
            )
        )
        rows[-1]["equal_samples"] = rows[-2]["equal_samples"] = equal

    t = torch.randint(0, int(flags.get("diffusion_steps", 1000)), (b,), generator=gen)

    def fwd_published():
        with torch.no_grad():  # what the published loops run under
            return published(x_t, t, feat=feat)

    def fwd_ours():
        with torch.inference_mode():  # what ours run under
            return ours(x_t, t, feat)

    out_p, out_o = fwd_published(), fwd_ours()
    diff = float((out_p - out_o).abs().max())
    times = interleaved({"published": fwd_published, "ours": fwd_ours}, args.rounds, repeats=args.fwd_repeats)
    rows.append(
        compare(
            "same maths",
            f"UNet forward alone, fp32, {size} px, batch {b}",
            "UNetModel.forward",
            "UNetModel.forward",
            times["published"],
            times["ours"],
            unit="s/(image x eval)",
            per=b,
            batch=b,
            throughput="image-evals/s",
            target=1.0,
            check=f"outputs max abs diff {diff:.2g}",
        )
    )
    return rows


# -------------------------------------------------------------------------------------------------- training
def _write_h5_pair(folder: Path, images: np.ndarray, feats: np.ndarray) -> tuple[Path, Path]:
    """A minimal images file and features file (the extraction layout) for the Trainer."""
    import h5py

    from rcdm.formats import hdf5

    n, size = images.shape[0], images.shape[1]
    paths = [f"img{i:05d}.png" for i in range(n)]
    digest = hdf5.PathsDigest()
    digest.update(paths)
    common = {
        "format_version": hdf5.FORMAT_VERSION,
        "num_images": n,
        "paths_sha256": digest.hexdigest(),
        "num_bad": 0,
        "complete": True,
    }
    img_path, feat_path = folder / "images.h5", folder / "features.h5"
    with h5py.File(img_path, "w") as h5:
        h5.create_dataset("images", data=images)
        h5.create_dataset("labels", data=np.zeros(n, dtype=np.int64))
        hdf5.write_strings(h5, "paths", paths)
        hdf5.set_attrs(h5, {**common, "kind": "images", "image_size": size})
    with h5py.File(feat_path, "w") as h5:
        h5.create_dataset("features", data=np.stack([feats, feats], axis=1))
        hdf5.write_strings(h5, "paths", paths)
        hdf5.set_attrs(
            h5,
            {
                **common,
                "kind": "features",
                "dim": feats.shape[1],
                "encoder": "random",
                "layer": "trunk",
                "images_file": img_path.name,
            },
        )
    return img_path, feat_path


@contextlib.contextmanager
def _process_group(folder: Path):
    """A one-process gloo group: the published TrainLoop calls torch.distributed unconditionally."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{folder / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def part_training(pub: types.ModuleType, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """Published TrainLoop.run_step vs our Trainer.train_step, fp32 then bf16, same flags/batch/weights."""
    from guided_diffusion_rcdm import logger as pub_logger
    from guided_diffusion_rcdm.train_util import TrainLoop

    from rcdm.ema import EMA
    from rcdm.stages.train import TrainConfig, Trainer

    rows = []
    for spec, batch in zip(args.train_flags, args.train_batch):
        flags = flags_from_spec(spec)
        size, dim = int(flags["image_size"]), int(flags["ssl_dim"])
        ours, _, published = build_pair(pub, flags, seed=args.seed)
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        del ours
        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (2 * batch, size, size, 3), dtype=np.uint8)
        feats = rng.standard_normal((2 * batch, dim)).astype(np.float32)
        u8, f = torch.from_numpy(images[:batch]), torch.from_numpy(feats[:batch])
        x = u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the published loader's [-1, 1] NCHW batch

        with tempfile.TemporaryDirectory() as tmp, _process_group(Path(tmp)):
            tmp = Path(tmp)
            stack = contextlib.ExitStack()
            stack.enter_context(
                pub_logger.scoped_configure(dir=str(tmp / "published_log"), format_strs=["log"])
            )
            published.train()
            loop = TrainLoop(
                model=published,
                diffusion=published_diffusion(pub, flags, ""),
                data=None,
                batch_size=batch,
                microbatch=-1,
                lr=args.lr,
                ema_rate="0.9999",
                log_interval=10**9,
                save_interval=10**9,
                resume_checkpoint="",
                use_fp16=False,
                weight_decay=0.0,
                lr_anneal_steps=0,
            )
            img_path, feat_path = _write_h5_pair(tmp, images, feats)
            trainers = {}
            for variant in args.train_variants:
                precision, *options = variant.split("+")
                cfg = TrainConfig(
                    images=str(img_path),
                    features=str(feat_path),
                    out=str(tmp / f"ours_{variant}"),
                    model_flags={k: v for k, v in flags.items() if k != "ssl_dim"},
                    steps=10**9,
                    batch_size=batch,
                    lr=args.lr,
                    ema_rates=[0.9999],
                    precision=precision,
                    channels_last="channels_last" in options,
                    compile="compile" in options,
                    workers=0,
                    save_interval=10**9,
                    log_interval=10**9,
                    progress=False,
                    seed=args.seed,
                )
                trainer = Trainer(cfg)
                trainer.model.load_state_dict(state, strict=True)
                trainer.ema = EMA(trainer.model, cfg.ema_rates)
                trainer.model.train()
                trainers[variant] = trainer
            tasks = {"published": lambda loop=loop, x=x, f=f: loop.run_step(x, {"feat": f})}
            for variant, trainer in trainers.items():
                tasks[variant] = lambda trainer=trainer, u8=u8, f=f: trainer.train_step(u8, f)
            for task in tasks.values():  # warm-up (compilation, for a compiled variant: excluded)
                for _ in range(args.train_warmup):
                    task()
            times = interleaved(tasks, args.rounds, repeats=args.train_repeats)
            stack.close()
        setting = f"{spec} flags ({size} px, {flags['num_channels']} ch), batch {batch}"
        for variant in trainers:
            recommended = variant == args.train_recommended
            target, notes = None, ""
            if recommended:
                target, notes = 1.3, "our recommended CPU training settings: target 1.3x"
            elif variant == "fp32":
                target, notes = 1.0, "same maths: no regression"
            rows.append(
                compare(
                    "training",
                    f"one optimiser step, {setting}",
                    "TrainLoop.run_step, fp32",
                    f"Trainer.train_step, {variant}" + (" (recommended)" if recommended else ""),
                    times["published"],
                    times[variant],
                    unit="s/step",
                    batch=batch,
                    throughput="steps/s",
                    target=target,
                    notes=notes,
                )
            )
        log(
            f"training {spec}: "
            + ", ".join(f"{k} {statistics.median(v[_clock]):.3g} s" for k, v in times.items())
        )
    return rows


# --------------------------------------------------------------------------------------------------- eval128
def part_eval128(pub: types.ModuleType, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """One UNet evaluation of the published 128 px flags (random weights), published vs ours."""
    flags = flags_from_spec(args.eval128_flags)
    ours, _, published = build_pair(pub, flags, seed=args.seed)
    ours.eval()
    published.eval()
    size, dim = int(flags["image_size"]), int(flags["ssl_dim"])
    rows = []
    for b in args.eval128_batches:
        gen = torch.Generator().manual_seed(args.seed + b)
        x = torch.randn(b, 3, size, size, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        feat = torch.randn(b, dim, generator=gen)

        def fwd_published(x=x, t=t, feat=feat):
            with torch.no_grad():
                return published(x, t, feat=feat)

        def fwd_ours(x=x, t=t, feat=feat):
            with torch.inference_mode():
                return ours(x, t, feat)

        def fwd_ours_bf16(x=x, t=t, feat=feat):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return ours(x, t, feat)

        diff = float((fwd_published() - fwd_ours()).abs().max())  # also the warm-up
        tasks = {"published": fwd_published, "fp32": fwd_ours, "bf16": fwd_ours_bf16}
        tasks = {k: v for k, v in tasks.items() if k == "published" or k in args.eval128_variants}
        if "bf16" in tasks:
            fwd_ours_bf16()
        times = interleaved(tasks, args.eval128_rounds)
        setting = f"{args.eval128_flags} flags ({size} px), random weights, batch {b}"
        for variant in args.eval128_variants:
            rows.append(
                compare(
                    "eval128",
                    f"one UNet evaluation, {setting}",
                    "UNetModel.forward, fp32",
                    "UNetModel.forward, fp32" if variant == "fp32" else "UNetModel.forward, bf16 autocast",
                    times["published"],
                    times[variant],
                    unit="s/(image x eval)",
                    per=b,
                    batch=b,
                    throughput="image-evals/s",
                    target=1.0 if variant == "fp32" else None,
                    check=f"outputs max abs diff {diff:.2g}" if variant == "fp32" else "",
                )
            )
        log(
            f"eval128 batch {b}: "
            + ", ".join(f"{k} {statistics.median(v[_clock]) / b:.3g} s/image" for k, v in times.items())
        )
    return rows


# --------------------------------------------------------------------------------------------------- quality
def is_equal(ref: dict[str, Sequence[float]], cand: dict[str, Sequence[float]]) -> bool:
    """Equal quality within the metric's noise, as decided here.

    The noise of each metric is its spread over seeds of the published protocol (max - min over the seeds:
    same model, same conditionings, different sampling noise). A candidate is equal if its mean over the same
    seeds is no worse than the protocol's mean by more than that spread, for FD_rep (lower is better) and
    MRR (higher is better) both. Better-than-protocol quality counts as equal.
    """
    fd_ref, mrr_ref = ref["fd_rep"], ref["mrr"]
    fd_tol = max(fd_ref) - min(fd_ref)
    mrr_tol = max(mrr_ref) - min(mrr_ref)
    fd_ok = statistics.fmean(cand["fd_rep"]) <= statistics.fmean(fd_ref) + fd_tol
    mrr_ok = statistics.fmean(cand["mrr"]) >= statistics.fmean(mrr_ref) - mrr_tol
    return fd_ok and mrr_ok


def _parse_candidates(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        sampler, _, steps = item.strip().rpartition(":")
        out.append((sampler, int(steps)))
    return out


def part_quality(pub: types.ModuleType, args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """The published protocol vs our fastest setting of equal quality (FD_rep and MRR) on a trained model."""
    from rcdm import encoders
    from rcdm.checkpoint import load_model
    from rcdm.conditioning import FeatureConditioning, make_generators, select_conditionings
    from rcdm.factory import read_model_flags
    from rcdm.formats import hdf5
    from rcdm.formats.npz import write_npz
    from rcdm.preprocess import to_uint8
    from rcdm.samplers import sample
    from rcdm.scoring import EvalSettings, evaluate

    if not (args.checkpoint and args.features):
        raise SystemExit("--parts quality needs --checkpoint and --features (and the encoder that made them)")
    flags = read_model_flags(args.model_flags) or {}
    ours, diffusion = load_model(args.checkpoint, flags or None, device="cpu")
    ours.eval()
    flags = {**flags, "ssl_dim": int(ours.ssl_dim), "image_size": int(ours.image_size)}
    published, _ = pub.create_model_and_diffusion(**published_kwargs(pub, flags))
    published.load_state_dict(ours.state_dict(), strict=True)
    published.eval()
    pd = published_diffusion(pub, flags, str(args.ref_steps))
    features = Path(args.features)
    attrs = hdf5.check_features_file(features, deep=False)
    encoder = encoders.load_as_extracted(
        args.encoder, args.encoder_checkpoint, args.layer, features_attrs=attrs
    )
    cond = FeatureConditioning(features)
    ids = select_conditionings(cond.n, args.num_cond, args.seed)
    feats = cond.features(ids)
    cond.close()
    n, size = len(ids), int(ours.image_size)
    out = Path(args.out) / "quality"
    out.mkdir(parents=True, exist_ok=True)

    def run_published(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # x_T and per-step noise from the global RNG, as the published script does
        parts = []
        for lo in range(0, n, args.ref_batch):
            f = feats[lo : lo + args.ref_batch]
            parts.append(
                pd.p_sample_loop(
                    published, (len(f), 3, size, size), clip_denoised=True, model_kwargs={"feat": f}
                )
            )
        return torch.cat(parts)

    def run_ours(seed: int, sampler: str, steps: int, precision: str, batch: int) -> torch.Tensor:
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        parts = []
        with torch.inference_mode(), amp:
            for lo in range(0, n, batch):
                f = feats[lo : lo + batch]
                gens = make_generators(seed, ids[lo : lo + batch], np.zeros(len(f), np.int64), "cpu")
                parts.append(
                    sample(
                        ours,
                        diffusion,
                        (len(f), 3, size, size),
                        sampler=sampler,
                        steps=steps,
                        model_kwargs={"feat": f},
                        generators=gens,
                    ).float()
                )
        return torch.cat(parts)

    settings = {"published": ("published", "ddpm", args.ref_steps, "fp32", args.ref_batch)}
    settings[f"ours ddpm:{args.ref_steps} fp32 b{args.ref_batch}"] = (
        "ours",
        "ddpm",
        args.ref_steps,
        "fp32",
        args.ref_batch,
    )
    for sampler, steps in _parse_candidates(args.candidates):
        for precision in args.precisions:
            settings[f"ours {sampler}:{steps} {precision} b{args.our_batch}"] = (
                "ours",
                sampler,
                steps,
                precision,
                args.our_batch,
            )
    names = list(settings)
    times = new_times(names)
    metrics: dict[str, dict[str, list[float]]] = {k: {"fd_rep": [], "mrr": []} for k in names}
    score = EvalSettings(
        features=features,
        encoder=encoder,
        inception_missing="not used here",
        batch_size=256,
        workers=1,
        device="cpu",
        progress=False,
    )
    for r in range(args.quality_seeds):
        seed = args.seed + r
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotating order: the seeds are the rounds
            impl, sampler, steps, precision, batch = settings[name]
            with Stopwatch() as sw:
                x = (
                    run_published(1000 + seed)
                    if impl == "published"
                    else run_ours(seed, sampler, steps, precision, batch)
                )
            record(times, name, sw)
            npz = out / f"{name.replace(' ', '_').replace(':', '-')}_seed{seed}.npz"
            write_npz(
                npz,
                (n, size, size, 3),
                iter([(to_uint8(x).numpy(), ids, np.zeros(n, np.int64))]),
                {"setting": name, "seed": seed, "checkpoint": str(args.checkpoint)},
            )
            values = evaluate(npz, score).values
            metrics[name]["fd_rep"].append(float(values["fd_rep"]))
            metrics[name]["mrr"].append(float(values["mrr"]))
            log(
                f"quality seed {seed} {name}: {times[name][_clock][-1] / n:.4f} s/image, "
                f"FD_rep {values['fd_rep']:.4f}, MRR {values['mrr']:.4f}"
            )

    ref = metrics["published"]
    table = []
    for name in names:
        impl, sampler, steps, precision, batch = settings[name]
        per = [t / n for t in times[name][_clock]]
        m = metrics[name]
        table.append(
            {
                "setting": name,
                "implementation": impl,
                "sampler": sampler,
                "steps": steps,
                "precision": precision,
                "batch": batch,
                "nfe": steps,
                "s_per_image_median": statistics.median(per),
                "s_per_image_min": min(per),
                "s_per_image_max": max(per),
                "s_per_image_other_clock": statistics.median(
                    t / n for t in times[name]["wall" if _clock == "cpu" else "cpu"]
                ),
                "images_per_s": 1.0 / statistics.median(per),
                "fd_rep_mean": statistics.fmean(m["fd_rep"]),
                "fd_rep_min": min(m["fd_rep"]),
                "fd_rep_max": max(m["fd_rep"]),
                "mrr_mean": statistics.fmean(m["mrr"]),
                "mrr_min": min(m["mrr"]),
                "mrr_max": max(m["mrr"]),
                "seeds": len(per),
                "equal": True if impl == "published" else is_equal(ref, m),
            }
        )
    _write_csv(out / "quality.csv", table, QUALITY_COLUMNS)
    equal = [row for row in table if row["implementation"] == "ours" and row["equal"]]

    def quality(name: str) -> str:
        m = metrics[name]
        return (
            f"FD_rep {statistics.fmean(m['fd_rep']):.4f} ({min(m['fd_rep']):.4f}-{max(m['fd_rep']):.4f}), "
            f"MRR {statistics.fmean(m['mrr']):.4f} ({min(m['mrr']):.4f}-{max(m['mrr']):.4f})"
        )

    rule = (
        "equal: mean over the seeds no worse than the protocol's mean by more than its seed-to-seed "
        "spread (max-min), for FD_rep and MRR both"
    )
    setting = f"{n} conditionings of {features.name}, {len(times['published']['cpu'])} seeds, {size} px"
    rows = []
    same = f"ours ddpm:{args.ref_steps} fp32 b{args.ref_batch}"
    rows.append(
        compare(
            "quality",
            f"published protocol, same settings in ours: {setting}",
            f"p_sample_loop DDPM-{args.ref_steps}, fp32, batch {args.ref_batch}",
            f"samplers.sample('ddpm', {args.ref_steps}), fp32, batch {args.ref_batch}",
            times["published"],
            times[same],
            unit="s/image",
            per=n,
            batch=args.ref_batch,
            target=1.0,
            published_quality=quality("published"),
            ours_quality=quality(same),
            check="equal" if is_equal(ref, metrics[same]) else "NOT equal",
            notes=rule,
        )
    )
    if equal:
        best = min(equal, key=lambda row: row["s_per_image_median"])
        name = best["setting"]
        ours_desc = (
            f"samplers.sample('{best['sampler']}', {best['steps']}), {best['precision']}, "
            f"batch {best['batch']}"
        )
        check = "equal (fastest equal setting of " + f"{len(table) - 1})"
    else:
        best = min(
            (row for row in table if row["implementation"] == "ours"), key=lambda row: row["fd_rep_mean"]
        )
        name = best["setting"]
        ours_desc = (
            f"{best['sampler']}:{best['steps']} {best['precision']} (no setting is equal: best FD_rep shown)"
        )
        check = "NOT equal"
    rows.append(
        compare(
            "quality",
            f"equal quality: {setting}",
            f"p_sample_loop DDPM-{args.ref_steps}, fp32, batch {args.ref_batch}",
            ours_desc,
            times["published"],
            times[name],
            unit="s/image",
            per=n,
            batch=best["batch"],
            target=3.0,
            published_quality=quality("published"),
            ours_quality=quality(name),
            check=check,
            notes=rule,
        )
    )
    return rows, table


# ------------------------------------------------------------------------------------------------ reporting
def flags_from_spec(spec: str) -> dict[str, Any]:
    """Model flags: ``small`` / ``128`` (``rcdm bench`` presets), ``demo``, ``tiny``, or JSON (file/text)."""
    from rcdm.stages.bench import PRESETS

    named = {**PRESETS, "demo": DEMO_FLAGS, "tiny": TINY_FLAGS}
    if spec in named:
        return dict(named[spec])
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    return json.loads(text)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})


MD_HEADER = (
    "| part | case | published | ours | published: median (min-max) | ours: median (min-max) | "
    "ratio published/ours (min-max over rounds), n | other clock | target | status | check / quality |"
)


def markdown(
    rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], quality: Sequence[dict] | None
) -> str:
    """The comparison table (and, with the quality part, every candidate setting); ``runs``: the environment
    of each invocation that wrote rows (``--append``), rows carry its index in ``run``."""
    lines = ["# rcdm vs the published RCDM code, side by side", ""]
    for i, env in enumerate(runs, 1):
        lines.append(
            f"Run {i} ({', '.join(env.get('parts', []))}): {env['cpu']}, {env['threads']} thread(s), PyTorch "
            f"{env['torch']}; load average (1 min) {env['load_before'][0]:.2f} before, "
            f"{env['load_after'][0]:.2f} after; {env['date']}."
            + (f" {env['note']}." if env.get("note") else "")
        )
        lines.append("")
    lines += [
        f"Times in seconds of {runs[-1]['clock']} time per unit (cpu: this process's CPU time, which leaves "
        "out the time other jobs hold the cores; wall: elapsed); ratio = published time / our time (> 1: "
        "ours faster), its spread = the min-max of the per-round ratios; the other clock's is beside it.",
        "",
        MD_HEADER,
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in rows:
        quality_text = ""
        if r.get("published_quality"):
            quality_text = f"; published {r['published_quality']}; ours {r['ours_quality']}"
        tag = f" (run {r['run']})" if len(runs) > 1 else ""
        lines.append(
            f"| {r['part']} | {r['case']}{tag} | {r['published']} | {r['ours']} | "
            f"{r['published_median']:.4g} ({r['published_min']:.4g}-{r['published_max']:.4g}) {r['unit']}; "
            f"{r['published_per_s']} | {r['ours_median']:.4g} ({r['ours_min']:.4g}-{r['ours_max']:.4g}) "
            f"{r['unit']}; {r['ours_per_s']} | **{r['ratio']:.2f}x** "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}), {r['rounds']} | {r['ratio_other_clock']} | "
            f"{r['target']} | {r['status']} | "
            f"{r['check']}{quality_text} |"
        )
    if quality:
        lines += [
            "",
            "Equal quality: every setting tried (mean (min-max) over the seeds; s/image: median (min-max)).",
            "",
            "| setting | NFE | s/image | images/s | FD_rep | MRR | equal to the protocol |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for q in quality:
            lines.append(
                f"| {q['setting']} | {q['nfe']} | {q['s_per_image_median']:.4g} ({q['s_per_image_min']:.4g}-"
                f"{q['s_per_image_max']:.4g}) | {q['images_per_s']:.4g} | {q['fd_rep_mean']:.4f} "
                f"({q['fd_rep_min']:.4f}-{q['fd_rep_max']:.4f}) | {q['mrr_mean']:.4f} ({q['mrr_min']:.4f}-"
                f"{q['mrr_max']:.4f}) | {'reference' if q['implementation'] == 'published' else q['equal']} |"
            )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--published",
        default=os.environ.get("RCDM_PUBLISHED", str(DEFAULT_PUBLISHED)),
        help="folder holding guided_diffusion_rcdm/ (default: %(default)s)",
    )
    p.add_argument("--parts", default="same_maths,training,eval128", help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", default="results/bench/vs_published")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (same_maths, training)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/speed.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=CLOCKS, default="cpu", help="the clock ratios are computed on")
    p.add_argument("--sample-flags", default="small", help="model flags of same_maths (see flags_from_spec)")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--ddpm-steps", type=int, default=100)
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--fwd-repeats", type=int, default=5, help="UNet forwards per round (same_maths)")
    p.add_argument("--train-flags", default="demo,small", help="comma list of model flag specs (training)")
    p.add_argument("--train-batch", default="32,8", help="comma list: the batch of each --train-flags")
    p.add_argument("--train-repeats", type=int, default=3, help="optimiser steps per round")
    p.add_argument(
        "--train-variants",
        default="fp32,fp32+channels_last,bf16",
        help="our training settings: precision[+channels_last][+compile], comma separated",
    )
    p.add_argument("--train-recommended", default="fp32", help="the variant the 1.3x target applies to")
    p.add_argument("--train-warmup", type=int, default=1, help="untimed steps first (compilation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval128-flags", default="128")
    p.add_argument("--eval128-batches", default="1,2")
    p.add_argument("--eval128-rounds", type=int, default=2)
    p.add_argument("--eval128-variants", default="fp32", help="ours: fp32 and/or bf16 (autocast)")
    p.add_argument("--checkpoint", default=None, help="quality: a trained model (EMA state dict)")
    p.add_argument("--model-flags", default=None, help="quality: its model_flags.json")
    p.add_argument("--features", default=None, help="quality: validation features file (conditionings)")
    p.add_argument("--encoder", default=None, help="quality: encoder name (default: the features file's)")
    p.add_argument("--encoder-checkpoint", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--num-cond", type=int, default=256)
    p.add_argument("--quality-seeds", type=int, default=3, help="seeds per setting (the quality rounds)")
    p.add_argument("--ref-steps", type=int, default=100, help="the published protocol's DDPM steps")
    p.add_argument("--ref-batch", type=int, default=16, help="the published sample script's batch size")
    p.add_argument("--our-batch", type=int, default=64)
    p.add_argument(
        "--candidates",
        default="dpm-solver++:5,dpm-solver++:7,dpm-solver++:10,dpm-solver++:15,dpm-solver++:20,ddim:25,ddpm:50",
        help="quality: our settings to try, sampler:steps (each at --our-batch and every --precisions)",
    )
    p.add_argument("--precisions", default="fp32", help="quality: our precisions to try (fp32, bf16)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of an earlier run in --out (one table, runs listed)",
    )
    p.add_argument(
        "--render-only", action="store_true", help="rewrite the CSV/Markdown of --out from its JSON"
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, one round, a few steps (CI)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in args.parts if s not in PARTS]
    if bad:
        p.error(f"unknown parts {bad}; choose from {', '.join(PARTS)}")
    if args.smoke:
        args.rounds, args.sample_flags, args.sample_batch = 1, "tiny", 2
        args.ddpm_steps, args.ddim_steps, args.fwd_repeats = 10, 5, 1
        args.train_flags, args.train_batch, args.train_repeats = "tiny", "4", 1
        args.train_variants, args.train_recommended = "fp32,bf16", "fp32"
        args.eval128_variants = "fp32,bf16"
        args.eval128_flags, args.eval128_batches, args.eval128_rounds = "tiny", "1", 1
    args.train_flags = [s.strip() for s in args.train_flags.split(",")]
    args.train_variants = [s.strip() for s in args.train_variants.split(",")]
    if args.train_recommended not in args.train_variants:
        p.error("--train-recommended must be one of --train-variants")
    args.train_batch = [int(s) for s in str(args.train_batch).split(",")]
    if len(args.train_batch) != len(args.train_flags):
        p.error("--train-batch needs one batch size per --train-flags entry")
    args.eval128_batches = [int(s) for s in args.eval128_batches.split(",")]
    args.eval128_variants = [s.strip() for s in args.eval128_variants.split(",")]
    args.precisions = [s.strip() for s in args.precisions.split(",")]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen parts; write CSV, Markdown and JSON; return the JSON document."""
    global _clock
    _clock = args.clock
    torch.set_num_threads(args.threads)
    pub = import_published(args.published)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"vs_published: {message}", file=sys.stderr, flush=True)

    env = {
        "parts": list(args.parts),
        "clock": args.clock,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    rows: list[dict[str, Any]] = []
    quality = None
    for part in args.parts:
        log(f"{part} ...")
        if part == "same_maths":
            rows += part_same_maths(pub, args, log)
        elif part == "training":
            rows += part_training(pub, args, log)
        elif part == "eval128":
            rows += part_eval128(pub, args, log)
        else:
            new, quality = part_quality(pub, args, log)
            rows += new
    env["load_after"] = list(os.getloadavg())
    runs = [env]
    previous = out / "vs_published.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        runs = old.get("runs", [old.get("environment")]) + [env]
        rows = [{**r, "run": r.get("run", 1)} for r in old["rows"]] + rows
        quality = quality if quality is not None else old.get("quality")
    for r in rows:
        r.setdefault("run", len(runs))
    _write_csv(out / "vs_published.csv", rows, COLUMNS)
    (out / "vs_published.md").write_text(markdown(rows, runs, quality))
    doc = {
        "runs": runs,
        "arguments": {k: v for k, v in vars(args).items()},
        "rows": rows,
        "quality": quality,
    }
    (out / "vs_published.json").write_text(json.dumps(doc, indent=2, default=str))
    log(f"wrote {out / 'vs_published.md'}")
    return doc


def render(out: Path) -> None:
    """Rewrite the CSV and Markdown of ``out`` from its JSON (e.g. after annotating a run)."""
    doc = json.loads((out / "vs_published.json").read_text())
    _write_csv(out / "vs_published.csv", doc["rows"], COLUMNS)
    (out / "vs_published.md").write_text(markdown(doc["rows"], doc["runs"], doc.get("quality")))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render(Path(args.out))
        return 0
    doc = run(args)
    print((Path(args.out) / "vs_published.md").read_text())
    return 0 if all(r.get("equal_samples", True) for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
