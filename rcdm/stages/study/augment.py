"""Study 4, augmentation invariance: is a representation invariant to the augmentations its SSL training used?

Each image is transformed by each augmentation at a few strengths s in (0, 1] (s = 1 is the strongest
setting of the usual SimCLR/BYOL/DINO recipes), deterministically from the seed:

- ``crop``: a square crop of area fraction ``1 - 0.92 s`` (s = 1: 8 %, RandomResizedCrop's minimum) at a
  seeded position, resized back;
- ``jitter``: brightness and contrast ``1 +- 0.4 s``, saturation ``1 +- 0.2 s``, hue ``+- 0.1 s``
  (signs seeded);
- ``hue``: hue rotated by ``+- 0.5 s`` of a turn (s = 1: the opposite colour);
- ``translate``: shifted by ``0.25 s`` of the side along a seeded direction, the border pixels extended;
- ``scale``: zoomed about the centre by ``2^(+- 0.5 s)``, the border pixels extended;
- ``grayscale``: blend towards the grey image by s;
- ``blur``: Gaussian blur, sigma ``2 s`` pixels at 224 px, scaled with the image side (at least ``s`` px);
- ``solarize``: invert pixels above ``1 - s / 2`` (s = 1: the usual threshold 0.5);
- ``flip``: horizontal flip (strength ignored: only s = 1 is run).

The augmentations act on each original's centre crop at the encoder's input size (what extraction encoded),
and the result goes to the encoder as it is, with no resize. Without the original (see ``--image-root``) the
study stops, unless ``--allow-upsampled-crops``; the ``encoder_input`` column says which the encoder saw.

Invariance, per space (the encoder's trunk and, when it has one, its head), on ``--ref-images`` images: the
distance between an image's representation and its augmented copy's, divided by the typical distance
between the representations of two different images in the same space (the median over all pairs of the
clean images): 0 = invariant (the augmented copy has the image's own representation), 1 = the augmentation
moves the representation as far as replacing the image by another one. Scale free, so a 2048-d sparse trunk
and a 64-d head read the same way (:func:`rcdm.representations.normalised_distance`).

Outputs: ``augment.csv``, per augmentation and strength: the median (and mean) invariance ratio in each
space and, with ``--probe`` on ``shapes``, the fraction of samples conditioned on the augmented view that
keep each factor of the clean image, with the probe's accuracy on real validation images beside it;
``augment_images.csv``, the same per image; ``augment.png``, the first ``--num-images`` images: each
augmented view followed by samples of its representation (the same noise as the clean row);
``augment_invariance.png``, the invariance ratios as bars, trunk beside head.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from rcdm.figures import as_tiles, labelled_table, resize_tiles
from rcdm.representations import encode_inputs, normalised_distance, spread, typical_distance
from rcdm.stages.study import common
from rcdm.study_images import to_unit

NAME = "augment"
AUGMENTATIONS = ("crop", "jitter", "hue", "translate", "scale", "grayscale", "blur", "solarize", "flip")


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
    if name == "hue":
        signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        return torch.stack([TF.adjust_hue(x[i], 0.5 * s * float(signs[i])) for i in range(n)]).clamp(0, 1)
    if name in ("translate", "scale"):
        theta = torch.zeros(n, 2, 3)
        if name == "translate":
            angle = torch.rand(n, generator=generator) * 2 * math.pi
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2], theta[:, 1, 2] = -0.5 * s * torch.cos(angle), -0.5 * s * torch.sin(angle)
        else:
            signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).float()
            theta[:, 0, 0] = theta[:, 1, 1] = torch.exp2(-0.5 * s * signs)  # sampling step: 1 / zoom
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)
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
    g.add_argument(
        "--ref-images",
        type=int,
        default=64,
        help="images the invariance ratios are measured on (encoder passes only; the samples and the figure "
        "use the first --num-images of them)",
    )


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


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list[Path]:
    conditions = [("none", 0.0), *_parse(args)]
    if args.ref_images < 2:
        raise ValueError(
            f"--ref-images must be at least 2 (a typical distance needs pairs), got {args.ref_images}"
        )
    load_args = argparse.Namespace(**{**vars(args), "num_images": max(args.num_images, args.ref_images)})
    ctx = common.StudyContext.from_args(load_args)
    if args.check:  # the encoder's other layer too, as invariance() loads it
        common.loaded(args, ctx, f"spaces {', '.join(_spaces(args, ctx))}")
    views = augmented_views(to_unit(ctx.sources.enc), conditions, args.seed)  # [N, c, 3, E, E]
    ratios = invariance(args, ctx, views)  # {space: [N, c]}
    m, c = min(args.num_images, len(ctx.sources)), len(conditions)
    feats = ctx.embed_inputs(views[:m].flatten(0, 1)).view(m, c, -1)
    samples = ctx.repeat_samples(feats.flatten(0, 1), args.samples, desc="augmentations")  # [(m c k), ...]
    keep = _keep(ctx, samples, m, c, args.samples)
    per_image = _image_rows(ctx, conditions, ratios, samples, keep, m, args.samples)
    summary = _summary_rows(ctx, conditions, ratios, keep)
    out.save_png(_figure(ctx, conditions, views[:m], samples, per_image, args.samples))
    out.save_png(invariance_chart(summary, ctx.encoder.encoder_name), "_invariance")
    out.save_csv(summary)
    images_csv = out.dir / f"{NAME}_images.csv"
    common.write_csv(images_csv, per_image)
    return [images_csv, out.dir / f"{NAME}_invariance.png"]


def augmented_views(x: torch.Tensor, conditions: list[tuple[str, float]], seed: int) -> torch.Tensor:
    """Images [n, 3, E, E] in [0, 1] under each (augmentation, strength): [n, c, 3, E, E], seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([x if a == "none" else augment(x, a, s, gen) for a, s in conditions], 1)


def _spaces(args: argparse.Namespace, ctx: common.StudyContext) -> dict:
    """The encoder's layers as loaded for this study: its own and, when the encoder has it, the other one."""
    encoders = {ctx.encoder.layer: ctx.encoder}
    for layer in ("trunk", "head"):
        if layer in encoders:
            continue
        try:
            encoders[layer] = common.load_encoder(
                args, layer, common.features_attrs(args.features), ctx.device
            )
        except ValueError as err:
            if "has no head" not in str(err):
                raise
    return {layer: encoders[layer] for layer in ("trunk", "head") if layer in encoders}


def invariance(
    args: argparse.Namespace, ctx: common.StudyContext, views: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per space: [N, c] distance between each clean view's representation and each augmented one's, in units
    of the typical distance between two different images' representations in that space."""
    n, c = views.shape[:2]
    out = {}
    for layer, enc in _spaces(args, ctx).items():
        f = encode_inputs(enc, views.flatten(0, 1), ctx.settings.batch_size).view(n, c, -1)
        typical = typical_distance(f[:, 0])
        out[layer] = normalised_distance(f, f[:, :1], typical)
    return out


def _keep(ctx: common.StudyContext, samples: torch.Tensor, m: int, c: int, k: int) -> dict | None:
    """{factor: bool [m, c, k]}: the sample of an augmented view keeps the clean image's factor (--probe)."""
    src = ctx.sources
    if ctx.probe is None or not src.factors:
        return None
    from rcdm.probe import keep_fractions

    factors = {name: v[:m] for name, v in src.factors.items()}
    x = (samples.view(m, c * k, *samples.shape[1:]) + 1) / 2
    return {name: v.view(m, c, k) for name, v in keep_fractions(ctx.probe, x, factors).items()}


def _keep_columns(ctx: common.StudyContext, keep: dict | None, sel) -> dict:
    """``<factor>_keep`` (fraction of the selected samples) and ``<factor>_probe_acc`` beside it."""
    if keep is None:
        return {}
    acc = ctx.probe.accuracy
    row = {}
    for name, hit in keep.items():
        row[f"{name}_keep"] = float(hit[sel].float().mean())
        row[f"{name}_probe_acc"] = acc.get(name, float("nan"))
    return row


def _image_rows(ctx, conditions, ratios: dict, samples: torch.Tensor, keep, m: int, k: int) -> list[dict]:
    """Per sampled image and condition: invariance ratio per space, sample spread, kept factors."""
    src = ctx.sources
    c = len(conditions)
    rows = []
    for i in range(m):
        for a, (aug, s) in enumerate(conditions):
            row = {
                "image": src.names[i],
                "encoder": ctx.encoder.encoder_name,
                "layer": ctx.encoder.layer,
                "augmentation": aug,
                "strength": s,
                **{f"invariance_{space}": float(r[i, a]) for space, r in ratios.items()},
                "sample_pixel_spread": spread((samples.view(m, c, k, -1)[i, a] + 1) / 2),
                **_keep_columns(ctx, keep, (i, a)),
                "encoder_input": common.encoder_input_label(src, i),
            }
            rows.append(row)
    return rows


def _summary_rows(ctx, conditions, ratios: dict, keep) -> list[dict]:
    """Per condition: median and mean invariance ratio per space over the reference images; kept factors."""
    rows = []
    for a, (aug, s) in enumerate(conditions):
        row = {
            "encoder": ctx.encoder.encoder_name,
            "layer": ctx.encoder.layer,
            "augmentation": aug,
            "strength": s,
            "ref_images": len(ctx.sources),
        }
        for space, r in ratios.items():
            row[f"invariance_{space}_median"] = float(r[:, a].median())
            row[f"invariance_{space}_mean"] = float(r[:, a].mean())
        if keep is not None:
            row["sampled_images"] = next(iter(keep.values())).shape[0]
            row |= _keep_columns(ctx, keep, (slice(None), a))
        row["encoder_input"] = _inputs_label(ctx.sources)
        rows.append(row)
    return rows


def _inputs_label(src) -> str:
    """What the encoder saw for the images of a summary row (``common.encoder_input_label`` of each)."""
    labels = {common.encoder_input_label(src, i) for i in range(len(src))}
    if len(labels) == 1:
        return labels.pop()
    return f"upsampled stored crop for {int(src.upsampled.sum())} of {len(src)} images"


def invariance_chart(summary: list[dict], encoder: str):
    """Bars: median invariance ratio per augmentation (and strength), one bar per space."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    rows = [r for r in summary if r["augmentation"] != "none"]
    spaces = [sp for sp in ("trunk", "head") if rows and f"invariance_{sp}_median" in rows[0]]
    names = [r["augmentation"] + ("" if r["augmentation"] == "flip" else f" {r['strength']:g}") for r in rows]
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 3.8), dpi=100)
    width = 0.8 / max(1, len(spaces))
    for j, sp in enumerate(spaces):
        off = (j - (len(spaces) - 1) / 2) * width
        ax.bar(pos + off, [r[f"invariance_{sp}_median"] for r in rows], width, label=sp)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("distance to augmented copy\n/ typical distance between images", fontsize=8)
    n = summary[0]["ref_images"] if summary else 0
    ax.set_title(
        f"Augmentation invariance of the {encoder} encoder (median over {n} images)\n"
        "0 = invariant, 1 (dashed) = as far as another image",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _figure(ctx: common.StudyContext, conditions, views, samples, rows: list[dict], k: int):
    src = ctx.sources
    n, c = views.shape[:2]
    size = src.show.shape[1]
    imgs = as_tiles(samples).reshape(n, c, k, size, size, 3)
    shown = resize_tiles(as_tiles(views.flatten(0, 1), low=0.0), size).reshape(n, c, size, size, 3)
    own = f"invariance_{ctx.encoder.layer}"
    fig_rows, labels = [], []
    for i in range(n):
        for a, (aug, s) in enumerate(conditions):
            fig_rows.append([shown[i, a], *imgs[i, a]])
            label = f"{src.names[i]} {aug}" + (f" {s:g}" if aug != "none" else "")
            if aug != "none" and own in rows[i * c + a]:
                label += f"\nrel. dist {rows[i * c + a][own]:.2f}"
            labels.append(label)
    cols = ["input", *[f"sample {j + 1}" for j in range(k)]]
    title = (
        f"Augmentations ({ctx.describe()}), same noise per column\nrel. dist: distance to the clean "
        "representation / typical distance\nbetween two images (0 = invariant)"
    )
    return labelled_table(fig_rows, labels, cols, title)
