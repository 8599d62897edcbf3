"""The factor probe: measures the generative factors of the primary shape of a ``shapes`` image (real or
generated), so that the studies can count which factors samples keep of their conditioning image.

Colour, size and position are measured from pixels, the same way on real images and on samples:

1. background: the per-channel median of the border pixels;
2. foreground: the pixels nearer to a palette colour (:data:`rcdm.shapes.COLOURS`) than to the background,
   each labelled with its nearest palette colour;
3. the primary shape: the largest 8-connected region of one label (``shapes`` draws it last, unoccluded and
   larger than any distractor); its colour is the mean of the quarter of its pixels farthest from the
   background;
4. its coverage: in the region grown by one pixel, each pixel's projection on the line from the background
   to the shape's colour, clipped to [0, 1] (antialiased edges count by the fraction they cover).

- ``colour``: the palette colour ``p`` whose segment ``bg + t (p - bg)``, ``t`` in [0.5, 1], passes nearest
  to the shape's colour (a blurred small shape mixes its colour with the background's);
- ``size``: the equivalent diameter ``2 sqrt(area / pi)`` as a fraction of the image side (a shape's true
  value: its circumscribed diameter, the recorded ``size``, times ``sqrt(polygon area / circle area)``);
- ``position``: the coverage-weighted centre (``x``, ``y`` as fractions of the side).

``kind`` needs a classifier: a small CNN on the shape's silhouette (its coverage cropped around its centre,
:data:`CROP` equivalent diameters wide, resampled to ``R x R``), trained on the training split's silhouettes
with random rotations, mirroring, scaling, shifts, blur and noise, so blurred samples are read like images.

A sample keeps a factor of its conditioning image when: ``kind``, ``colour``: the same class; ``size``: the
measured equivalent diameter lies within ``size_tol`` (relative) of the image's true one; ``position``: the
measured centre lies within ``position_tol`` (fraction of the side) of the true centre. The probe's accuracy
(:func:`accuracy_report`) is the fraction of *real* images whose measurement keeps their recorded factors by
the same rule; ``rcdm study probe`` reports it on the validation split, and the studies write it beside
every keep-rate. ``forward`` is differentiable in the image (the discrete choices held fixed): ``kind`` and
``colour`` logits, so the probe also serves as a classifier that can be attacked (``rcdm.classifiers``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from rcdm.io import atomic_path, safe_torch_load
from rcdm.study_images import to_unit

FORMAT = "rcdm-factor-probe-v2"
FACTORS = ("kind", "colour", "size", "position")
CROP = 2.0  # silhouette crop side, in equivalent diameters (a star's circumscribed circle: 1.55)
SIZE_TOL = 0.15  # relative
POSITION_TOL = 0.1  # fraction of the image side
ROBUSTNESS_BLUR = 0.5  # px: accuracy_report's blurred copy of the validation images
MIN_COVER = 0.5  # colour: the shape's colour is at least half the palette colour, half the background
BLUR, GAIN, NOISE = (0.35, 0.7), 0.2, 0.03  # silhouette augmentations (augment_silhouettes)


@dataclass
class FactorSpec:
    """One reported factor: a class (``names``) or a measurement kept within ``tolerance``."""

    name: str
    rule: str  # how "keeps" is decided, in words
    names: list[str] | None = None  # class names (kind, colour)
    tolerance: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names) if self.names else 0


def unit_areas(kinds: Sequence[str]) -> list[float]:
    """Area of each ``shapes`` kind with circumradius 1 (circle: pi; polygons: shoelace formula)."""
    from rcdm.shapes import _OUTLINES

    out = []
    for k in kinds:
        if k == "circle":
            out.append(math.pi)
            continue
        if k not in _OUTLINES:
            raise KeyError(f"unknown shapes kind {k!r}: the probe knows {', '.join(['circle', *_OUTLINES])}")
        p = np.asarray(_OUTLINES[k], dtype=np.float64)
        out.append(
            0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))
        )
    return out


def make_specs(
    kinds: Sequence[str],
    colours: Sequence[str],
    size_tol: float = SIZE_TOL,
    position_tol: float = POSITION_TOL,
) -> list[FactorSpec]:
    return [
        FactorSpec("kind", "same kind (silhouette classifier)", list(kinds)),
        FactorSpec("colour", "same palette colour (nearest to the shape's colour)", list(colours)),
        FactorSpec("size", f"equivalent diameter within {size_tol:.0%} (relative)", None, size_tol),
        FactorSpec("position", f"centre within {position_tol:g} of the side", None, position_tol),
    ]


class FactorProbe(nn.Module):
    """Pixel measurements + a silhouette classifier for ``kind``: images [N, 3, H, W] in [0, 1], any size."""

    def __init__(
        self,
        specs: Sequence[FactorSpec],
        palette: Sequence[Sequence[float]],
        image_size: int,
        width: int = 16,
        resolution: int = 16,
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        by_name = {s.name: s for s in self.specs}
        if set(by_name) != set(FACTORS):
            raise ValueError(f"a factor probe reports {', '.join(FACTORS)}, got {', '.join(by_name)}")
        self.kinds = list(by_name["kind"].names or [])
        self.size_tol = float(by_name["size"].tolerance)
        self.position_tol = float(by_name["position"].tolerance)
        self.register_buffer("palette", torch.as_tensor(palette, dtype=torch.float32).view(-1, 3))
        self.register_buffer("unit_area", torch.tensor(unit_areas(self.kinds), dtype=torch.float32))
        self.image_size, self.width, self.resolution = int(image_size), int(width), int(resolution)
        if self.resolution % 4:
            raise ValueError(f"the silhouette resolution must be a multiple of 4, got {resolution}")
        w, r = self.width, self.resolution
        self.kind_net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
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
            nn.Flatten(),
            nn.Linear(2 * w * (r // 4) ** 2, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, len(self.kinds)),
        )
        self.report: list[dict] = []

    @property
    def factors(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def accuracy(self) -> dict[str, float]:
        """Accuracy of each factor on real validation images (NaN when not measured)."""
        got = {r["factor"]: float(r.get("val_accuracy", float("nan"))) for r in self.report}
        return {f: got.get(f, float("nan")) for f in self.factors}

    def locate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Steps 1-4 of the module docstring on images [N, 3, H, W] in [0, 1] (differentiable in ``x``, the
        discrete choices held fixed): ``found`` [N] bool, ``background``, ``colour_rgb`` [N, 3], ``alpha``
        [N, H, W] (coverage), ``x``, ``y``, ``size`` [N] (fractions of the side; 0 where nothing is found)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the factor probe takes images [N, 3, H, W], got {tuple(x.shape)}")
        n, _, h, w = x.shape
        x = x.float()
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
        bg = border.median(dim=2).values  # [N, 3]
        region, core = _regions(
            x.detach().cpu().numpy(), bg.detach().cpu().numpy(), self.palette.cpu().numpy()
        )
        region, core = torch.from_numpy(region).to(x.device), torch.from_numpy(core).to(x.device)
        found = core.flatten(1).any(1)
        cm = core.unsqueeze(1).float()
        fg = (x * cm).sum((2, 3)) / cm.sum((2, 3)).clamp_min(1)  # [N, 3]
        v = fg - bg
        proj = ((x - bg[:, :, None, None]) * v[:, :, None, None]).sum(1) / (v * v).sum(1).clamp_min(1e-6)[
            :, None, None
        ]
        alpha = proj.clamp(0, 1) * region
        area = alpha.sum((1, 2))
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        safe = area.clamp_min(1e-6)
        cx = (alpha * xs[None, None, :]).sum((1, 2)) / safe
        cy = (alpha * ys[None, :, None]).sum((1, 2)) / safe
        size = 2 * torch.sqrt(area / (math.pi * h * w))
        zero = torch.zeros_like(size)
        return {
            "found": found,
            "background": bg,
            "colour_rgb": fg,
            "alpha": alpha,
            "x": torch.where(found, cx, zero),
            "y": torch.where(found, cy, zero),
            "size": torch.where(found, size, zero),
        }

    def silhouettes(self, loc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The shapes' coverage cropped around their centres, :data:`CROP` equivalent diameters wide:
        [N, 1, R, R] (blank where nothing was found)."""
        alpha = loc["alpha"].unsqueeze(1)
        n = alpha.shape[0]
        scale = CROP * loc["size"].clamp_min(1e-3)  # crop side in image sides = half side in [-1, 1] units
        theta = torch.zeros(n, 2, 3, device=alpha.device, dtype=alpha.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = scale, scale
        theta[:, 0, 2], theta[:, 1, 2] = 2 * loc["x"] - 1, 2 * loc["y"] - 1
        grid = F.affine_grid(theta, [n, 1, self.resolution, self.resolution], align_corners=False)
        return F.grid_sample(alpha, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the class factors: ``kind`` (silhouette CNN) and ``colour`` (minus the squared distance
        of the shape's colour to each palette colour, in 1/255 units)."""
        loc = self.locate(x)
        return self._logits(loc)

    def _logits(self, loc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind = self.kind_net(self.silhouettes(loc) * 2 - 1)
        # distance to the segment from "half covering the background" to "the palette colour": a blurred small
        # shape (its colour partly mixed with the background) keeps its hue
        bg, fg = loc["background"][:, None, :], loc["colour_rgb"][:, None, :]
        v = self.palette[None] - bg
        t = (((fg - bg) * v).sum(-1) / (v * v).sum(-1).clamp_min(1e-6)).clamp(MIN_COVER, 1.0)
        d2 = ((fg - bg - t[..., None] * v) ** 2).sum(-1)
        return {"kind": kind, "colour": -d2 * 255.0}

    @torch.inference_mode()
    def measure(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Measured factors of images [N, 3, H, W] in [0, 1] (CPU): ``kind``, ``colour`` (int64, -1 where no
        shape is found), ``size``, ``x``, ``y`` (float32), ``found`` (bool)."""
        device = next(self.parameters()).device
        keys = ("kind", "colour", "size", "x", "y", "found")
        out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in range(0, len(x), batch_size):
            loc = self.locate(x[i : i + batch_size].to(device))
            logits = self._logits(loc)
            found = loc["found"]
            for name in ("kind", "colour"):
                out[name].append(torch.where(found, logits[name].argmax(1), -1).cpu())
            for name in ("size", "x", "y", "found"):
                out[name].append(loc[name].cpu())
        if not out["found"]:
            return {k: torch.empty(0) for k in keys}
        return {k: torch.cat(v) for k, v in out.items()}

    def truth(self, factors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """What a perfect measurement gives for images with recorded ``shapes`` factors (``kind``, ``colour``,
        ``size`` = circumscribed diameter, ``x``, ``y``), in :meth:`measure`'s units."""
        missing = [k for k in ("kind", "colour", "size", "x", "y") if k not in factors]
        if missing:
            raise KeyError(
                f"factors {missing} are not recorded for these images (a shapes images file has them)"
            )
        kind = torch.as_tensor(np.asarray(factors["kind"]), dtype=torch.long)
        if len(kind) and (int(kind.min()) < 0 or int(kind.max()) >= len(self.kinds)):
            raise ValueError(f"recorded kinds outside [0, {len(self.kinds)})")
        circ = torch.as_tensor(np.asarray(factors["size"]), dtype=torch.float32)
        return {
            "kind": kind,
            "colour": torch.as_tensor(np.asarray(factors["colour"]), dtype=torch.long),
            "size": circ * torch.sqrt(self.unit_area.cpu()[kind] / math.pi),
            "x": torch.as_tensor(np.asarray(factors["x"]), dtype=torch.float32),
            "y": torch.as_tensor(np.asarray(factors["y"]), dtype=torch.float32),
            "found": torch.ones(len(kind), dtype=torch.bool),
        }

    def matches(
        self, got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per factor, bool (broadcast shapes): ``got`` keeps ``ref``'s factor by the probe's rules; nothing
        found keeps nothing."""
        ok = got["found"] & ref["found"]
        rel = (got["size"] / ref["size"].clamp_min(1e-6) - 1).abs()
        dist = torch.hypot(got["x"] - ref["x"], got["y"] - ref["y"])
        return {
            "kind": ok & (got["kind"] == ref["kind"]),
            "colour": ok & (got["colour"] == ref["colour"]),
            "size": ok & (rel <= self.size_tol),
            "position": ok & (dist <= self.position_tol),
        }


def _regions(x: np.ndarray, bg: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The discrete steps 2-3 per image: (region [N, H, W] bool: the primary shape grown by one pixel,
    core [N, H, W] bool: the quarter of its pixels farthest from the background)."""
    n, _, h, w = x.shape
    region = np.zeros((n, h, w), bool)
    core = np.zeros((n, h, w), bool)
    eight = np.ones((3, 3), bool)
    for i in range(n):
        img = x[i].transpose(1, 2, 0)
        d_pal = ((img[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
        label = d_pal.argmin(-1)
        d_bg = ((img - bg[i]) ** 2).sum(-1)
        fg = d_bg > d_pal.min(-1)
        best, comp = 0, None
        for c in np.unique(label[fg]):
            cc, _ = ndimage.label(fg & (label == c), structure=eight)
            counts = np.bincount(cc.ravel())
            counts[0] = 0
            j = int(counts.argmax())
            if counts[j] > best:
                best, comp = int(counts[j]), cc == j
        if comp is None:
            continue
        region[i] = ndimage.binary_dilation(comp)
        d = np.where(comp, d_bg, -1.0).ravel()
        top = np.argsort(-d, kind="stable")[: max(1, best // 4)]
        np.put(core[i], top, True)
    return region, core


# --------------------------------------------------------------------------------------------- keeping


def keep_fractions(probe: FactorProbe, samples: torch.Tensor, factors: Mapping[str, np.ndarray]) -> dict:
    """For samples [N, M, 3, S, S] in [0, 1] of N images with recorded ``factors`` ([N] each): per factor a
    bool tensor [N, M], True where the sample keeps the image's factor."""
    n, m = samples.shape[:2]
    got = {k: v.view(n, m) for k, v in probe.measure(samples.flatten(0, 1)).items()}
    ref = {k: v.view(n, 1) for k, v in probe.truth(factors).items()}
    return probe.matches(got, ref)


def agreement(probe: FactorProbe, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per factor, bool [N]: image ``b[i]`` keeps the factor measured on ``a[i]`` (images in [0, 1])."""
    return probe.matches(probe.measure(b), probe.measure(a))


def chance_rates(probe: FactorProbe, factors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per factor, the fraction of ordered pairs of different images whose true factors match by the probe's
    rules: the keep-rate of samples that ignore their conditioning but look like a random real image."""
    t = probe.truth(factors)
    n = len(t["kind"])
    if n < 2:
        return {f: float("nan") for f in probe.factors}
    a = {k: v[:, None] for k, v in t.items()}
    b = {k: v[None, :] for k, v in t.items()}
    off = ~torch.eye(n, dtype=torch.bool)
    return {f: float(m[off].float().mean()) for f, m in probe.matches(b, a).items()}


def accuracy_report(
    probe: FactorProbe,
    images: np.ndarray,
    factors: Mapping[str, np.ndarray],
    *,
    train_images: np.ndarray | None = None,
    train_factors: Mapping[str, np.ndarray] | None = None,
    source: str = "",
) -> list[dict]:
    """Per factor: its rule, chance (:func:`chance_rates` on ``images``) and the fraction of the real
    ``images`` (uint8 [N, S, S, 3]) whose measurement keeps their recorded factors (``val_accuracy``); the
    same on those images blurred by a Gaussian of :data:`ROBUSTNESS_BLUR` px (``val_accuracy_blurred``: how
    the probe reads soft-edged samples) and on the training images when given."""
    import torchvision.transforms.v2.functional as TF

    def acc(x: torch.Tensor, fac) -> dict[str, float]:
        hit = probe.matches(probe.measure(x), probe.truth(fac))
        return {k: float(v.float().mean()) for k, v in hit.items()}

    x = to_unit(images)
    val = acc(x, factors)
    r = math.ceil(3 * ROBUSTNESS_BLUR)
    blurred = acc(TF.gaussian_blur(x, [2 * r + 1] * 2, [ROBUSTNESS_BLUR] * 2), factors)
    tr = acc(to_unit(train_images), train_factors) if train_images is not None else {}
    chance = chance_rates(probe, factors)
    return [
        {
            "factor": s.name,
            "rule": s.rule,
            "classes": s.num_classes or "",
            "chance": chance[s.name],
            "train_accuracy": tr.get(s.name, float("nan")),
            "val_accuracy": val[s.name],
            "val_accuracy_blurred": blurred[s.name],
            "n_train": 0 if train_images is None else len(train_images),
            "n_val": len(images),
            "image_size": int(images.shape[1]),
            "val_images": source,
        }
        for s in probe.specs
    ]


# -------------------------------------------------------------------------------------------- training


def train_probe(
    images: np.ndarray,
    factors: Mapping[str, np.ndarray],
    factor_names: Mapping[str, list[str] | None],
    *,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
    resolution: int = 16,
    size_tol: float = SIZE_TOL,
    position_tol: float = POSITION_TOL,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FactorProbe:
    """A probe whose ``kind`` classifier is trained on the silhouettes of uint8 images [N, S, S, 3] of the
    ``shapes`` dataset (``factor_names``: their category names); returned in eval mode."""
    from rcdm.shapes import COLOURS

    kinds, colours = factor_names.get("kind"), factor_names.get("colour")
    if not kinds or not colours:
        raise KeyError("the factor probe needs the shapes factors 'kind' and 'colour' with their names")
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise KeyError(f"colours {unknown} are not in the shapes palette ({', '.join(COLOURS)})")
    if len(images) < 2:
        raise ValueError(f"the probe needs training images, got {len(images)}")
    torch.manual_seed(seed)
    palette = [[v / 255.0 for v in COLOURS[c]] for c in colours]
    specs = make_specs(kinds, colours, size_tol, position_tol)
    probe = FactorProbe(specs, palette, images.shape[1], width, resolution).to(device)
    with torch.no_grad():
        sil, found = [], []
        for i in range(0, len(images), 512):
            loc = probe.locate(to_unit(images[i : i + 512]).to(device))
            sil.append(probe.silhouettes(loc).cpu())
            found.append(loc["found"].cpu())
    keep = torch.cat(found)
    x = torch.cat(sil)[keep]
    y = torch.as_tensor(np.asarray(factors["kind"]), dtype=torch.long)[keep]
    _fit(probe.kind_net, x, y, steps, batch_size, lr, seed, device, progress)
    return probe.eval()


def augment_silhouettes(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, mirroring, scale (x 2^N(0, 0.1)), shift (N(0, 0.05) of the crop), Gaussian blur
    (sigma 0 / 0.35 / 0.7 px), coverage gain (0.8..1) and noise (sigma 0.03) of silhouettes [N, 1, R, R]."""
    n, dev = len(x), x.device
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    scale = torch.exp2(0.1 * torch.randn(n, generator=gen))
    c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c * mirror, -s
    theta[:, 1, 0], theta[:, 1, 1] = s * mirror, c
    theta[:, :, 2] = 0.1 * torch.randn(n, 2, generator=gen)  # [-1, 1] units: 0.05 of the crop
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    which = torch.randint(0, 3, (n,), generator=gen)
    for k, sigma in ((1, BLUR[0]), (2, BLUR[1])):
        sel = which == k
        if sel.any():
            r = math.ceil(3 * sigma)
            t = torch.arange(-r, r + 1, dtype=y.dtype)
            g = torch.exp(-(t**2) / (2 * sigma**2))
            g = (g / g.sum()).to(dev)
            z = F.conv2d(y[sel], g.view(1, 1, 1, -1), padding=(0, r))
            y[sel] = F.conv2d(z, g.view(1, 1, -1, 1), padding=(r, 0))
    gain = (1 - GAIN + GAIN * torch.rand(n, 1, 1, 1, generator=gen)).to(dev)
    noise = NOISE * torch.randn(y.shape, generator=gen).to(dev)
    return (y * gain + noise).clamp(0, 1)


def _fit(
    net: nn.Module, x, y, steps: int, batch_size: int, lr: float, seed: int, device, progress: bool
) -> None:
    """AdamW with a one-cycle schedule: ``steps`` seeded batches of augmented silhouettes."""
    from tqdm import tqdm

    if steps < 1:
        raise ValueError(f"the probe's training steps must be positive, got {steps}")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(steps), desc="training the kind classifier", disable=not progress, file=sys.stderr):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        xb = augment_silhouettes(x[idx], gen).to(device)
        loss = F.cross_entropy(net(xb * 2 - 1), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


# ------------------------------------------------------------------------------------------------ files


def save_probe(probe: FactorProbe, path, report: list[dict] | None = None) -> None:
    """Write the probe (tensors and plain data only: loadable with ``torch.load(weights_only=True)``)."""
    payload = {
        "format": FORMAT,
        "image_size": probe.image_size,
        "width": probe.width,
        "resolution": probe.resolution,
        "palette": probe.palette.cpu().tolist(),
        "specs": [asdict(s) for s in probe.specs],
        "state_dict": {k: v.detach().cpu() for k, v in probe.kind_net.state_dict().items()},
        "report": list(report if report is not None else probe.report),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_probe(path, device: torch.device | str = "cpu") -> FactorProbe:
    """Load a probe written by :func:`save_probe` (weights-only), with its accuracy report."""
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a factor probe (format {FORMAT!r}): train one with `rcdm study probe` "
            "(Snakemake: delete the file and rerun)"
        )
    specs = [FactorSpec(**s) for s in payload["specs"]]
    probe = FactorProbe(
        specs, payload["palette"], payload["image_size"], payload["width"], payload["resolution"]
    )
    probe.kind_net.load_state_dict(payload["state_dict"], strict=True)
    probe.report = list(payload.get("report", []))
    return probe.to(device).eval().requires_grad_(False)
