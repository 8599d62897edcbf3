"""Stage ``rcdm sample``: generate images conditioned on representations, one shard of conditionings per job.

Shard i of k covers a fixed contiguous slice of the (selected) conditionings (:mod:`rcdm.conditioning`: the
conditionings and the per-sample noise; :mod:`rcdm.formats.samples`: the shard file). Progress is flushed
after every batch to ``<shard>.partial``: a killed job resumes where it stopped; the final name appears (by
rename) only when the shard is complete and is never recomputed.

``--check`` loads the checkpoint on the CPU, opens the conditioning, checks its dimension against the model's,
the number of conditionings asked for and the shards (every shard of ``--num-shards``), then exits without
writing anything (0, or 1 with one line naming the file): the workflow's ``sample_check`` job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm import finished
from rcdm.conditioning import (
    SEED_RULE,
    FeatureConditioning,
    ImageConditioning,
    make_generators,
    select_conditionings,
)
from rcdm.device import DEVICE_HELP, resolve_device
from rcdm.errors import CHECK_HELP, MAKE_FIRST, REFETCH, InputFileError, check_passed, reading
from rcdm.factory import model_flags_file, read_model_flags
from rcdm.formats import hdf5
from rcdm.formats.samples import (
    COND_FEATURES,
    COND_IDS,
    COND_IMAGES,
    COND_INDEX,
    SAMPLE_INDEX,
    SAMPLES,
    ShardSettingsMismatch,
    check_samples_file,
    create_partial,
    read_settings,
)
from rcdm.preprocess import to_uint8

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batches(n: int, batch_size: int, start: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, n, batch_size):
        yield lo, min(lo + batch_size, n)


def generate_shard(
    model: torch.nn.Module,
    diffusion,
    cond,
    cond_ids: np.ndarray,
    out_path: str | os.PathLike,
    settings: dict[str, Any],
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    overwrite: bool = False,
    cuda_graph: bool = False,
) -> Path:
    """Sample ``settings["samples_per_image"]`` images per conditioning in ``cond_ids`` into ``out_path``.

    ``settings`` needs ``seed``, ``sampler``, ``steps``, ``eta``, ``clip_denoised``, ``samples_per_image`` and
    ``image_size``; all of it is stored. A complete file with equal settings is left alone (returned as is);
    one with other settings raises :class:`ShardSettingsMismatch` unless ``overwrite``. Returns the path.
    ``cuda_graph`` replays one captured CUDA graph of the model per batch shape (CUDA only).
    Phases: the finished-shard check (:func:`_is_complete`), the resume point (:func:`_resume_point`), the
    batch loop (:func:`_sample_batch`, :func:`_write_batch`), then the rename.
    """
    from tqdm.auto import tqdm

    from rcdm.samplers import CudaGraphModel

    out_path = Path(out_path)
    device = torch.device(device)
    settings = json.loads(json.dumps(settings, sort_keys=True))  # canonical, JSON-typed
    if _is_complete(out_path, settings, overwrite):
        print(f"rcdm sample: {out_path} is complete, skipping", file=sys.stderr)
        return out_path
    cond_ids = np.asarray(cond_ids, dtype=np.int64)
    k = int(settings["samples_per_image"])
    n = len(cond_ids) * k
    item_cond = np.repeat(cond_ids, k)
    item_sample = np.tile(np.arange(k, dtype=np.int64), len(cond_ids))
    partial = out_path.with_name(out_path.name + ".partial")
    start = _resume_point(partial, settings, n, len(cond_ids), cond, overwrite, progress)
    if cuda_graph and device.type == "cuda":
        model = CudaGraphModel(model)  # captured once per batch shape, replayed for every batch and step
    bar = tqdm(total=n, initial=start, unit="img", desc=f"sample {out_path.name}", disable=not progress)
    t0 = time.perf_counter()
    with h5py.File(partial, "r+") as h5:
        for lo, hi in _batches(n, batch_size, start):
            c_idx, s_idx = item_cond[lo:hi], item_sample[lo:hi]
            uniq, inverse = np.unique(c_idx, return_inverse=True)
            uniq_feat = cond.features(uniq)  # read once: conditions the batch and is stored below
            feat = uniq_feat.to(device)[torch.from_numpy(inverse).to(device)]
            images = _sample_batch(
                model, diffusion, feat, c_idx, s_idx, settings, device, precision, cuda_graph
            )
            _write_batch(h5, lo, hi, images, c_idx, s_idx, cond, cond_ids, uniq, uniq_feat)
            bar.update(hi - lo)
        h5.attrs["seconds"] = float(h5.attrs.get("seconds", 0.0)) + time.perf_counter() - t0
        h5.attrs["complete"] = True
    bar.close()
    os.replace(partial, out_path)
    return out_path


def _is_complete(out_path: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True when ``out_path`` is a complete shard made with ``settings``; raises
    :class:`ShardSettingsMismatch` when it exists with other settings (unless ``overwrite``)."""
    if not out_path.exists() or overwrite:
        return False
    existing = read_settings(out_path)
    if existing != settings:
        diff = sorted(key for key in set(existing) | set(settings) if existing.get(key) != settings.get(key))
        raise ShardSettingsMismatch(
            f"{out_path} exists with other settings ({', '.join(diff)}); delete it or pass --overwrite"
        )
    check_samples_file(out_path)
    return True


def _resume_point(
    partial: Path, settings: dict[str, Any], n: int, m: int, cond, overwrite: bool, progress: bool
) -> int:
    """The first sample still to generate: where a ``.partial`` file with equal settings stopped, else 0
    (a fresh ``.partial`` file is created then)."""
    start = 0
    if partial.exists() and not overwrite:
        try:
            if read_settings(partial) == settings:
                with h5py.File(partial, "r") as h5:
                    start = int(h5.attrs["done"])
        except (OSError, KeyError, ValueError):
            start = 0
    if start == 0:
        partial.parent.mkdir(parents=True, exist_ok=True)
        create_partial(partial, settings, n, m, int(settings["image_size"]), cond.dim, cond.kind == "images")
    elif progress:
        print(f"rcdm sample: resuming {partial} at sample {start} of {n}", file=sys.stderr)
    return start


def _sample_batch(
    model,
    diffusion,
    feat: torch.Tensor,
    c_idx: np.ndarray,
    s_idx: np.ndarray,
    settings: dict[str, Any],
    device: torch.device,
    precision: str,
    cuda_graph: bool,
) -> np.ndarray:
    """uint8 [B, S, S, 3] samples conditioned on ``feat``, each from its own seeded noise generator."""
    from rcdm.samplers import sample

    size = int(settings["image_size"])
    gens = make_generators(settings["seed"], c_idx, s_idx, device)
    autocast_dtype = PRECISIONS[precision]
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), amp:
        x = sample(
            model, diffusion, (len(c_idx), 3, size, size), sampler=settings["sampler"],
            steps=settings["steps"], eta=settings["eta"], clip_denoised=settings["clip_denoised"],
            model_kwargs={"feat": feat}, generators=gens, device=device, cuda_graph=cuda_graph,
        )  # fmt: skip
    return to_uint8(x).cpu().numpy()


def _write_batch(h5, lo, hi, images, c_idx, s_idx, cond, cond_ids, uniq, uniq_feat) -> None:
    """Store one batch in the ``.partial`` file (samples, indices, image conditionings) and flush: the
    ``done`` attribute advances only after the rows are written."""
    h5[SAMPLES][lo:hi] = images
    h5[COND_INDEX][lo:hi] = c_idx
    h5[SAMPLE_INDEX][lo:hi] = s_idx
    if cond.kind == "images":
        pos = np.searchsorted(cond_ids, uniq)
        h5[COND_IDS][pos[0] : pos[-1] + 1] = uniq
        h5[COND_IMAGES][pos[0] : pos[-1] + 1] = cond.cond_images(uniq)
        h5[COND_FEATURES][pos[0] : pos[-1] + 1] = uniq_feat.cpu().numpy()
    h5.attrs["done"] = hi
    h5.flush()


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="RCDM checkpoint file (published or ours)")
    g.add_argument("--model-flags", help="JSON/YAML model flags (default: published flags + inference)")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that unpickle code")
    g = parser.add_argument_group("conditioning (one of --features / --dataset)")
    g.add_argument("--features", help="features file (HDF5) whose rows condition the samples")
    g.add_argument("--dataset", help="images to encode: an image folder, 'photos' or 'shapes'")
    g.add_argument("--split", default="val", help="dataset split (shapes) [val]")
    g.add_argument("--encoder", help="encoder name for --dataset (dino, simclr, ..., small, pkg.mod:fn)")
    g.add_argument("--encoder-checkpoint", help="encoder weights file")
    g.add_argument("--layer", default="trunk", choices=("trunk", "head"))
    g.add_argument("--trust-encoder", action="store_true", help="allow encoder files that unpickle code")
    g.add_argument("--num-images", type=int, help="use a seeded random subset of this many conditionings")
    g.add_argument("--subset-seed", type=int, default=0)
    g = parser.add_argument_group("sampling")
    g.add_argument("--samples-per-image", type=int, default=1)
    g.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim", "dpm-solver++"))
    g.add_argument("--steps", type=int, help="sampling steps (default: the diffusion's own timesteps)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--no-clip", action="store_true", help="do not clip x_0 predictions to [-1, 1]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast precision")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    g.add_argument("--cuda-graph", action="store_true", help="replay a captured CUDA graph per step (CUDA)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output name X.h5; shard i of k writes X.part-i-of-k.h5")
    g.add_argument("--shard", type=int, default=0)
    g.add_argument("--num-shards", type=int, default=1)
    g.add_argument("--overwrite", action="store_true", help="recompute even a complete shard")
    g.add_argument("--keep-finished", type=Path, metavar="DIR", help=finished.KEEP_HELP)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--check", action="store_true", help=CHECK_HELP + " (every shard of --num-shards)")


def _open_conditioning(args, image_size: int, device: torch.device):
    if bool(args.features) == bool(args.dataset):
        raise SystemExit("rcdm sample: give exactly one of --features or --dataset")
    if args.features:
        with reading(args.features):
            return FeatureConditioning(args.features)
    if not args.encoder:
        raise SystemExit("rcdm sample: --dataset needs --encoder (and usually --encoder-checkpoint)")
    from rcdm import encoders
    from rcdm.data import open_dataset_input

    with reading(args.encoder_checkpoint, fix=REFETCH):
        enc = encoders.load_as_extracted(
            args.encoder, args.encoder_checkpoint, args.layer, trust=args.trust_encoder
        )
    source = open_dataset_input(args.dataset, split=args.split)
    return ImageConditioning(source, enc, image_size, device, spec=args.dataset)


def _check_conditioning(args, model, cond) -> np.ndarray:
    """The selected conditionings, checked against the model (their dimension) and the request (how many,
    in how many shards): a mismatch is an InputFileError naming the conditioning's file."""
    source = args.features or args.encoder_checkpoint or args.dataset
    if model.ssl_dim != cond.dim:
        raise InputFileError(
            source,
            f"gives {cond.dim}-d representations but the model {args.checkpoint} expects {model.ssl_dim}-d "
            "ones",
            "give the features (or encoder) of the model's encoder and layer",
        )
    if args.num_images is not None and args.num_images > cond.n:
        raise InputFileError(
            source,
            f"holds {cond.n} conditionings, fewer than the {args.num_images} asked for (--num-images)",
            f"ask for at most {cond.n}, or give a larger set",
        )
    selected = select_conditionings(cond.n, args.num_images, args.subset_seed)
    if args.num_shards > len(selected):
        raise InputFileError(
            source,
            f"{len(selected)} conditionings cannot fill {args.num_shards} shards (--num-shards)",
            f"use at most {len(selected)} shards",
        )
    return selected


def run(args: argparse.Namespace) -> int:
    from rcdm.checkpoint import load_model
    from rcdm.io import sha256_file

    if args.samples_per_image < 1 or args.batch_size < 1:
        raise SystemExit("rcdm sample: --samples-per-image and --batch-size must be >= 1")
    out = hdf5.part_path(args.out, args.shard, args.num_shards)
    device = torch.device("cpu") if args.check else resolve_device(args.device)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise InputFileError(checkpoint, "checkpoint not found", MAKE_FIRST)
    with reading(model_flags_file(args.model_flags)):
        flags = read_model_flags(args.model_flags)
    settings: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model_sha256": sha256_file(checkpoint),
        "model_flags": flags or {},
        "num_images": args.num_images or 0,
        "subset_seed": args.subset_seed,
        "samples_per_image": args.samples_per_image,
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        "clip_denoised": not args.no_clip,
        "seed": args.seed,
        "seed_rule": SEED_RULE,
        "precision": args.precision,
        "shard": args.shard,
        "num_shards": args.num_shards,
    }
    keep_dir = finished.keep_dir(args.keep_finished) if args.num_shards > 1 and not args.check else None
    may_restore = keep_dir is not None and not args.overwrite
    if may_restore and finished.restore(out, keep_dir, lambda kept: _made_with(kept, settings)):
        print(f"rcdm sample: {out} restored from {finished.kept_path(out, keep_dir)}", file=sys.stderr)
    if out.exists() and not args.overwrite and not args.check:
        with reading(out):  # this job's own earlier output
            stored = read_settings(out)
        if _settings_equal(stored, settings):
            with reading(out):
                check_samples_file(out)
            print(f"rcdm sample: {out} is complete, skipping", file=sys.stderr)
            if keep_dir is not None:
                finished.keep(out, keep_dir)
            print(out)
            return 0

    with reading(checkpoint):
        model, diffusion = load_model(checkpoint, flags, trust=args.trust_checkpoint, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image_size = int(model.image_size)
    cond = _open_conditioning(args, image_size, device)
    try:
        selected = _check_conditioning(args, model, cond)
        lo, hi = hdf5.shard_range(len(selected), args.shard, args.num_shards)
        if args.check:
            k = args.samples_per_image
            what = f"{len(selected)} of {cond.n} conditionings ({cond.kind}), {k} samples each"
            model_is = f"{checkpoint} ({image_size} px, {model.ssl_dim}-d)"
            return check_passed("sample", f"{model_is}; {what} in {args.num_shards} shard(s)")
        settings.update(cond.describe())
        settings.update(
            image_size=image_size, ssl_dim=int(cond.dim), num_cond_total=int(len(selected)), shard_start=lo,
            shard_stop=hi, num_steps=int(args.steps or diffusion.num_timesteps),
        )  # fmt: skip
        generate_shard(
            model, diffusion, cond, selected[lo:hi], out, settings, batch_size=args.batch_size, device=device,
            precision=args.precision, progress=not args.no_progress, overwrite=args.overwrite,
            cuda_graph=args.cuda_graph,
        )  # fmt: skip
    finally:
        cond.close()
    if keep_dir is not None:
        finished.keep(out, keep_dir)
    print(out)
    return 0


def _settings_equal(stored: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a shard file's stored settings are ``settings`` (everything else in them follows from these,
    the checkpoint and the conditioning)."""
    return all(stored.get(k) == json.loads(json.dumps(v)) for k, v in settings.items())


def _made_with(path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``path`` is a complete, readable shard file made with ``settings`` (False, not an error, when
    it is broken: a kept copy that cannot be used is made again)."""
    try:
        if not _settings_equal(read_settings(path), settings):
            return False
        check_samples_file(path)
    except (OSError, KeyError, ValueError):
        return False
    return True
