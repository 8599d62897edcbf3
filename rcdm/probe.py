"""The factor probe: a small CNN trained on the ``shapes`` training split to predict each generative factor
from an image, used by the studies to measure which factors generated samples keep.

Categorical factors (kind, colour, background) are classified directly; continuous ones (size, x, y) are cut
into ``--bins`` equal-frequency bins of the training split (chance = 1 / bins), so every factor is a
classification whose accuracy reads the same way. ``rcdm study probe`` trains it once and saves it with
:func:`save_probe` (tensors and plain data only: loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcdm.io import atomic_path, safe_torch_load
from rcdm.study_images import to_unit

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
            x = _resize(x, self.image_size)
        h = self.features(x * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    def targets(self, factors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Class labels of recorded factor values, per factor of this probe."""
        missing = [s.name for s in self.specs if s.name not in factors]
        if missing:
            raise KeyError(f"factors {missing} are not recorded for these images")
        return {s.name: s.classes(factors[s.name]) for s in self.specs}


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The probe's own input resize (bicubic, antialiased when shrinking), range preserved."""
    lo, hi = float(x.min()), float(x.max())
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(lo, hi)


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
    n = len(images)
    if n < 2:
        raise ValueError(f"the probe needs training images, got {n}")
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if val_fraction > 0 else 0
    n_tr = n - n_val
    specs = make_specs({k: np.asarray(v)[:n_tr] for k, v in factors.items()}, factor_names, which, bins)
    torch.manual_seed(seed)
    probe = FactorProbe(specs, images.shape[1], width).to(device)
    x = to_unit(images)
    y = probe.targets(factors)
    _fit(probe, x[:n_tr], {k: v[:n_tr] for k, v in y.items()}, epochs, batch_size, lr, seed, device, progress)
    return probe, accuracy_report(probe, x, y, n_tr)


def _fit(
    probe: FactorProbe, x, y, epochs: int, batch_size: int, lr: float, seed: int, device, progress: bool
):
    """AdamW with a one-cycle schedule over ``epochs`` seeded shuffles of ``x`` (batches of 1 skipped)."""
    from tqdm import tqdm

    n_tr = len(x)
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
            loss = sum(F.cross_entropy(logits[s.name], y[s.name][idx].to(device)) for s in probe.specs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    probe.eval()


def accuracy_report(
    probe: FactorProbe, x: torch.Tensor, y: Mapping[str, torch.Tensor], n_tr: int
) -> list[dict]:
    """Per factor: classes, chance, majority share, accuracy on the first ``n_tr`` images and on the rest."""
    n_val = len(x) - n_tr
    pred = predict(probe, x)
    report = []
    for s in probe.specs:
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
    return report


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
