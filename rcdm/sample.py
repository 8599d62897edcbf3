"""Stage ``rcdm sample``: generate images conditioned on representations, one shard of conditionings per job.

Conditionings come from a features file (row i, index 0 = the image's representation) or from images (a
folder, ``photos``, ``shapes``) encoded on the fly. Shard i of k covers a fixed contiguous slice of the
(selected) conditionings. Sample j of conditioning c starts from noise drawn from a generator seeded by a hash
of (seed, c, j) -- initial and per-step noise alike -- so every sample is reproducible and independent of the
number of shards and of the batch size.

Shard file (HDF5, ``kind = "samples"``): ``samples`` uint8 [n, S, S, 3], ``cond_index`` int64 [n] (row of the
features file / index in the dataset), ``sample_index`` int64 [n]; with image conditioning also
``cond_images`` uint8 [m, S, S, 3] and ``cond_features`` float32 [m, D] for the shard's m conditionings
(``cond_ids`` int64 [m]); settings as attributes (``settings_json`` holds all of them). Samples are written
conditioning-major. Progress is flushed after every batch to ``<shard>.partial``: a killed job resumes where
it stopped; the final name appears (by rename) only when the shard is complete and is never recomputed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm import h5schema

KIND = "samples"
FORMAT_VERSION = 1
SAMPLES = "samples"
COND_INDEX = "cond_index"
SAMPLE_INDEX = "sample_index"
COND_IDS = "cond_ids"
COND_IMAGES = "cond_images"
COND_FEATURES = "cond_features"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ShardSettingsMismatch(RuntimeError):
    """An existing shard file was written with different settings."""


# ----------------------------------------------------------------------------------------------- noise


def noise_seed(seed: int, cond_index: int, sample_index: int) -> int:
    """63-bit generator seed for sample ``sample_index`` of conditioning ``cond_index`` (blake2b hash)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, cond_index, sample_index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generators(
    seed: int, cond_index: Sequence[int], sample_index: Sequence[int], device: torch.device | str
) -> list[torch.Generator]:
    """One generator per batch element, seeded by :func:`noise_seed`."""
    gens = []
    for c, s in zip(cond_index, sample_index):
        g = torch.Generator(device=device)
        g.manual_seed(noise_seed(seed, int(c), int(s)))
        gens.append(g)
    return gens


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [N, 3, H, W] -> uint8 [N, H, W, 3], as guided-diffusion's sample script converts."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------------------------- conditioning


class FeatureConditioning:
    """Conditioning representations read from a features file (index 0: the unflipped image)."""

    kind = "features"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.attrs = h5schema.check_features_file(self.path, deep=False)
        self.n = int(self.attrs["num_images"])
        self.dim = int(self.attrs["dim"])
        self._h5: h5py.File | None = None

    def describe(self) -> dict[str, Any]:
        a = self.attrs
        return {
            "cond_source": "features",
            "features_file": str(self.path),
            "features_paths_sha256": a.get("paths_sha256", ""),
            "images_file": a.get("images_file", ""),
            "dataset": a.get("dataset", ""),
            "split": a.get("split", ""),
            "encoder": a.get("encoder", ""),
            "layer": a.get("layer", ""),
        }

    def features(self, ids: np.ndarray) -> torch.Tensor:
        """float32 [len(ids), D] for sorted, distinct conditioning indices ``ids``."""
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        ds = self._h5[h5schema.FEATURES]
        ids = np.asarray(ids, dtype=np.int64)
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        if hi - lo <= 2 * len(ids):  # (nearly) contiguous: one slice read
            block = ds[lo:hi, 0][ids - lo]
        else:
            block = ds[ids, 0]
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))

    def cond_images(self, ids: np.ndarray) -> None:
        return None

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


class ImageConditioning:
    """Conditioning images from a dataset, cropped and encoded on the fly like extraction does."""

    kind = "images"

    def __init__(self, source, encoder: torch.nn.Module, image_size: int, device: torch.device, spec: str):
        self.source = source
        self.encoder = encoder.to(device)
        self.image_size = image_size
        self.device = device
        self.spec = spec
        self.n = len(source)
        self.dim = int(encoder.dim)
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "cond_source": "images",
            "dataset": self.spec,
            "encoder": self.encoder.encoder_name,
            "layer": self.encoder.layer,
            "encoder_input_size": int(self.encoder.input_size),
            "encoder_input_norm": self.encoder.input_norm,
        }

    def _encode(self, ids: np.ndarray) -> None:
        """Crop and encode (in one batch) those of ``ids`` not yet cached."""
        from rcdm.preprocess import center_crop_arr, encoder_input

        todo = [int(i) for i in ids if int(i) not in self._cache]
        if not todo:
            return
        if len(self._cache) + len(todo) > 4096:
            self._cache.clear()
        crops, enc_in = [], []
        for i in todo:
            image = self.source.load(i)
            crops.append(center_crop_arr(image, self.image_size))
            enc_in.append(center_crop_arr(image, self.encoder.input_size))
        x = encoder_input(torch.from_numpy(np.stack(enc_in)), self.encoder.input_norm).to(self.device)
        with torch.inference_mode():
            feats = self.encoder(x).float()
        for i, crop, feat in zip(todo, crops, feats):
            self._cache[i] = (crop, feat)

    def features(self, ids: np.ndarray) -> torch.Tensor:
        self._encode(ids)
        return torch.stack([self._cache[int(i)][1] for i in ids])

    def cond_images(self, ids: np.ndarray) -> np.ndarray:
        self._encode(ids)
        return np.stack([self._cache[int(i)][0] for i in ids])

    def close(self) -> None:
        self._cache.clear()


def select_conditionings(n: int, num_images: int | None, subset_seed: int) -> np.ndarray:
    """Sorted conditioning indices: all ``n``, or a seeded random subset of ``num_images`` of them."""
    if num_images is None or num_images >= n:
        return np.arange(n, dtype=np.int64)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return np.sort(np.random.default_rng(subset_seed).choice(n, size=num_images, replace=False)).astype(
        np.int64
    )


# ----------------------------------------------------------------------------------------------- shard file


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``settings_json`` attribute of a (partial or complete) shard file."""
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["settings_json"])


def check_samples_file(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a finished samples shard; return its attributes (``settings`` decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples shard not found: {path}")
    with h5py.File(path, "r") as h5:
        attrs = h5schema.read_attrs(h5)
        if attrs.get("kind") != KIND or not attrs.get("complete"):
            raise h5schema.H5SchemaError(f"{path}: not a complete samples shard (kind={attrs.get('kind')!r})")
        n = int(attrs["num_samples"])
        s = int(attrs["image_size"])
        for name, shape in ((SAMPLES, (n, s, s, 3)), (COND_INDEX, (n,)), (SAMPLE_INDEX, (n,))):
            if name not in h5 or h5[name].shape != shape:
                got = h5[name].shape if name in h5 else "missing"
                raise h5schema.H5SchemaError(f"{path}: dataset {name!r} is {got}, expected {shape}")
    attrs["settings"] = json.loads(attrs["settings_json"])
    return attrs


def _create_partial(
    path: Path, settings: dict, n: int, m: int, size: int, dim: int, with_images: bool
) -> None:
    with h5py.File(path, "w") as h5:
        rows = max(1, min(n, 64))
        h5.create_dataset(SAMPLES, shape=(n, size, size, 3), dtype=np.uint8, chunks=(rows, size, size, 3))
        h5.create_dataset(COND_INDEX, shape=(n,), dtype=np.int64)
        h5.create_dataset(SAMPLE_INDEX, shape=(n,), dtype=np.int64)
        if with_images:
            h5.create_dataset(COND_IDS, shape=(m,), dtype=np.int64)
            h5.create_dataset(COND_IMAGES, shape=(m, size, size, 3), dtype=np.uint8)
            h5.create_dataset(COND_FEATURES, shape=(m, dim), dtype=np.float32)
        flat = {k: v for k, v in settings.items() if isinstance(v, str | int | float | bool)}
        h5schema.set_attrs(h5, flat)
        h5.attrs["kind"] = KIND
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["num_samples"] = n
        h5.attrs["settings_json"] = json.dumps(settings, sort_keys=True)
        h5.attrs["done"] = 0
        h5.attrs["complete"] = False


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
    """
    from tqdm.auto import tqdm

    from rcdm.samplers import CudaGraphModel, sample

    out_path = Path(out_path)
    device = torch.device(device)
    settings = json.loads(json.dumps(settings, sort_keys=True))  # canonical, JSON-typed
    k = int(settings["samples_per_image"])
    size = int(settings["image_size"])
    if out_path.exists() and not overwrite:
        existing = read_settings(out_path)
        if existing != settings:
            diff = sorted(
                key for key in set(existing) | set(settings) if existing.get(key) != settings.get(key)
            )
            raise ShardSettingsMismatch(
                f"{out_path} exists with other settings ({', '.join(diff)}); delete it or pass --overwrite"
            )
        check_samples_file(out_path)
        print(f"rcdm sample: {out_path} is complete, skipping", file=sys.stderr)
        return out_path

    cond_ids = np.asarray(cond_ids, dtype=np.int64)
    m = len(cond_ids)
    n = m * k
    item_cond = np.repeat(cond_ids, k)
    item_sample = np.tile(np.arange(k, dtype=np.int64), m)
    with_images = cond.kind == "images"
    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    if partial.exists() and not overwrite:
        try:
            if read_settings(partial) == settings:
                with h5py.File(partial, "r") as h5:
                    start = int(h5.attrs["done"])
        except (OSError, KeyError, ValueError):
            start = 0
    if start == 0:
        _create_partial(partial, settings, n, m, size, cond.dim, with_images)
    elif progress:
        print(f"rcdm sample: resuming {partial} at sample {start} of {n}", file=sys.stderr)

    autocast_dtype = PRECISIONS[precision]
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
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
            gens = make_generators(settings["seed"], c_idx, s_idx, device)
            with torch.inference_mode(), amp:
                x = sample(
                    model, diffusion, (hi - lo, 3, size, size), sampler=settings["sampler"],
                    steps=settings["steps"], eta=settings["eta"], clip_denoised=settings["clip_denoised"],
                    model_kwargs={"feat": feat}, generators=gens, device=device, cuda_graph=cuda_graph,
                )  # fmt: skip
            images = to_uint8(x).cpu().numpy()
            h5[SAMPLES][lo:hi] = images
            h5[COND_INDEX][lo:hi] = c_idx
            h5[SAMPLE_INDEX][lo:hi] = s_idx
            if with_images:
                pos = np.searchsorted(cond_ids, uniq)
                h5[COND_IDS][pos[0] : pos[-1] + 1] = uniq
                h5[COND_IMAGES][pos[0] : pos[-1] + 1] = cond.cond_images(uniq)
                h5[COND_FEATURES][pos[0] : pos[-1] + 1] = uniq_feat.cpu().numpy()
            h5.attrs["done"] = hi
            h5.flush()
            bar.update(hi - lo)
        h5.attrs["seconds"] = float(h5.attrs.get("seconds", 0.0)) + time.perf_counter() - t0
        h5.attrs["complete"] = True
    bar.close()
    os.replace(partial, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------- CLI


def load_flags(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Model flags from a JSON or YAML file (None: let the checkpoint loader infer them)."""
    if path is None:
        return None
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model flags file not found: {path}")
    flags = yaml.safe_load(path.read_text())
    if not isinstance(flags, dict):
        raise ValueError(f"{path}: model flags must be a mapping of flag names to values")
    return flags


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
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast precision")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    g.add_argument("--cuda-graph", action="store_true", help="replay a captured CUDA graph per step (CUDA)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output name X.h5; shard i of k writes X.part-i-of-k.h5")
    g.add_argument("--shard", type=int, default=0)
    g.add_argument("--num-shards", type=int, default=1)
    g.add_argument("--overwrite", action="store_true", help="recompute even a complete shard")
    g.add_argument("--no-progress", action="store_true")


def _open_conditioning(args, image_size: int, device: torch.device):
    if bool(args.features) == bool(args.dataset):
        raise SystemExit("rcdm sample: give exactly one of --features or --dataset")
    if args.features:
        return FeatureConditioning(args.features)
    if not args.encoder:
        raise SystemExit("rcdm sample: --dataset needs --encoder (and usually --encoder-checkpoint)")
    from rcdm import encoders
    from rcdm.data import open_dataset

    enc = encoders.load(args.encoder, args.encoder_checkpoint, args.layer, trust=args.trust_encoder)
    source = open_dataset(args.dataset, split=args.split)
    return ImageConditioning(source, enc, image_size, device, spec=args.dataset)


SEED_RULE = "blake2b-8(<qqq: seed, cond_index, sample_index>) & (2**63-1) seeds one torch.Generator per item"
#: settings that differ between the shards of one sample set
SHARD_KEYS = ("shard", "num_shards", "shard_start", "shard_stop")


def run(args: argparse.Namespace) -> int:
    from rcdm.checkpoint import load_model
    from rcdm.io import sha256_file

    if args.samples_per_image < 1 or args.batch_size < 1:
        raise SystemExit("rcdm sample: --samples-per-image and --batch-size must be >= 1")
    out = h5schema.part_path(args.out, args.shard, args.num_shards)
    device = torch.device(args.device)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise SystemExit(f"rcdm sample: checkpoint not found: {checkpoint}")
    flags = load_flags(args.model_flags)
    settings: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
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
    if out.exists() and not args.overwrite:
        # Everything else in the stored settings follows from these (and the checkpoint / conditioning).
        stored = read_settings(out)
        if all(stored.get(k) == json.loads(json.dumps(v)) for k, v in settings.items()):
            check_samples_file(out)
            print(f"rcdm sample: {out} is complete, skipping", file=sys.stderr)
            print(out)
            return 0

    model, diffusion = load_model(checkpoint, flags, trust=args.trust_checkpoint, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    image_size = int(model.image_size)
    cond = _open_conditioning(args, image_size, device)
    try:
        if model.ssl_dim != cond.dim:
            raise SystemExit(
                f"rcdm sample: the model expects {model.ssl_dim}-d representations but the conditioning "
                f"has {cond.dim}-d ones ({cond.describe()})"
            )
        selected = select_conditionings(cond.n, args.num_images, args.subset_seed)
        lo, hi = h5schema.shard_range(len(selected), args.shard, args.num_shards)
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
    print(out)
    return 0
