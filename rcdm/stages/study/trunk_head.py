"""Study 3, trunk vs head: the same images and the same noise, conditioned on the backbone (trunk)
representation with the trunk model and on the projector (head) embedding with the head model, side by side.

Numbers per image and layer: the spread of its samples in pixel space (mean per-pixel variance, [0, 1] units)
and in representation space (direction spread ``1 - |mean unit vector|^2``, scale free), both in the trunk's
space (common to the two rows) and in the conditioning layer's own space; the samples' mean cosine distance to
their conditioning; and the mean pixel difference between trunk and head samples drawn from the same noise.
The paper's finding: head-conditioned samples vary more (the projector discards what augmentations change).
"""

from __future__ import annotations

import argparse

import torch

from rcdm.factory import read_model_flags
from rcdm.figures import as_tiles, labelled_table
from rcdm.formats import hdf5
from rcdm.representations import cosine_distance, direction_spread, encode_images, spread
from rcdm.stages.study import common
from rcdm.study_images import read_features
from rcdm.study_sampling import sample_images

NAME = "trunk-head"


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
    parser.set_defaults(num_images=3)


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    ctx = common.StudyContext.from_args(args, layer="trunk")
    head_model, head_diffusion, head_enc = _load_head(args, ctx)
    k, n = args.samples, len(ctx.sources)
    f_trunk = ctx.clean_features()
    if args.head_features:
        images = hdf5.check_images_file(args.images, deep=False) if args.images else None
        f_head = read_features(args.head_features, ctx.sources.indices, images)
    else:
        f_head = encode_images(head_enc, ctx.sources.enc, ctx.settings.batch_size)
    idx = torch.arange(k).repeat(n)
    s_trunk = ctx.sample(f_trunk.repeat_interleave(k, 0), idx, desc="trunk samples")
    s_head = sample_images(
        head_model,
        head_diffusion,
        f_head.repeat_interleave(k, 0),
        idx,
        ctx.noise,
        ctx.settings,
        "head samples",
    )
    rows = _rows(args, ctx, head_enc, {"trunk": f_trunk, "head": f_head}, {"trunk": s_trunk, "head": s_head})
    out.save_png(_figure(args, ctx, s_trunk, s_head, rows))
    out.save_csv(rows)
    return []


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


def _rows(args, ctx: common.StudyContext, head_enc, cond: dict, samples: dict) -> list[dict]:
    """Per image and layer: pixel and representation spreads, distance to the conditioning."""
    src, k = ctx.sources, args.samples
    bs = ctx.settings.batch_size
    in_trunk = {layer: ctx.embed_samples(s) for layer, s in samples.items()}
    in_own = {"trunk": in_trunk["trunk"], "head": encode_images(head_enc, samples["head"], bs)}
    pix = {layer: (s + 1) / 2 for layer, s in samples.items()}
    rows = []
    for i in range(len(src)):
        b = slice(i * k, (i + 1) * k)
        diff = float((pix["trunk"][b] - pix["head"][b]).abs().mean())
        for layer in ("trunk", "head"):
            rows.append(
                {
                    "image": src.names[i],
                    "encoder": args.encoder,
                    "layer": layer,
                    "samples": k,
                    "pixel_spread": spread(pix[layer][b]),
                    "rep_spread_trunk_space": direction_spread(in_trunk[layer][b]),
                    "rep_spread_own_space": direction_spread(in_own[layer][b]),
                    "cos_dist_to_cond": float(cosine_distance(in_own[layer][b], cond[layer][i]).mean()),
                    "trunk_vs_head_pixel_l1": diff,
                }
            )
    return rows


def _figure(args, ctx: common.StudyContext, s_trunk, s_head, rows: list[dict]):
    src, k, n = ctx.sources, args.samples, len(ctx.sources)
    t_img, h_img = as_tiles(s_trunk), as_tiles(s_head)
    fig_rows = [[src.show[i], *t_img[i * k : (i + 1) * k], *h_img[i * k : (i + 1) * k]] for i in range(n)]
    labels = [
        f"{src.names[i]}\nspread t {rows[2 * i]['pixel_spread']:.3f}"
        f"\n       h {rows[2 * i + 1]['pixel_spread']:.3f}"
        for i in range(n)
    ]
    cols = ["input", *[f"trunk {j + 1}" for j in range(k)], *[f"head {j + 1}" for j in range(k)]]
    note = f"; {common.UPSAMPLED_NOTE}" if src.any_upsampled else ""
    title = f"Trunk vs head ({args.encoder}, {ctx.settings.sampler}{note}), same noise per column pair"
    return labelled_table(fig_rows, labels, cols, title)
