"""``rcdm pretrain``: a small self-supervised encoder for data with no published one (the demo's ``shapes``).

SimCLR (NT-Xent) or VICReg on a small ResNet (``rcdm.encoders.SmallResNet``), reading the ``images``
dataset of an images HDF5 file written by ``rcdm extract``. Augmentations are the standard SSL ones, batched
on tensors (one ``grid_sample`` for crop, resize, flip and rotation of a whole batch): random resized crop,
horizontal flip, optional rotation, colour jitter (brightness, contrast, saturation, hue), grayscale. The
defaults are SimCLR's (crops of 25-100 % of the area here: smaller ones often miss the object of a 32 px
image). They randomise factors ``shapes`` records other than the object's kind: crops move and rescale the
shape (position, size), flips mirror it, colour jitter and grayscale change its colour (``--rotation`` also
turns it). The objective asks the projector head to be invariant to them, as in the paper, and ``--probe``
measures with linear probes what trunk and head keep of each factor.

Training runs exactly ``--steps`` steps (seeded: the same settings give the same weights on any machine, up
to floating-point noise); ``--time-budget`` is only a safety cap: spent before the last step, the stage fails
(exit 4) with one line saying so, and writes nothing.

The checkpoint (``rcdm.encoders.load("small", path, layer)`` reads it; loadable with weights_only=True):
``{"format": "rcdm-small-encoder", "arch", "trunk", "head", "input_size", "input_norm": "none", "method",
"train": {...settings and results...}, "probe": {...}}``. A CSV log holds the loss of every step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcdm.device import resolve_device
from rcdm.encoders import SMALL_FORMAT, build_small
from rcdm.errors import InputFileError, reading
from rcdm.io import atomic_path, sha256_file

METHODS = ("simclr", "vicreg")
EXIT_TIME_BUDGET = 4  # --time-budget ran out before --steps


class TimeBudgetError(RuntimeError):
    """The ``--time-budget`` safety cap ran out before the planned steps were done."""


@dataclass
class Augment:
    """Strengths of the SSL augmentations (torchvision semantics)."""

    crop_scale: tuple[float, float] = (0.25, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5  # horizontal flip probability
    rotation: float = 0.0  # largest rotation, degrees (uniform in [-rotation, rotation]); 0: none
    jitter_p: float = 0.8  # probability of the colour jitter (brightness, contrast, saturation, hue)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # largest hue turn, as a fraction of a full turn (0.5: any hue)
    grayscale: float = 0.2


@dataclass
class TrainSettings:
    method: str = "simclr"
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 30
    temperature: float = 0.2
    input_size: int = 32
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks: int = 1
    stem_stride: int = 2
    head_dims: list[int] = field(default_factory=lambda: [256, 64])
    seed: int = 0
    time_budget: float | None = None  # safety cap in seconds: TimeBudgetError if spent before ``steps``
    augment: Augment = field(default_factory=Augment)


# ------------------------------------------------------------------------------------ augmentations


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def random_resized_crop_flip(x: torch.Tensor, size: int, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop (area ``crop_scale``, aspect ``crop_ratio``), flip and rotation (about
    the crop's centre, ``rotation`` degrees at most), at ``size``."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *aug.crop_scale, gen, dev)
    log_r = _uniform(n, math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), gen, dev)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - w)  # crop centre, normalised coordinates
    cy = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=gen, device=dev) < aug.flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    if aug.rotation > 0:  # output coordinates turned first: [[w f, 0], [0, h]] @ R(angle)
        angle = _uniform(n, -aug.rotation, aug.rotation, gen, dev) * (math.pi / 180)
        c, s = torch.cos(angle), torch.sin(angle)
        theta[:, 0, 0], theta[:, 0, 1] = w * flip * c, -w * flip * s
        theta[:, 1, 0], theta[:, 1, 1] = h * s, h * c
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_GRAY = (0.299, 0.587, 0.114)


def _gray(y: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    return (y * w).sum(dim=1, keepdim=True)


def _hue_matrices(angle: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] RGB->RGB hue rotations by ``angle`` radians (rotation about the gray axis in YIQ)."""
    rgb2yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=angle.device
    )
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3, device=angle.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return yiq2rgb @ rot @ rgb2yiq


def colour_jitter_gray(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (probability ``jitter_p``) then random grayscale, on [-1, 1] images [N, 3, H, W]."""
    n, dev = x.shape[0], x.device
    y = x * 0.5 + 0.5
    on = (torch.rand(n, generator=gen, device=dev) < aug.jitter_p).float().view(n, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, max(0.0, 1 - strength), 1 + strength, gen, dev).view(n, 1, 1, 1)
        return 1 + (f - 1) * on

    y = y * factor(aug.brightness)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * factor(aug.contrast) + mean
    g = _gray(y)
    y = (y - g) * factor(aug.saturation) + g
    if aug.hue > 0:
        angle = _uniform(n, -aug.hue, aug.hue, gen, dev) * 2 * math.pi * on.view(n)
        y = torch.einsum("nij,njhw->nihw", _hue_matrices(angle), y)
    y = y.clamp(0, 1)
    gray = (torch.rand(n, generator=gen, device=dev) < aug.grayscale).view(n, 1, 1, 1)
    y = torch.where(gray, _gray(y).expand_as(y), y)
    return y * 2 - 1


def two_views(x: torch.Tensor, size: int, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Two independent augmentations of each image, stacked: [2N, 3, size, size] (first N: view 1)."""
    xx = torch.cat([x, x])
    return colour_jitter_gray(random_resized_crop_flip(xx, size, aug, gen), aug, gen)


# ------------------------------------------------------------------------------------------- losses


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent on [2N, D] embeddings whose rows i and i+N are the two views of one image."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def vicreg_loss(z: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0) -> torch.Tensor:
    """VICReg: invariance (MSE) + variance hinge + covariance decorrelation, on [2N, D] paired views."""
    n = z.shape[0] // 2
    a, b = z[:n].float(), z[n:].float()
    inv = F.mse_loss(a, b)
    a, b = a - a.mean(0), b - b.mean(0)
    std_loss = sum(F.relu(1 - torch.sqrt(v.var(0) + 1e-4)).mean() for v in (a, b)) / 2
    d = a.shape[1]

    def off_diag_sq(v: torch.Tensor) -> torch.Tensor:
        c = v.T @ v / (n - 1)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d

    return sim * inv + std * std_loss + cov * (off_diag_sq(a) + off_diag_sq(b))


# ------------------------------------------------------------------------------------------- data


def read_images(path: str | Path, limit: int | None = None) -> np.ndarray:
    """The ``images`` dataset (uint8 [N, S, S, 3]) of an images HDF5 file, read into memory."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"images file not found: {path}")
    with h5py.File(path, "r") as h5:
        if "images" not in h5:
            raise KeyError(
                f"{path}: no 'images' dataset (found: {sorted(h5)}); expected an `rcdm extract` file"
            )
        ds = h5["images"]
        if ds.dtype != np.uint8 or ds.ndim != 4 or ds.shape[-1] != 3 or ds.shape[1] != ds.shape[2]:
            raise ValueError(f"{path}: 'images' must be uint8 [N, S, S, 3], got {ds.dtype} {ds.shape}")
        if ds.shape[0] == 0:
            raise ValueError(f"{path}: 'images' is empty")
        return ds[: limit or ds.shape[0]]


def read_factors(path: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """``factors/<name>`` datasets of an images file (empty dict when it records none)."""
    import h5py

    with h5py.File(path, "r") as h5:
        group = h5.get("factors")
        return {} if group is None else {k: group[k][: limit or None] for k in group}


def resize_to(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, size, size] in [-1, 1], resized as extraction resizes inputs."""
    from PIL import Image

    from rcdm.preprocess import center_crop_arr, to_model_range

    if images.shape[1] != size:
        images = np.stack([center_crop_arr(Image.fromarray(im), size) for im in images])
    return to_model_range(images)


# ------------------------------------------------------------------------------------------- training


def _lr_at(step: int, progress: float, s: TrainSettings) -> float:
    """Linear warmup over ``s.warmup`` steps, then cosine decay over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, s.warmup))
    return s.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    images: torch.Tensor, s: TrainSettings, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[nn.Module, nn.Module, list[tuple[float, float]]]:
    """Train trunk + projector on [-1, 1] images [N, 3, R, R] (R = ``s.input_size``).

    Runs exactly ``s.steps`` steps (warm-up, then cosine decay over them); raises TimeBudgetError when
    ``s.time_budget`` seconds run out first. Returns (lr, loss) of every step.
    """
    from tqdm import tqdm

    if s.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {s.method!r}")
    if images.shape[0] < 2:
        raise ValueError("self-supervised pretraining needs at least 2 images")
    torch.manual_seed(s.seed)
    dev = torch.device(device)
    trunk, head = build_small(_arch(s))
    trunk = trunk.to(dev, memory_format=torch.channels_last).train()  # faster convolutions on CPU and GPU
    head = head.to(dev).train()
    params = list(trunk.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(s.seed)
    data = images.to(dev)
    batch = min(s.batch_size, data.shape[0])
    losses: list[torch.Tensor] = []
    lrs: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(s.steps), desc=f"pretrain {s.method}", file=sys.stderr, disable=not progress)
    for step in bar:
        if s.time_budget and time.monotonic() - start > s.time_budget:
            bar.close()
            raise TimeBudgetError(
                f"the --time-budget safety cap ({s.time_budget:g} s) ran out at step {step} of the planned "
                f"{s.steps} (--steps); nothing written: raise the cap or lower the steps for this machine"
            )
        lrs.append(_lr_at(step, step / s.steps, s))
        for group in opt.param_groups:
            group["lr"] = lrs[-1]
        idx = torch.randint(data.shape[0], (batch,), generator=gen, device=dev)
        views = two_views(data[idx], s.input_size, s.augment, gen).contiguous(
            memory_format=torch.channels_last
        )
        z = head(trunk(views))
        loss = nt_xent(z, s.temperature) if s.method == "simclr" else vicreg_loss(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if step % 20 == 0 or step == s.steps - 1:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; lower --lr")
            bar.set_postfix(loss=f"{value:.4f}")
    bar.close()
    return trunk.eval(), head.eval(), list(zip(lrs, torch.stack(losses).cpu().tolist()))


def _arch(s: TrainSettings) -> dict:
    return {
        "widths": list(s.widths),
        "blocks": s.blocks,
        "stem_stride": s.stem_stride,
        "head_dims": list(s.head_dims),
    }


@torch.inference_mode()
def embed(
    trunk: nn.Module, head: nn.Module, images: torch.Tensor, batch: int = 512
) -> dict[str, torch.Tensor]:
    """Trunk and head features (eval mode) of [-1, 1] images, in batches."""
    dev = next(trunk.parameters()).device
    outs = {"trunk": [], "head": []}
    for i in range(0, images.shape[0], batch):
        h = trunk(images[i : i + batch].to(dev))
        outs["trunk"].append(h.cpu())
        outs["head"].append(head(h).cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


# ------------------------------------------------------------------------------------------ probing

CATEGORICAL_FACTORS = ("kind", "colour", "background", "count")
CONTINUOUS_FACTORS = ("size", "x", "y")


def _ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression with standardised inputs; returns (mean, std, weights incl. bias)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = torch.cat([(x - mu) / sd, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    reg = alpha * x.shape[0] * torch.eye(xs.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    w = torch.linalg.solve(xs.T @ xs + reg, xs.T @ y)
    return mu, sd, w


def linear_probe(
    train_x: torch.Tensor,
    train_f: dict[str, np.ndarray],
    val_x: torch.Tensor,
    val_f: dict[str, np.ndarray],
    alpha: float = 1e-3,
) -> dict[str, float]:
    """Linear decodability of each factor from features: accuracy (categorical) or R^2 (continuous), on val.

    Ridge regression fit on train (one-hot targets for categorical factors, argmax to classify).
    """
    train_x, val_x = train_x.double(), val_x.double()
    out: dict[str, float] = {}
    for name in CATEGORICAL_FACTORS + CONTINUOUS_FACTORS:
        if name not in train_f or name not in val_f:
            continue
        yt = torch.as_tensor(np.asarray(train_f[name]))
        yv = torch.as_tensor(np.asarray(val_f[name]))
        for y, x in ((yt, train_x), (yv, val_x)):
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"factor {name!r} has {y.shape[0]} values for {x.shape[0]} feature rows")
        if name in CATEGORICAL_FACTORS:
            classes = torch.unique(yt)
            target = (yt[:, None] == classes[None]).double()
        else:
            target = yt.double()[:, None]
        mu, sd, w = _ridge(train_x, target, alpha)
        pred = torch.cat([(val_x - mu) / sd, torch.ones(val_x.shape[0], 1, dtype=val_x.dtype)], 1) @ w
        if name in CATEGORICAL_FACTORS:
            out[f"{name}_acc"] = float((classes[pred.argmax(1)] == yv).double().mean())
        else:
            resid = ((pred[:, 0] - yv.double()) ** 2).sum()
            out[f"{name}_r2"] = float(1 - resid / ((yv.double() - yv.double().mean()) ** 2).sum())
    return out


# ------------------------------------------------------------------------------------------ stage


def save_checkpoint(path: Path, trunk: nn.Module, head: nn.Module, s: TrainSettings, extra: dict) -> None:
    """Write the ``small`` checkpoint atomically (plain Python types and tensors only)."""
    train_info = asdict(s) | extra
    train_info["augment"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in train_info["augment"].items()
    }
    ckpt = {
        "format": SMALL_FORMAT,
        "arch": _arch(s),
        "trunk": {k: v.detach().cpu() for k, v in trunk.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "input_size": s.input_size,
        "input_norm": "none",
        "method": s.method,
        "train": {k: v for k, v in train_info.items() if k != "probe"},
        "probe": extra.get("probe", {}),
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def write_log(path: Path, history: list[tuple[float, float]]) -> None:
    """CSV of every step: step, lr, loss."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss"])
        for step, (lr, loss) in enumerate(history):
            w.writerow([step, f"{lr:.6g}", f"{loss:.6f}"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainSettings()
    parser.add_argument("--images", type=Path, required=True, help="images HDF5 file from `rcdm extract`")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--log", type=Path, help="CSV loss log (default: OUT with suffix .csv)")
    parser.add_argument("--method", choices=METHODS, default=d.method)
    parser.add_argument("--steps", type=int, default=d.steps, help="number of steps")
    parser.add_argument(
        "--time-budget", type=float, help="safety cap: fail (exit 4) if SECONDS pass before --steps are done"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--input-size", type=int, default=d.input_size, help="encoder input resolution")
    parser.add_argument("--widths", type=int, nargs="+", default=d.widths, help="channels of each stage")
    parser.add_argument("--blocks", type=int, default=d.blocks, help="basic blocks per stage")
    parser.add_argument("--stem-stride", type=int, default=d.stem_stride, help="stride of the first conv")
    parser.add_argument("--head-dims", type=int, nargs="+", default=d.head_dims, help="projector widths")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    a = d.augment
    parser.add_argument(
        "--crop-scale", type=float, nargs=2, default=a.crop_scale, help="random resized crop: area range"
    )
    parser.add_argument("--flip", type=float, default=a.flip, help="horizontal flip probability")
    parser.add_argument("--rotation", type=float, default=a.rotation, help="largest rotation (degrees)")
    parser.add_argument("--jitter-p", type=float, default=a.jitter_p, help="colour jitter probability")
    parser.add_argument("--brightness", type=float, default=a.brightness, help="brightness jitter strength")
    parser.add_argument("--contrast", type=float, default=a.contrast, help="contrast jitter strength")
    parser.add_argument("--saturation", type=float, default=a.saturation, help="saturation jitter strength")
    parser.add_argument("--hue", type=float, default=a.hue, help="largest hue turn (fraction of a turn)")
    parser.add_argument("--grayscale", type=float, default=a.grayscale, help="grayscale probability")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--limit", type=int, help="use only the first LIMIT images")
    parser.add_argument(
        "--probe", type=Path, help="validation images file with factors: report linear probes"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--force", action="store_true", help="retrain even if OUT exists")


def run(args: argparse.Namespace) -> int:
    log_path = args.log or args.out.with_suffix(".csv")
    if args.out.is_file() and not args.force:
        print(f"{args.out} exists; skipping (use --force to retrain)", file=sys.stderr)
        return 0
    aug = Augment(
        crop_scale=tuple(args.crop_scale), flip=args.flip, rotation=args.rotation, jitter_p=args.jitter_p,
        brightness=args.brightness, contrast=args.contrast, saturation=args.saturation, hue=args.hue,
        grayscale=args.grayscale,
    )  # fmt: skip
    s = TrainSettings(
        method=args.method,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        input_size=args.input_size,
        widths=list(args.widths),
        blocks=args.blocks,
        stem_stride=args.stem_stride,
        head_dims=list(args.head_dims),
        seed=args.seed,
        time_budget=args.time_budget,
        augment=aug,
    )
    device = resolve_device(args.device)
    with reading(args.images):
        images = read_images(args.images, args.limit)
    images = resize_to(images, s.input_size)
    if args.probe:  # its files are checked now, not after training
        _check_probe_inputs(args.images, args.probe)
    start = time.time()
    try:
        trunk, head, history = train(images, s, device)
    except TimeBudgetError as err:
        print(f"rcdm pretrain: error: {err}", file=sys.stderr)
        return EXIT_TIME_BUDGET
    losses = [loss for _, loss in history]
    extra: dict = {
        "steps_done": len(history),
        "images_file": str(args.images),
        "images_sha256": sha256_file(args.images),
        "num_images": int(images.shape[0]),
        "seconds": round(time.time() - start, 1),
        "final_loss": float(np.mean(losses[-20:])),
    }
    if args.probe:
        extra["probe"] = probe_files(trunk, head, args.images, args.probe, s.input_size, args.limit)
        print(json.dumps(extra["probe"], indent=1), file=sys.stderr)
    write_log(log_path, history)
    save_checkpoint(args.out, trunk, head, s, extra)
    print(
        f"wrote {args.out} ({s.method}, {len(history)} steps, final loss {extra['final_loss']:.4f})",
        file=sys.stderr,
    )
    return 0


def _check_probe_inputs(train_file: Path, val_file: Path) -> None:
    """Both files of ``--probe`` readable, with images and factors; else an InputFileError naming one."""
    for path in (train_file, val_file):
        with reading(path):
            read_images(path, 1)
            factors = read_factors(path, 1)
        if not factors:
            raise InputFileError(
                path, "records no factors (--probe needs `shapes` images files)", "leave out --probe"
            )


def probe_files(
    trunk: nn.Module, head: nn.Module, train_file: Path, val_file: Path, size: int, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """Linear probes of trunk and head features, fit on ``train_file``'s factors, scored on ``val_file``."""
    train_f, val_f = read_factors(train_file, limit), read_factors(val_file)
    if not train_f or not val_f:
        raise ValueError(f"--probe needs factors in both {train_file} and {val_file} (a `shapes` dataset)")
    tr = embed(trunk, head, resize_to(read_images(train_file, limit), size))
    va = embed(trunk, head, resize_to(read_images(val_file), size))
    return {layer: linear_probe(tr[layer], train_f, va[layer], val_f) for layer in ("trunk", "head")}
