"""Study 3, trunk vs head: the same images and the same noise, conditioned on the backbone (trunk)
representation with the trunk model and on the projector (head) embedding with the head model.

The paper's finding: samples conditioned on the trunk reproduce the image (colour, pose, position, size);
samples conditioned on the head keep what the SSL objective asked to keep (the object) and vary what its
augmentations randomised. Measured here, with ``--probe`` on ``shapes``, as the fraction of samples that keep
each factor of their conditioning image (:mod:`rcdm.probe`: kind, colour, size, position), per layer, over
``--keep-images`` validation images x ``--samples`` samples, with the probe's accuracy on real validation
images and the chance rate beside each.

Outputs: ``trunk-head.png``, the figure (the first ``--num-images`` images: conditioning image | trunk samples
| head samples, sample ``j`` of both layers from noise ``j``; keep-rates below); ``trunk-head.csv``, one row
per layer: ``<factor>_keep``, ``<factor>_probe_acc``, ``<factor>_chance``, the fraction of samples in which
the probe found a shape, and the mean spreads; ``trunk-head.md``, the same as a Markdown table;
``trunk-head_images.csv``, per image and layer: kept fractions, pixel spread (mean per-pixel variance of
its samples, [0, 1] units), representation direction spread (``1 - |mean unit vector|^2``, scale free) in
the trunk's space and in the layer's own space, and the mean pixel difference between trunk and head samples
drawn from the same noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from rcdm.factory import read_model_flags
from rcdm.figures import as_tiles, comparison_figure
from rcdm.formats import hdf5
from rcdm.io import atomic_path
from rcdm.representations import direction_spread, encode_images, spread
from rcdm.stages.study import common
from rcdm.study_images import read_features
from rcdm.study_sampling import sample_images

NAME = "trunk-head"
LAYERS = ("trunk", "head")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    g = parser.add_argument_group("head model")
    g.add_argument("--head-checkpoint", required=True, help="RCDM checkpoint conditioned on the head")
    g.add_argument("--head-model-flags", default=None, help="its creation flags (JSON or file)")
    g.add_argument("--head-features", default=None, help="head features file of --images (else encoded)")
    common.add_encoder_arguments(parser, layer=False)
    common.add_source_arguments(parser)
    common.add_sampling_arguments(parser, samples=3)
    common.add_output_arguments(parser)
    parser.add_argument(
        "--keep-images",
        type=int,
        default=64,
        help="images whose samples the keep-rates count (the figure shows the first --num-images of them)",
    )
    parser.set_defaults(num_images=3)


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list[Path]:
    if args.keep_images < 0:
        raise ValueError(f"--keep-images must be >= 0, got {args.keep_images}")
    load_args = argparse.Namespace(**{**vars(args), "num_images": max(args.num_images, args.keep_images)})
    ctx = common.StudyContext.from_args(load_args, layer="trunk")
    head_model, head_diffusion, head_enc = _load_head(args, ctx)
    common.loaded(args, ctx, f"head model {args.head_checkpoint}")
    k, n = args.samples, len(ctx.sources)
    f_trunk = ctx.clean_features()
    if args.head_features:
        images = hdf5.check_images_file(args.images, deep=False) if args.images else None
        f_head = read_features(args.head_features, ctx.sources.indices, images)
    else:
        f_head = encode_images(head_enc, ctx.sources.enc, ctx.settings.batch_size)
    idx = torch.arange(k).repeat(n)
    samples = {
        "trunk": ctx.sample(f_trunk.repeat_interleave(k, 0), idx, desc="trunk samples"),
        "head": sample_images(
            head_model,
            head_diffusion,
            f_head.repeat_interleave(k, 0),
            idx,
            ctx.noise,
            ctx.settings,
            "head samples",
        ),
    }
    keep = _keep(ctx, samples, k)
    per_image = _image_rows(args, ctx, head_enc, samples, keep)
    summary = _summary_rows(args, ctx, per_image, keep)
    out.save_png(_figure(args, ctx, samples, summary))
    out.save_csv(summary)
    images_csv = out.dir / f"{NAME}_images.csv"
    common.write_csv(images_csv, per_image)
    table = out.dir / f"{NAME}.md"
    with atomic_path(table, suffix=".md") as tmp:
        tmp.write_text(keep_table(summary, _describe(args, ctx, n, k)))
    return [images_csv, table]


def _load_head(args: argparse.Namespace, ctx: common.StudyContext):
    """(head model, its diffusion, the encoder's head), checked against the trunk model."""
    head_model, head_diffusion = common.load_rcdm(
        args.head_checkpoint,
        read_model_flags(args.head_model_flags),
        trust=args.trust_checkpoint,
        device=ctx.device,
    )
    attrs = common.features_attrs(args.head_features or args.features)
    head_enc = common.load_encoder(args, "head", attrs, ctx.device)
    common.check_dims(head_model, int(head_enc.dim), f"encoder {args.encoder!r} (head)")
    if common.model_image_size(head_model) != ctx.image_size:
        raise ValueError("the trunk and head models generate different image sizes")
    return head_model, head_diffusion, head_enc


def _keep(ctx: common.StudyContext, samples: dict, k: int) -> dict | None:
    """Per layer: {factor: bool [N, k]} (the sample keeps the image's factor) and ``found``, with
    ``--probe`` on images with factors; else None."""
    src = ctx.sources
    if ctx.probe is None or not src.factors:
        return None
    from rcdm.probe import keep_fractions

    out = {}
    for layer, s in samples.items():
        x = ((s + 1) / 2).view(len(src), k, *s.shape[1:])
        kept = keep_fractions(ctx.probe, x, src.factors)
        kept["found"] = ctx.probe.measure(x.flatten(0, 1))["found"].view(len(src), k)
        out[layer] = kept
    return out


def _image_rows(args, ctx: common.StudyContext, head_enc, samples: dict, keep: dict | None) -> list[dict]:
    """Per image and layer: kept fractions, pixel and representation spreads, trunk-head pixel difference."""
    src, k = ctx.sources, args.samples
    bs = ctx.settings.batch_size
    in_trunk = {layer: ctx.embed_samples(s) for layer, s in samples.items()}
    in_own = {"trunk": in_trunk["trunk"], "head": encode_images(head_enc, samples["head"], bs)}
    pix = {layer: (s + 1) / 2 for layer, s in samples.items()}
    rows = []
    for i in range(len(src)):
        b = slice(i * k, (i + 1) * k)
        diff = float((pix["trunk"][b] - pix["head"][b]).abs().mean())
        for layer in LAYERS:
            row = {"image": src.names[i], "encoder": ctx.encoder.encoder_name, "layer": layer, "samples": k}
            if keep is not None:
                for name, hit in keep[layer].items():
                    row[f"{name}_keep" if name != "found" else "shape_found"] = float(hit[i].float().mean())
            row |= {
                "pixel_spread": spread(pix[layer][b]),
                "rep_spread_trunk_space": direction_spread(in_trunk[layer][b]),
                "rep_spread_own_space": direction_spread(in_own[layer][b]),
                "trunk_vs_head_pixel_l1": diff,
            }
            rows.append(row)
    return rows


def _summary_rows(args, ctx: common.StudyContext, per_image: list[dict], keep: dict | None) -> list[dict]:
    """One row per layer: keep-rates over all samples with the probe's accuracy and chance beside each."""
    n, k = len(ctx.sources), args.samples
    acc, chance = _probe_numbers(ctx.probe)
    rows = []
    for layer in LAYERS:
        mine = [r for r in per_image if r["layer"] == layer]
        row = {"encoder": ctx.encoder.encoder_name, "layer": layer, "images": n, "samples": n * k}
        if keep is not None:
            for name in ctx.probe.factors:
                row[f"{name}_keep"] = float(keep[layer][name].float().mean())
                row[f"{name}_probe_acc"] = acc.get(name, float("nan"))
                row[f"{name}_chance"] = chance.get(name, float("nan"))
            row["shape_found"] = float(keep[layer]["found"].float().mean())
        for col in ("pixel_spread", "rep_spread_trunk_space", "rep_spread_own_space"):
            row[col] = float(np.mean([r[col] for r in mine]))
        rows.append(row)
    return rows


def _probe_numbers(probe) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy on real validation images, chance) per factor, from the probe's report."""
    if probe is None:
        return {}, {}
    rep = {r["factor"]: r for r in probe.report}
    acc = {f: float(rep[f]["val_accuracy"]) if f in rep else float("nan") for f in probe.factors}
    chance = {f: float(rep[f]["chance"]) if f in rep else float("nan") for f in probe.factors}
    return acc, chance


def _describe(args, ctx: common.StudyContext, n: int, k: int) -> str:
    s = ctx.settings
    steps = "" if s.steps is None else f" {s.steps} steps"
    return (
        f"encoder {ctx.encoder.encoder_name}; {n} validation images x {k} samples per layer "
        f"({s.sampler}{steps}), the same initial noise for both layers"
    )


def keep_table(summary: list[dict], description: str) -> str:
    """Markdown: per factor, the fraction of trunk and of head samples that keep it, chance, the probe's
    accuracy on real validation images; a note on the rules."""
    by_layer = {r["layer"]: r for r in summary}
    factors = [c[: -len("_keep")] for c in summary[0] if c.endswith("_keep")] if summary else []
    lines = [f"Samples that keep each factor of their conditioning image ({description}).", ""]
    if not factors:
        return "\n".join(
            [*lines, "No factor probe (`--probe`, shapes data only): keep-rates not measured.", ""]
        )
    lines += [
        "| factor | trunk samples keep | head samples keep | chance | probe accuracy (real val images) |",
        "|---|---|---|---|---|",
    ]
    for f in factors:
        t, h = by_layer["trunk"], by_layer["head"]
        lines.append(
            f"| {f} | {_pct(t[f'{f}_keep'])} | {_pct(h[f'{f}_keep'])} | {_pct(t[f'{f}_chance'])} "
            f"| {_pct(t[f'{f}_probe_acc'])} |"
        )
    n = by_layer["trunk"]["samples"]
    lines += [
        "",
        f"{n} samples per layer. Kind and colour: the probe's class equals the image's; size: equivalent "
        "diameter within the probe's relative tolerance; position: centre within its tolerance (rules: "
        "`studies/probe/probe.csv`). Chance: pairs of different validation images that match by the same "
        "rule. Probe accuracy: validation images whose own measurement matches their recorded factors.",
        "",
    ]
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.0f} %"


def _figure(args, ctx: common.StudyContext, samples: dict, summary: list[dict]):
    src, k = ctx.sources, args.samples
    m = min(args.num_images, len(src))
    tiles = {layer: as_tiles(s).reshape(len(src), k, *src.show.shape[1:])[:m] for layer, s in samples.items()}
    labels = [_row_label(src, i) for i in range(m)]
    caption, table = _caption(summary)
    note = f"; {common.UPSAMPLED_NOTE}" if src.any_upsampled else ""
    steps = "" if ctx.settings.steps is None else f" {ctx.settings.steps} steps"
    title = (
        f"What the {ctx.encoder.encoder_name} trunk and head keep: samples conditioned on each "
        f"({ctx.settings.sampler}{steps}{note})"
    )
    return comparison_figure(
        src.show[:m],
        [("trunk-conditioned samples", tiles["trunk"]), ("head-conditioned samples", tiles["head"])],
        labels,
        title=title,
        caption=caption,
        table=table,
    )


def _row_label(src, i: int) -> str:
    names, f = src.factor_names, src.factors
    if "kind" in f and "colour" in f and names.get("kind") and names.get("colour"):
        return f"{names['colour'][int(f['colour'][i])]}\n{names['kind'][int(f['kind'][i])]}"
    return src.names[i]


def _caption(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Keep-rates under the figure: a sentence and a table (none without a probe)."""
    factors = [c[: -len("_keep")] for c in summary[0] if c.endswith("_keep")] if summary else []
    if not factors:
        return [
            "Sample j of both layers starts from noise j. (No factor probe: keep-rates not measured.)"
        ], []
    n = summary[0]["images"]
    per = summary[0]["samples"] // max(1, n)
    lines = [
        f"Samples that keep each factor of their conditioning image, over {n} validation images x {per} "
        "samples per layer (sample j of both layers starts from noise j):"
    ]
    table = [["", *factors]]
    for r in summary:
        table.append([f"{r['layer']}-conditioned samples", *[_pct(r[f"{f}_keep"]) for f in factors]])
    t = summary[0]
    table.append(["chance (random other image)", *[_pct(t[f"{f}_chance"]) for f in factors]])
    table.append(["probe accuracy on real val images", *[_pct(t[f"{f}_probe_acc"]) for f in factors]])
    return lines, table
