"""Shared parts of the studies: command-line options, loading model/encoder/images, sampling with fixed
noise, representation helpers, and writing a labelled figure, a CSV and a settings record atomically.

Every study writes ``OUT/<study>.png`` (plus optional ``OUT/<study>_*.png``), ``OUT/<study>.csv`` and, last,
``OUT/<study>.json`` (its settings). A rerun whose settings record matches and whose outputs exist is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from rcdm.io import atomic_path

SAMPLERS = ("ddim", "ddpm", "dpm-solver++")

# ------------------------------------------------------------------------------------------------ options


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="RCDM checkpoint (state dict) to sample from")
    g.add_argument("--model-flags", default=None, help="JSON object or .json/.yaml file of creation flags")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow files that need code unpickling")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_encoder_arguments(parser: argparse.ArgumentParser, *, layer: bool = True) -> None:
    g = parser.add_argument_group("encoder")
    g.add_argument(
        "--encoder", required=True, help="encoder name (dino, simclr, ..., small, pkg.mod:factory)"
    )
    g.add_argument("--encoder-checkpoint", default=None, help="the encoder's weight file")
    if layer:
        g.add_argument(
            "--layer", choices=("trunk", "head"), default="trunk", help="representation to condition on"
        )


def add_source_arguments(parser: argparse.ArgumentParser, *, dataset_default: str | None = None) -> None:
    g = parser.add_argument_group("conditioning images")
    g.add_argument("--images", default=None, help="images HDF5 file written by `rcdm extract`")
    g.add_argument("--features", default=None, help="its features HDF5 file (clean representations)")
    g.add_argument(
        "--dataset",
        default=dataset_default,
        help="instead of --images: a dataset name (photos, shapes) or an image folder",
    )
    g.add_argument("--split", default="val", help="split of a generated --dataset (shapes)")
    g.add_argument(
        "--image-root",
        default=None,
        help="folder the images file's recorded paths are relative to: the encoder then sees the original's "
        "centre crop, as in extraction (else the stored crop, resized)",
    )
    g.add_argument("--num-images", type=int, default=4, help="how many conditioning images")
    g.add_argument("--indices", default=None, help="comma-separated image indices (overrides --num-images)")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, samples: int = 4) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--samples", type=int, default=samples, help="samples per conditioning (k)")
    g.add_argument("--sampler", choices=SAMPLERS, default="dpm-solver++", help="sampler")
    g.add_argument("--steps", type=int, default=15, help="sampling steps")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    g.add_argument("--batch-size", type=int, default=64, help="samples per model batch")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the initial noise (and augmentations/attacks)"
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--probe", default=None, help="factor probe (`rcdm study probe`) to score kept factors")
    g.add_argument("--force", action="store_true", help="recompute even if finished outputs exist")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_standard_arguments(parser: argparse.ArgumentParser, *, samples: int = 4) -> None:
    """The options every sampling study shares (the workflow wires them the same way for all)."""
    add_model_arguments(parser)
    add_encoder_arguments(parser)
    add_source_arguments(parser)
    add_sampling_arguments(parser, samples=samples)
    add_output_arguments(parser)


def parse_indices(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"--indices must be comma-separated integers, got {text!r}") from err


def parse_pairs(text: str | None, n: int) -> list[tuple[int, int]]:
    """``--pairs 'i-j,k-l'`` (positions among the loaded images); default consecutive pairs 0-1, 2-3, ..."""
    if not text:
        if n < 2:
            raise ValueError("this study needs at least two conditioning images (--num-images >= 2)")
        return [(i, i + 1) for i in range(0, n - 1, 2)]
    pairs = []
    for item in text.split(","):
        try:
            i, j = (int(v) for v in item.split("-"))
        except ValueError as err:
            raise ValueError(f"--pairs entries look like 'i-j', got {item!r}") from err
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"--pairs {item!r} refers outside the {n} loaded images")
        pairs.append((i, j))
    return pairs


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ loading


def parse_model_flags(spec: str | None) -> dict | None:
    """``--model-flags``: a JSON object, or a .json / .yaml file holding one."""
    if not spec:
        return None
    path = Path(spec)
    if not spec.lstrip().startswith("{") and path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--model-flags file not found: {path}")
        if path.suffix == ".json":
            flags = json.loads(path.read_text())
        else:
            import yaml

            flags = yaml.safe_load(path.read_text())
    else:
        try:
            flags = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-flags is neither a JSON object nor a .json/.yaml file: {err}") from err
    if not isinstance(flags, dict):
        raise ValueError(f"--model-flags must describe a JSON object, got {type(flags).__name__}")
    return flags


def load_rcdm(checkpoint: str, flags: dict | None, *, trust: bool, device: torch.device):
    """(model, diffusion) in eval mode on ``device``."""
    from rcdm.checkpoint import load_model

    model, diffusion = load_model(checkpoint, flags, trust=trust, device=str(device))
    return model.eval(), diffusion


def load_encoder(name: str, checkpoint: str | None, layer: str, *, trust: bool, device: torch.device):
    from rcdm.encoders import load

    return load(name, checkpoint, layer, trust=trust).to(device)


def model_image_size(model) -> int:
    size = getattr(model, "image_size", None)
    if size is None:
        raise ValueError("the RCDM model does not record its image_size")
    return int(size)


def model_ssl_dim(model) -> int | None:
    emb = getattr(model, "ssl_emb", None)
    return int(emb.in_features) if isinstance(emb, torch.nn.Linear) else None


def check_dims(model, dim: int, what: str) -> None:
    want = model_ssl_dim(model)
    if want is not None and want != dim:
        raise ValueError(f"the RCDM model is conditioned on {want}-d vectors but {what} gives {dim}-d ones")


@dataclass
class Sources:
    """Conditioning images: ``show`` at the model resolution S, ``enc`` at the encoder's input size E."""

    show: np.ndarray  # uint8 [N, S, S, 3]
    enc: np.ndarray  # uint8 [N, E, E, 3]
    names: list[str]
    labels: np.ndarray  # int64 [N]
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    factor_names: dict[str, list[str] | None] = field(default_factory=dict)
    features: torch.Tensor | None = None  # [N, D] precomputed clean representations (features file)
    indices: list[int] = field(default_factory=list)  # positions in the images file / dataset

    def __len__(self) -> int:
        return len(self.show)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def load_sources(args: argparse.Namespace, image_size: int, encoder_size: int) -> Sources:
    """Conditioning images from ``--images`` (+ ``--features``) or ``--dataset``, first ``--num-images``.

    From an images file the encoder input is the original file's centre crop at E when its recorded path
    is readable (exactly what extraction encoded), else the stored crop resized to E. From a dataset, both
    are ``center_crop_arr`` of the original, as extraction does.
    """
    indices = parse_indices(getattr(args, "indices", None))
    if args.images:
        return _sources_from_h5(
            args.images, args.features, indices, args.num_images, image_size, encoder_size, args.image_root
        )
    if args.dataset:
        return _sources_from_dataset(
            args.dataset, args.split, indices, args.num_images, image_size, encoder_size
        )
    raise ValueError("give the conditioning images: --images FILE.h5 or --dataset photos|shapes|FOLDER")


def _pick(n_total: int, indices: list[int] | None, num: int) -> list[int]:
    if indices is None:
        if num < 1:
            raise ValueError(f"--num-images must be positive, got {num}")
        return list(range(min(num, n_total)))
    bad = [i for i in indices if not 0 <= i < n_total]
    if bad:
        raise IndexError(f"image indices {bad} outside [0, {n_total})")
    return indices


def _sources_from_h5(
    images_path, features_path, indices, num, image_size, encoder_size, image_root
) -> Sources:
    from rcdm.preprocess import center_crop_arr

    path = Path(images_path)
    with open_h5(path, "images file") as f:
        if "images" not in f:
            raise KeyError(f"{path} has no 'images' dataset (keys: {', '.join(f.keys())})")
        ds = f["images"]
        if ds.ndim != 4 or ds.shape[3] != 3 or ds.dtype != np.uint8:
            raise ValueError(f"{path}:images must be uint8 [N, S, S, 3], got {ds.dtype} {ds.shape}")
        idx = _pick(ds.shape[0], indices, num)
        show = take(ds, idx)
        labels = take(f["labels"], idx).astype(np.int64) if "labels" in f else np.full(len(idx), -1)
        paths = (
            [_str(p) for p in take(f["paths"], idx)] if "paths" in f else [f"{path.name}[{i}]" for i in idx]
        )
        factors, factor_names = read_factors(f, idx)
        images_digest = f.attrs.get("paths_sha256")
    if show.shape[1] != image_size:
        raise ValueError(f"{path} holds {show.shape[1]}px images but the model generates {image_size}px")
    enc = []
    for im, p in zip(show, paths):
        try:
            enc.append(
                center_crop_arr(_open_rgb(str(Path(image_root) / p) if image_root else p), encoder_size)
            )
        except (OSError, ValueError):
            enc.append(_resize_uint8(im[None], encoder_size)[0])
    features = read_features(features_path, idx, images_digest) if features_path else None
    names = [f"{i}" for i in idx]
    return Sources(show, np.stack(enc), names, labels, factors, factor_names, features, idx)


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _open_rgb(p: str) -> Image.Image:
    from rcdm.data import decode_image

    if not Path(p).is_file():
        raise OSError(p)
    return decode_image(p)


def read_factors(f, idx: list[int]) -> tuple[dict[str, np.ndarray], dict[str, list[str] | None]]:
    """Shapes factors: every dataset of the ``factors`` group (categorical: attribute ``categories``)."""
    if "factors" not in f:
        return {}, {}
    group = f["factors"]
    factors, names = {}, {}
    for key in group:
        ds = group[key]
        factors[key] = take(ds, idx)
        cats = ds.attrs.get("names", ds.attrs.get("categories"))
        names[key] = [_str(c) for c in cats] if cats is not None else None
    return factors, names


def take(ds, idx: Sequence[int]) -> np.ndarray:
    """Rows ``idx`` (any order, repeats allowed) of an HDF5 dataset, read in one selection."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return np.asarray(ds[0:0])
    order = np.unique(idx)
    if order[-1] - order[0] + 1 == len(order):
        block = np.asarray(ds[int(order[0]) : int(order[-1]) + 1])
    else:
        block = np.asarray(ds[order])
    return block[np.searchsorted(order, idx)]


def open_h5(path: str | Path, what: str):
    """``path`` opened read-only with h5py; a missing file is a FileNotFoundError naming ``what``."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return h5py.File(path, "r")


def features_dataset(f, path: str | Path):
    """The checked ``features`` [N, 2, D] dataset of an open features file."""
    if "features" not in f:
        raise KeyError(f"{path} has no 'features' dataset (keys: {', '.join(f.keys())})")
    ds = f["features"]
    if ds.ndim != 3 or ds.shape[1] != 2:
        raise ValueError(f"{path}:features must be [N, 2, D], got {ds.shape}")
    return ds


def read_features(features_path, idx: list[int], images_digest: str | None = None) -> torch.Tensor:
    """``features[idx, 0]`` (the un-mirrored images) as float32; with ``images_digest`` (the images file's
    ``paths_sha256``) the features file must record the same one, i.e. belong to the same images."""
    path = Path(features_path)
    with open_h5(path, "features file") as f:
        ds = features_dataset(f, path)
        digest = f.attrs.get("paths_sha256")
        if images_digest is not None and digest is not None and _str(digest) != _str(images_digest):
            raise ValueError(
                f"{path} was extracted from other images than --images (paths_sha256 differs): "
                "pass the features file made from the same images file"
            )
        if len(idx) and max(idx) >= ds.shape[0]:
            raise IndexError(f"{path} has {ds.shape[0]} rows, image index {max(idx)} requested")
        feats = torch.from_numpy(take(ds, idx)[:, 0].astype(np.float32))
    if not torch.isfinite(feats).all():
        raise ValueError(f"{path}: features of the chosen images contain NaN or infinite values")
    return feats


def _sources_from_dataset(spec, split, indices, num, image_size, encoder_size) -> Sources:
    from rcdm.data import open_dataset
    from rcdm.preprocess import center_crop_arr

    source = open_dataset(spec, split=split, native_size=max(image_size, encoder_size))
    idx = _pick(len(source), indices, num)
    show, enc, factors = [], [], {}
    for i in idx:
        im = source.load(i)
        show.append(center_crop_arr(im, image_size))
        enc.append(center_crop_arr(im, encoder_size))
        for k, v in source.factors(i).items():
            factors.setdefault(k, []).append(v)
    names = [_short_name(source.key(i)) for i in idx]
    labels = np.asarray([source.label(i) for i in idx], np.int64)
    return Sources(
        np.stack(show),
        np.stack(enc),
        names,
        labels,
        {k: np.asarray(v) for k, v in factors.items()},
        factor_names_of(source),
        indices=idx,
    )


def _short_name(key: str) -> str:
    """A figure label for a dataset key: the file stem, or the last dotted part (``skimage.data.coffee``)."""
    stem = key.rsplit("/", 1)[-1]
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
        if stem.lower().endswith(ext):
            return stem[: -len(ext)]
    return stem.rsplit(".", 1)[-1]


def factor_names_of(source) -> dict[str, list[str] | None]:
    """Category names of each recorded factor of a dataset (None for continuous factors)."""
    specs = getattr(source, "factor_specs", None) or {}
    return {name: (list(cats) if cats else None) for name, (_, cats) in specs.items()}


# ------------------------------------------------------------------------------------ representations


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(255.0)


def to_uint8(x: torch.Tensor, low: float = -1.0) -> np.ndarray:
    """float [N, 3, H, W] in [low, 1] (-1: model range, 0: unit range) -> uint8 [N, H, W, 3], rounded."""
    scale = 127.5 if low == -1.0 else 255.0
    y = ((x.detach().float() - low) * scale).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize of a float image batch (bicubic, antialiased when shrinking), range preserved."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lo, hi = float(x.min()), float(x.max())
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(lo, hi)


def encoder_forward(encoder, x_unit: torch.Tensor) -> torch.Tensor:
    """Differentiable encoder pass on [N, 3, H, W] images in [0, 1] (resized to its input size)."""
    from rcdm.preprocess import apply_input_norm

    x = resize(x_unit, int(encoder.input_size)) * 2.0 - 1.0
    return encoder(apply_input_norm(x, getattr(encoder, "input_norm", "none")))


def encode(encoder, x_unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Representations [N, D] (float32, on the encoder's device) of images in [0, 1], batched."""
    device = next(encoder.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(x_unit), batch_size):
            out.append(encoder_forward(encoder, x_unit[i : i + batch_size].to(device)).float())
    return torch.cat(out) if out else torch.empty(0)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``1 - cos(a_i, b_i)`` (broadcasting)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).clamp_min(0.0)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``|a_i - b_i| / |b_i|``: a scale-free distance to the reference ``b``."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-12)


def spread(x: torch.Tensor) -> float:
    """Mean per-coordinate variance across the rows of ``x`` [k, ...] (population variance)."""
    return float(x.float().flatten(1).var(dim=0, unbiased=False).mean()) if len(x) > 1 else 0.0


def direction_spread(emb: torch.Tensor) -> float:
    """Total variance of the L2-normalised rows, ``1 - |mean of unit vectors|^2`` in [0, 1].

    Scale free, so trunk (2048-d) and head (128..8192-d) spaces are comparable.
    """
    if len(emb) < 2:
        return 0.0
    u = F.normalize(emb.float(), dim=-1)
    return float(1.0 - u.mean(0).pow(2).sum())


# -------------------------------------------------------------------------------------------- sampling


@dataclass
class SamplingSettings:
    sampler: str = "dpm-solver++"
    steps: int | None = 15
    eta: float = 0.0
    clip: bool = True
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingSettings:
        if args.samples < 1:
            raise ValueError(f"--samples must be positive, got {args.samples}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        return cls(
            args.sampler,
            args.steps,
            args.eta,
            not args.no_clip,
            args.batch_size,
            args.seed,
            not args.no_progress,
        )


def fixed_noise(seed: int, k: int, image_size: int, channels: int = 3) -> torch.Tensor:
    """``k`` initial noises x_T [k, C, S, S], a function of (seed, index) only: noise j is the same for every
    conditioning, so rows of a figure differ only by their representation."""
    out = torch.empty(k, channels, image_size, image_size)
    for j in range(k):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        out[j] = torch.randn(channels, image_size, image_size, generator=g)
    return out


def sample_images(
    model,
    diffusion,
    feats: torch.Tensor,
    noise_index: Sequence[int] | torch.Tensor,
    noise_bank: torch.Tensor,
    settings: SamplingSettings,
    desc: str = "sampling",
) -> torch.Tensor:
    """Samples [M, 3, S, S] in [-1, 1] (CPU float32) for conditionings ``feats`` [M, D].

    Sample m starts from ``noise_bank[noise_index[m]]``; stochastic samplers also draw their per-step noise
    from a generator seeded by (seed, noise index), so equal indices mean equal randomness across conditions.
    """
    from tqdm import tqdm

    from rcdm.samplers import sample

    device = next(model.parameters()).device
    noise_index = torch.as_tensor(noise_index, dtype=torch.long)
    if len(noise_index) != len(feats):
        raise ValueError(f"{len(feats)} conditionings but {len(noise_index)} noise indices")
    if not torch.isfinite(feats).all():
        raise ValueError("conditioning representations contain NaN or infinite values")
    out = []
    bs = settings.batch_size
    for i in tqdm(range(0, len(feats), bs), desc=desc, disable=not settings.progress, file=sys.stderr):
        fb = feats[i : i + bs].to(device, torch.float32)
        nb = noise_index[i : i + bs]
        x_t = noise_bank[nb].to(device)
        gens = None
        if settings.sampler == "ddpm" or settings.eta > 0:
            gens = [_generator(settings.seed, int(j), device) for j in nb]
        x = sample(
            model,
            diffusion,
            tuple(x_t.shape),
            sampler=settings.sampler,
            steps=settings.steps,
            eta=settings.eta,
            noise=x_t,
            clip_denoised=settings.clip,
            model_kwargs={"feat": fb},
            generators=gens,
            progress=False,
            device=device,
        )
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _generator(seed: int, j: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + j + 7_919)


# ---------------------------------------------------------------------------------------------- figures


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def labelled_table(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    min_tile: int = 64,
    pad: int = 2,
) -> Image.Image:
    """A table of uint8 [H, W, 3] tiles (``None`` = blank cell) with row labels on the left, column labels on
    top and a title. Tiles are pasted unchanged (no contrast stretching); tiles smaller than ``min_tile``
    are enlarged by an integer factor with nearest-neighbour so 32 px samples stay readable."""
    tiles = [t for row in rows for t in row if t is not None]
    if not tiles:
        raise ValueError("a figure needs at least one tile")
    shape = tiles[0].shape
    for t in tiles:
        if t.shape != shape or t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"every tile must be uint8 {shape}, got {t.dtype} {t.shape}")
    h, w = shape[:2]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    font, title_font = _font(12), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((_text_size(probe, s, font)[0] for s in row_labels or []), default=0)
    label_w += 8 if label_w else 0
    head_h = max((_text_size(probe, s, font)[1] for s in col_labels or []), default=0)
    head_h += 8 if head_h else 0
    title_w, title_h = _text_size(probe, title, title_font)
    title_h += 10 if title else 0
    width = max(label_w + ncols * (tw + pad) + pad, title_w + 10)
    height = title_h + head_h + len(rows) * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((5, 4), title, fill="black", font=title_font)
    for c, text in enumerate(col_labels or []):
        x = label_w + pad + c * (tw + pad) + max(0, (tw - _text_size(draw, text, font)[0]) // 2)
        draw.multiline_text((x, title_h + 2), text, fill="black", font=font, align="center")
    for r, row in enumerate(rows):
        y = title_h + head_h + pad + r * (th + pad)
        if row_labels and r < len(row_labels):
            ty = y + max(0, (th - _text_size(draw, row_labels[r], font)[1]) // 2)
            draw.multiline_text((4, ty), row_labels[r], fill="black", font=font)
        for c, tile in enumerate(row):
            if tile is not None:
                img = Image.fromarray(np.ascontiguousarray(tile), "RGB")
                if scale > 1:
                    img = img.resize((tw, th), Image.NEAREST)
                canvas.paste(img, (label_w + pad + c * (tw + pad), y))
    return canvas


# ---------------------------------------------------------------------------------------------- outputs


class StudyOutput:
    """Paths and atomic writers of one study's outputs under ``out``."""

    def __init__(self, out: str | Path, name: str) -> None:
        self.dir = Path(out)
        self.name = name
        self.png = self.dir / f"{name}.png"
        self.csv = self.dir / f"{name}.csv"
        self.record = self.dir / f"{name}.json"

    def finished(self, settings: Mapping) -> bool:
        """True when a previous run with identical settings wrote every output."""
        if not (self.png.is_file() and self.csv.is_file() and self.record.is_file()):
            return False
        try:
            done = json.loads(self.record.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        extra = [self.dir / p for p in done.get("outputs", [])]
        return done.get("settings") == _jsonable(settings) and all(p.is_file() for p in extra)

    def save_png(self, image: Image.Image, suffix: str = "") -> Path:
        path = self.dir / f"{self.name}{suffix}.png"
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        return path

    def save_csv(self, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
        write_csv(self.csv, rows, columns)
        return self.csv

    def mark_done(self, settings: Mapping, outputs: Sequence[Path] = ()) -> None:
        record = {"study": self.name, "settings": _jsonable(settings), "outputs": [p.name for p in outputs]}
        with atomic_path(self.record, suffix=".json") as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    """Atomic CSV; columns default to the keys of the first row (in order); floats keep 6 digits."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def settings_of(args: argparse.Namespace, skip: Sequence[str] = ("force", "no_progress", "func")) -> dict:
    """The arguments that determine a study's result (recorded and compared for resuming). Input files are
    recorded with their size and modification time, so a rerun after e.g. retraining is not skipped."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in skip or key == "out":
            continue
        if isinstance(value, str) and value and Path(value).is_file():
            stat = Path(value).stat()
            value = {"path": value, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        out[key] = value
    return out


def run_once(args: argparse.Namespace, name: str, body: Callable[[StudyOutput], list[Path]]) -> int:
    """Run ``body`` unless a finished run with the same settings exists; record settings when it succeeds."""
    out = StudyOutput(args.out, name)
    settings = settings_of(args)
    if not args.force and out.finished(settings):
        print(f"study {name}: finished outputs in {out.dir} match these settings; skipping", file=sys.stderr)
        return 0
    extra = body(out)
    out.mark_done(settings, [p for p in extra if p not in (out.png, out.csv)])
    print(f"study {name}: wrote {out.png} and {out.csv}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- context


@dataclass
class StudyContext:
    """Everything a sampling study needs, loaded once from the standard options."""

    model: torch.nn.Module
    diffusion: object
    encoder: torch.nn.Module
    sources: Sources
    settings: SamplingSettings
    noise: torch.Tensor  # [k, 3, S, S] initial noises shared by all conditions
    device: torch.device
    probe: object | None = None
    image_size: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, layer: str | None = None) -> StudyContext:
        device = pick_device(args.device)
        settings = SamplingSettings.from_args(args)
        model, diffusion = load_rcdm(
            args.checkpoint, parse_model_flags(args.model_flags), trust=args.trust_checkpoint, device=device
        )
        encoder = load_encoder(
            args.encoder,
            args.encoder_checkpoint,
            layer or args.layer,
            trust=args.trust_checkpoint,
            device=device,
        )
        check_dims(model, int(encoder.dim), f"encoder {args.encoder!r} ({encoder.layer})")
        size = model_image_size(model)
        sources = load_sources(args, size, int(encoder.input_size))
        if sources.features is not None and sources.features.shape[1] != encoder.dim:
            raise ValueError(
                f"--features holds {sources.features.shape[1]}-d vectors but the encoder's {encoder.layer} "
                f"is {encoder.dim}-d: pass the features file of this encoder and layer"
            )
        probe = None
        if getattr(args, "probe", None):
            from rcdm.stages.study.probe import load_probe

            probe = load_probe(args.probe, device=device)
        noise = fixed_noise(args.seed, max(1, args.samples), size)
        return cls(model, diffusion, encoder, sources, settings, noise, device, probe, size)

    def describe(self) -> str:
        s = self.settings
        steps = "" if s.steps is None else f" {s.steps} steps"
        return f"{self.encoder.encoder_name} {self.encoder.layer}, {s.sampler}{steps}"

    def clean_features(self) -> torch.Tensor:
        """Clean representations [N, D] (CPU): from the features file when given, else encoded here."""
        if self.sources.features is not None:
            return self.sources.features.float()
        return self.embed_unit(to_unit(self.sources.enc))

    def embed_unit(self, x_unit: torch.Tensor) -> torch.Tensor:
        """Representations (CPU float32) of [N, 3, H, W] images in [0, 1]."""
        return encode(self.encoder, x_unit, self.settings.batch_size).cpu()

    def embed_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Representations of generated samples [N, 3, S, S] in [-1, 1] (CPU float32)."""
        return self.embed_unit((samples + 1) / 2)

    def sample(self, feats: torch.Tensor, noise_index, desc: str = "sampling") -> torch.Tensor:
        return sample_images(self.model, self.diffusion, feats, noise_index, self.noise, self.settings, desc)

    def repeat_samples(self, feats: torch.Tensor, k: int, desc: str = "sampling") -> torch.Tensor:
        """``k`` samples of each conditioning (rows m*k .. m*k+k-1 use noises 0..k-1): [M * k, 3, S, S]."""
        conds = feats.repeat_interleave(k, dim=0)
        idx = torch.arange(k).repeat(len(feats))
        return self.sample(conds, idx, desc)
