"""The factor probe: a small CNN trained on the ``shapes`` training split to predict each generative factor
from an image, used by the studies to measure which factors generated samples keep.

Categorical factors (kind, colour, background) are classified directly; continuous ones (size, x, y) are cut
into ``--bins`` equal-frequency bins of the training split (chance = 1 / bins), so every factor is a
classification whose accuracy reads the same way. ``rcdm study probe`` trains it once and writes ``probe.pt``
(tensors and plain data only: loadable with ``torch.load(weights_only=True)``), ``probe.csv`` (per factor:
classes, chance, train and held-out accuracy) and ``probe.png`` (accuracy vs chance).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcdm.io import atomic_path, safe_torch_load
from rcdm.stages.study import common

NAME = "probe"
FORMAT = "rcdm-factor-probe"
DEFAULT_FACTORS = ("kind", "colour", "size", "x", "y")


@dataclass
class FactorSpec:
    """How one factor becomes class labels: categorical values as they are, or binned by ``edges``."""

    name: str
    num_classes: int
    edges: list[float] | None = None  # inner bin edges of a continuous factor
    names: list[str] | None = None  # category names of a categorical factor

    def classes(self, values: np.ndarray | torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(np.asarray(values))
        if self.edges is None:
            c = v.long()
            if len(c) and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
                raise ValueError(f"factor {self.name!r} has values outside [0, {self.num_classes})")
            return c
        return torch.bucketize(v.double(), torch.tensor(self.edges, dtype=torch.float64), right=True)


def make_specs(
    factors: Mapping[str, np.ndarray],
    factor_names: Mapping[str, list[str] | None],
    which: Sequence[str] = DEFAULT_FACTORS,
    bins: int = 3,
) -> list[FactorSpec]:
    """Specs for the factors ``which`` from training values: categorical when ``factor_names`` lists names."""
    specs = []
    for name in which:
        if name not in factors:
            raise KeyError(f"factor {name!r} not recorded (have: {', '.join(factors) or 'none'})")
        values = np.asarray(factors[name])
        cats = factor_names.get(name)
        if cats:
            specs.append(FactorSpec(name, len(cats), None, list(cats)))
        else:
            edges = np.unique(np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
            specs.append(FactorSpec(name, len(edges) + 1, [float(e) for e in edges]))
    return specs


class FactorProbe(nn.Module):
    """Conv net with one classification head per factor: [N, 3, S, S] in [0, 1] -> {factor: logits}."""

    def __init__(self, specs: Sequence[FactorSpec], image_size: int, width: int = 32) -> None:
        super().__init__()
        self.specs = list(specs)
        self.image_size = int(image_size)
        self.width = int(width)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),  # keeps a coarse layout: position is a factor
            nn.Flatten(),
            nn.Linear(2 * w * 16, 128),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({s.name: nn.Linear(128, s.num_classes) for s in self.specs})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = common.resize(x, self.image_size)
        h = self.features(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    def targets(self, factors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Class labels of recorded factor values, per factor of this probe."""
        missing = [s.name for s in self.specs if s.name not in factors]
        if missing:
            raise KeyError(f"factors {missing} are not recorded for these images")
        return {s.name: s.classes(factors[s.name]) for s in self.specs}


@torch.inference_mode()
def predict(probe: FactorProbe, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Predicted class per factor for images [N, 3, H, W] in [0, 1] (CPU int64 tensors)."""
    device = next(probe.parameters()).device
    out: dict[str, list[torch.Tensor]] = {s.name: [] for s in probe.specs}
    for i in range(0, len(x), batch_size):
        logits = probe(x[i : i + batch_size].to(device))
        for name, v in logits.items():
            out[name].append(v.argmax(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def keep_fractions(probe: FactorProbe, samples: torch.Tensor, factors: Mapping[str, np.ndarray]) -> dict:
    """For samples [N, M, 3, S, S] in [0, 1] of N images with recorded ``factors`` ([N] each): per factor a
    bool tensor [N, M], True where the probe's prediction equals the image's true class."""
    n, m = samples.shape[:2]
    pred = predict(probe, samples.flatten(0, 1))
    truth = probe.targets(factors)
    return {name: pred[name].view(n, m) == truth[name].view(n, 1) for name in pred}


def agreement(probe: FactorProbe, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per factor, bool [N]: the probe predicts the same class for ``a[i]`` and ``b[i]`` (images in [0, 1])"""
    pa, pb = predict(probe, a), predict(probe, b)
    return {name: pa[name] == pb[name] for name in pa}


def train_probe(
    images: np.ndarray,
    factors: Mapping[str, np.ndarray],
    factor_names: Mapping[str, list[str] | None],
    *,
    which: Sequence[str] = DEFAULT_FACTORS,
    bins: int = 3,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[FactorProbe, list[dict]]:
    """Train a probe on uint8 images [N, S, S, 3] and their factors; returns (eval-mode probe, report rows).

    Bins and training use the first ``1 - val_fraction`` of the images; accuracy is reported on both parts.
    """
    from tqdm import tqdm

    n = len(images)
    if n < 2:
        raise ValueError(f"the probe needs training images, got {n}")
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if val_fraction > 0 else 0
    n_tr = n - n_val
    specs = make_specs({k: np.asarray(v)[:n_tr] for k, v in factors.items()}, factor_names, which, bins)
    torch.manual_seed(seed)
    probe = FactorProbe(specs, images.shape[1], width).to(device)
    x = common.to_unit(images)
    y = probe.targets(factors)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-n_tr // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="training probe", disable=not progress, file=sys.stderr)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(n_tr, generator=gen)
        for i in range(0, n_tr, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            xb = x[idx].to(device)
            logits = probe(xb)
            loss = sum(F.cross_entropy(logits[s.name], y[s.name][idx].to(device)) for s in specs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    probe.eval()
    pred = predict(probe, x)
    report = []
    for s in specs:
        hit = (pred[s.name] == y[s.name]).float()
        counts = torch.bincount(y[s.name][:n_tr], minlength=s.num_classes).double()
        report.append(
            {
                "factor": s.name,
                "classes": s.num_classes,
                "chance": 1.0 / s.num_classes,
                "majority": float(counts.max() / counts.sum()),
                "train_accuracy": float(hit[:n_tr].mean()),
                "val_accuracy": float(hit[n_tr:].mean()) if n_val else float("nan"),
                "n_train": n_tr,
                "n_val": n_val,
            }
        )
    return probe, report


def save_probe(probe: FactorProbe, path: str | Path, report: list[dict] | None = None) -> None:
    payload = {
        "format": FORMAT,
        "image_size": probe.image_size,
        "width": probe.width,
        "specs": [asdict(s) for s in probe.specs],
        "state_dict": {k: v.detach().cpu() for k, v in probe.state_dict().items()},
        "report": report or [],
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_probe(path: str | Path, device: torch.device | str = "cpu") -> FactorProbe:
    """Load a probe written by :func:`save_probe` (weights-only)."""
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a factor probe (format {FORMAT!r}); train one with `rcdm study probe`"
        )
    specs = [FactorSpec(**s) for s in payload["specs"]]
    probe = FactorProbe(specs, payload["image_size"], payload["width"])
    probe.load_state_dict(payload["state_dict"], strict=True)
    return probe.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training data")
    g.add_argument(
        "--images", default=None, help="images HDF5 file of the shapes training split (with factors)"
    )
    g.add_argument("--dataset", default=None, help="instead: generate this dataset (shapes)")
    g.add_argument("--split", default="train")
    g.add_argument("--num-images", type=int, default=4000, help="training images (first N)")
    g.add_argument("--image-size", type=int, default=32, help="image size when generating --dataset")
    g = parser.add_argument_group("probe")
    g.add_argument("--factors", default=",".join(DEFAULT_FACTORS), help="factors to predict")
    g.add_argument("--bins", type=int, default=3, help="bins of continuous factors")
    g.add_argument("--epochs", type=int, default=6)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--width", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (probe.pt, probe.csv, probe.png)")
    g.add_argument("--force", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def _training_data(args: argparse.Namespace) -> tuple[np.ndarray, dict, dict]:
    if args.images:
        import h5py

        path = Path(args.images)
        if not path.is_file():
            raise FileNotFoundError(f"images file not found: {path}")
        with h5py.File(path, "r") as f:
            if "images" not in f:
                raise KeyError(f"{path} has no 'images' dataset")
            n = min(args.num_images, f["images"].shape[0])
            images = f["images"][:n]
            factors, names = common.read_factors(f, list(range(n))) if "factors" in f else ({}, {})
        if not factors:
            raise KeyError(
                f"{path} records no generative factors (a 'factors' group): use the shapes dataset"
            )
        return images, factors, names
    if args.dataset:
        from rcdm.data import open_dataset
        from rcdm.preprocess import center_crop_arr

        source = open_dataset(
            args.dataset, split=args.split, num_images=args.num_images, native_size=args.image_size
        )
        if not common.factor_names_of(source):
            raise ValueError(f"dataset {args.dataset!r} records no generative factors")
        images = np.stack([center_crop_arr(source.load(i), args.image_size) for i in range(len(source))])
        factors: dict[str, list] = {}
        for i in range(len(source)):
            for k, v in source.factors(i).items():
                factors.setdefault(k, []).append(v)
        return images, {k: np.asarray(v) for k, v in factors.items()}, common.factor_names_of(source)
    raise ValueError("give the probe's training images: --images TRAIN.h5 or --dataset shapes")


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list[Path]:
    images, factors, names = _training_data(args)
    which = [f.strip() for f in args.factors.split(",") if f.strip()]
    probe, report = train_probe(
        images,
        factors,
        names,
        which=which,
        bins=args.bins,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        seed=args.seed,
        device=common.pick_device(args.device),
        progress=not args.no_progress,
    )
    weights = out.dir / "probe.pt"
    save_probe(probe, weights, report)
    out.save_csv(report)
    out.save_png(_accuracy_chart(report))
    return [weights]


def _accuracy_chart(report: list[dict]):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [r["factor"] for r in report]
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3), dpi=100)
    ax.bar(pos - 0.2, [r["train_accuracy"] for r in report], 0.4, label="train")
    ax.bar(pos + 0.2, [r["val_accuracy"] for r in report], 0.4, label="held out")
    ax.scatter(pos, [r["chance"] for r in report], color="black", marker="_", s=400, label="chance", zorder=3)
    ax.set_xticks(pos, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Factor probe")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
