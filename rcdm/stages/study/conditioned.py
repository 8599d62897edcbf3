"""Study 1, conditioned samples: each validation image followed by ``k`` samples from its representation.

Numbers per sample: cosine distance of the sample's representation to its conditioning, and the rank of the
true conditioning among all shown conditionings (1 = the nearest; ``rcdm.metrics.rank_mrr``); per image the
pixel spread and the representation direction spread of its samples; with ``--probe`` on ``shapes`` whether
the sample keeps each generative factor of its conditioning image (``<factor>_keep``, :mod:`rcdm.probe`) and,
beside it, the probe's accuracy on real validation images (``<factor>_probe_acc``).
"""

from __future__ import annotations

import argparse

import torch

from rcdm.figures import as_tiles, labelled_table
from rcdm.representations import cosine_distance, direction_spread, spread
from rcdm.stages.study import common

NAME = "conditioned"
TITLE = "Samples conditioned on validation images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=4)


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: conditioned_study(args, out, TITLE))


def conditioned_study(args: argparse.Namespace, out: common.StudyOutput, title: str) -> list:
    """Shared by ``conditioned`` and ``ood``: figure rows of image + samples, CSV rows per sample."""
    ctx = common.StudyContext.from_args(args)
    common.loaded(args, ctx)
    feats = ctx.clean_features()
    samples = ctx.repeat_samples(feats, args.samples, desc=out.name)
    out.save_png(_figure(ctx, samples, args.samples, title))
    out.save_csv(_rows(ctx, feats, samples, args.samples))
    return []


def _rows(ctx: common.StudyContext, feats: torch.Tensor, samples: torch.Tensor, k: int) -> list[dict]:
    """Per sample: distance and rank to its conditioning, its image's spreads, kept factors (``--probe``)."""
    from rcdm.metrics import rank_mrr

    src, n = ctx.sources, len(ctx.sources)
    emb = ctx.embed_samples(samples)
    owner = torch.arange(n).repeat_interleave(k)
    ranks = rank_mrr(emb, feats, "cosine", sample_to_cond=owner, return_ranks=True)["ranks"]
    cos = cosine_distance(emb, feats[owner])
    keep = None
    if ctx.probe is not None and src.factors:
        from rcdm.probe import keep_fractions

        keep = keep_fractions(ctx.probe, ((samples + 1) / 2).view(n, k, *samples.shape[1:]), src.factors)
        acc = ctx.probe.accuracy  # on real validation images, written beside every keep
    rows = []
    for i in range(n):
        block = slice(i * k, (i + 1) * k)
        pix = spread((samples[block] + 1) / 2)
        rep = direction_spread(emb[block])
        for j in range(k):
            r = i * k + j
            row = {
                "image": src.names[i],
                "label": int(src.labels[i]),
                "encoder": ctx.encoder.encoder_name,
                "layer": ctx.encoder.layer,
                "sample": j,
                "cos_dist_to_cond": float(cos[r]),
                "rank": int(ranks[r]),
                "n_cond": n,
                "image_pixel_spread": pix,
                "image_rep_spread": rep,
            }
            if keep is not None:
                for name, hit in keep.items():
                    row[f"{name}_keep"] = int(hit[i, j])
                    row[f"{name}_probe_acc"] = acc[name]
            rows.append(row)
    return rows


def _figure(ctx: common.StudyContext, samples: torch.Tensor, k: int, title: str):
    src, n = ctx.sources, len(ctx.sources)
    imgs = as_tiles(samples)
    fig_rows = [[src.show[i], *imgs[i * k : (i + 1) * k]] for i in range(n)]
    labels = [
        src.names[i] + (f"\nlabel {int(src.labels[i])}" if src.labels[i] >= 0 else "") for i in range(n)
    ]
    cols = ["input", *[f"sample {j + 1}" for j in range(k)]]
    return labelled_table(fig_rows, labels, cols, f"{title} ({ctx.describe()})")
