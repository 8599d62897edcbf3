"""Study 4, augmentation invariance: is a representation invariant to the augmentations its SSL training used?

Each conditioning image is transformed by each augmentation at a few strengths s in (0, 1] (s = 1 is the
strongest setting of the usual SimCLR/BYOL/DINO recipes), deterministically from the seed:

- ``crop``: a square crop of area fraction ``1 - 0.92 s`` (s = 1: 8 %, RandomResizedCrop's minimum) at a
  seeded position, resized back;
- ``jitter``: brightness and contrast ``1 +- 0.4 s``, saturation ``1 +- 0.2 s``, hue ``+- 0.1 s``
  (signs seeded);
- ``grayscale``: blend towards the grey image by s;
- ``blur``: Gaussian blur, sigma ``2 s`` pixels at 224 px, scaled with the image side (at least ``s`` px);
- ``solarize``: invert pixels above ``1 - s / 2`` (s = 1: the usual threshold 0.5);
- ``flip``: horizontal flip (strength ignored: only s = 1 is run).

The augmentations act on each original's centre crop at the encoder's input size (what extraction encoded),
and the result goes to the encoder as it is, with no resize. Without the original (see ``--image-root``) the
study stops, unless ``--allow-upsampled-crops``; the ``encoder_input`` column says which the encoder saw.

Numbers per image, augmentation and strength: representation distance to the clean image's (cosine distance
and relative L2), the samples' mean cosine distance to the clean representation, the pixel spread of the
samples, and with ``--probe`` on ``shapes`` the fraction of samples whose predicted factor equals the clean
image's true factor (per factor). Samples of every row use the same noise as the clean row.
"""

from __future__ import annotations

import argparse
import math

import torch
import torchvision.transforms.v2.functional as TF

from rcdm.figures import as_tiles, labelled_table, resize_tiles
from rcdm.representations import cosine_distance, relative_l2, spread
from rcdm.stages.study import common
from rcdm.study_images import to_unit

NAME = "augment"
AUGMENTATIONS = ("crop", "jitter", "grayscale", "blur", "solarize", "flip")


def augment(
    x: torch.Tensor, name: str, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply augmentation ``name`` at ``strength`` to images [N, 3, H, W] in [0, 1] (same shape out)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    n, _, h, w = x.shape
    s = float(strength)
    if name == "crop":
        side = max(1, round(math.sqrt(1.0 - 0.92 * s) * min(h, w)))
        out = []
        for i in range(n):
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            out.append(TF.resized_crop(x[i], top, left, side, side, [h, w], antialias=True))
        return torch.stack(out).clamp(0, 1)
    if name == "jitter":
        out = []
        for i in range(n):
            signs = torch.randint(0, 2, (4,), generator=generator) * 2 - 1
            y = TF.adjust_brightness(x[i], 1 + 0.4 * s * float(signs[0]))
            y = TF.adjust_contrast(y, 1 + 0.4 * s * float(signs[1]))
            y = TF.adjust_saturation(y, 1 + 0.2 * s * float(signs[2]))
            out.append(TF.adjust_hue(y, 0.1 * s * float(signs[3])))
        return torch.stack(out).clamp(0, 1)
    if name == "grayscale":
        gray = TF.rgb_to_grayscale(x, num_output_channels=3)
        return (1 - s) * x + s * gray
    if name == "blur":
        sigma = s * max(2.0 * min(h, w) / 224, 1.0)
        if sigma <= 0:
            return x.clone()
        ksize = 2 * math.ceil(3 * sigma) + 1
        return TF.gaussian_blur(x, [ksize, ksize], [sigma, sigma]).clamp(0, 1)
    if name == "solarize":
        threshold = 1.0 - s / 2
        return torch.where(x >= threshold, 1.0 - x, x)
    if name == "flip":
        return x.flip(-1)
    raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=2)
    parser.set_defaults(num_images=2)
    g = parser.add_argument_group("augmentations")
    g.add_argument("--augmentations", default=",".join(AUGMENTATIONS), help="comma-separated subset")
    g.add_argument("--strengths", default="0.5,1", help="comma-separated strengths in (0, 1]")


def _parse(args: argparse.Namespace) -> list[tuple[str, float]]:
    names = [a.strip() for a in args.augmentations.split(",") if a.strip()]
    for a in names:
        if a not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {a!r}; choose from {', '.join(AUGMENTATIONS)}")
    try:
        strengths = [float(v) for v in args.strengths.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--strengths must be comma-separated numbers, got {args.strengths!r}") from err
    if not strengths or any(not 0 < v <= 1 for v in strengths):
        raise ValueError(f"--strengths must lie in (0, 1], got {args.strengths!r}")
    return [(a, v) for a in names for v in ([1.0] if a == "flip" else strengths)]


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    conditions = [("none", 0.0), *_parse(args)]
    ctx = common.StudyContext.from_args(args)
    views = augmented_views(to_unit(ctx.sources.enc), conditions, args.seed)  # [n, c, 3, E, E]
    n, c = views.shape[:2]
    feats = ctx.embed_inputs(views.flatten(0, 1)).view(n, c, -1)
    samples = ctx.repeat_samples(feats.flatten(0, 1), args.samples, desc="augmentations")  # [(n c k), ...]
    rows = _rows(ctx, conditions, feats, samples, args.samples)
    out.save_png(_figure(ctx, conditions, views, samples, rows, args.samples))
    out.save_csv(rows)
    return []


def augmented_views(x: torch.Tensor, conditions: list[tuple[str, float]], seed: int) -> torch.Tensor:
    """Images [n, 3, E, E] in [0, 1] under each (augmentation, strength): [n, c, 3, E, E], seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([x if a == "none" else augment(x, a, s, gen) for a, s in conditions], 1)


def _rows(ctx: common.StudyContext, conditions, feats: torch.Tensor, samples: torch.Tensor, k: int) -> list:
    """Per image and condition: distances to the clean representation, sample spread, kept factors."""
    src = ctx.sources
    n, c = feats.shape[:2]
    emb = ctx.embed_samples(samples).view(n, c, k, -1)
    keep = None
    if ctx.probe is not None and src.factors:
        from rcdm.probe import keep_fractions

        keep = keep_fractions(ctx.probe, (samples.view(n, c * k, *samples.shape[1:]) + 1) / 2, src.factors)
    rows = []
    for i in range(n):
        clean = feats[i, 0]
        for a, (aug, s) in enumerate(conditions):
            row = {
                "image": src.names[i],
                "encoder": ctx.encoder.encoder_name,
                "layer": ctx.encoder.layer,
                "augmentation": aug,
                "strength": s,
                "rep_cos_dist": float(cosine_distance(feats[i, a], clean)),
                "rep_rel_l2": float(relative_l2(feats[i, a], clean)),
                "sample_cos_dist_clean_rep": float(cosine_distance(emb[i, a], clean).mean()),
                "sample_pixel_spread": spread((samples.view(n, c, k, -1)[i, a] + 1) / 2),
                "encoder_input": common.encoder_input_label(src, i),
            }
            if keep is not None:
                for name, frac in keep.items():
                    row[f"keep_{name}"] = float(frac[i, a * k : (a + 1) * k].float().mean())
            rows.append(row)
    return rows


def _figure(ctx: common.StudyContext, conditions, views, samples, rows: list[dict], k: int):
    src = ctx.sources
    n, c = views.shape[:2]
    size = src.show.shape[1]
    imgs = as_tiles(samples).reshape(n, c, k, size, size, 3)
    shown = resize_tiles(as_tiles(views.flatten(0, 1), low=0.0), size).reshape(n, c, size, size, 3)
    fig_rows, labels = [], []
    for i in range(n):
        for a, (aug, s) in enumerate(conditions):
            fig_rows.append([shown[i, a], *imgs[i, a]])
            d = rows[i * c + a]["rep_cos_dist"]
            labels.append(
                f"{src.names[i]} {aug}" + (f" {s:g}" if aug != "none" else "") + f"\ncos dist {d:.3f}"
            )
    cols = ["input", *[f"sample {j + 1}" for j in range(k)]]
    title = f"Augmentations ({ctx.describe()}), same noise per column"
    return labelled_table(fig_rows, labels, cols, title)
