"""Study 6, interpolation: samples along a path between two images' representations, with the same noise.

For each pair of conditioning images (A, B) and each method (``linear``: ``(1 - t) a + t b``; ``spherical``:
the direction moves along the great circle between ``a/|a|`` and ``b/|b|`` while the norm moves linearly from
``|a|`` to ``|b|``) the representation is sampled at ``--steps-between`` values of t in [0, 1] (endpoints
included), every point from the same initial noise, so the figure shows only what the representation changes.
Numbers: for each point, the cosine distance of the interpolated vector and of its samples' representations
to A's and to B's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rcdm.figures import as_tiles, labelled_table
from rcdm.representations import cosine_distance
from rcdm.stages.study import common

NAME = "interpolate"
METHODS = ("linear", "spherical")


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation: [D], [D], [T] -> [T, D]."""
    t = t.to(a.dtype)[:, None]
    return (1 - t) * a[None] + t * b[None]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of the direction with the norm interpolated linearly: [D], [D], [T] -> [T, D].

    Endpoints are exactly ``a`` and ``b``. Nearly parallel directions fall back to normalised linear
    interpolation of the directions (the great circle is then numerically a chord).
    """
    t = t.to(a.dtype)[:, None]
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return lerp(a, b, t[:, 0])
    ua, ub = a / na, b / nb
    cos = (ua * ub).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega) < eps:
        direction = F.normalize((1 - t) * ua[None] + t * ub[None], dim=-1)
    else:
        direction = (torch.sin((1 - t) * omega) * ua[None] + torch.sin(t * omega) * ub[None]) / torch.sin(
            omega
        )
    norm = (1 - t) * na + t * nb
    direction = torch.where(t == 0, ua[None], torch.where(t == 1, ub[None], direction))
    return direction * norm


def interpolate(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    if method == "linear":
        return lerp(a, b, t)
    if method == "spherical":
        return slerp(a, b, t)
    raise ValueError(f"unknown interpolation method {method!r}; choose from {', '.join(METHODS)}")


def interpolation_samples(
    ctx: common.StudyContext,
    feats: torch.Tensor,
    pairs: list[tuple[int, int]],
    methods: list[str],
    t: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """(conditionings [M, D], samples [M, 3, S, S], row keys (pair, i, j, method, step, noise)); the rows are
    ordered pair, method, step, noise, and noise n is the same initial noise at every step."""
    conds, noise_idx, meta = [], [], []
    for p, (i, j) in enumerate(pairs):
        for m in methods:
            path = interpolate(feats[i], feats[j], t, m)
            for s in range(len(t)):
                for n in range(k):
                    conds.append(path[s])
                    noise_idx.append(n)
                    meta.append((p, i, j, m, s, n))
    conds_t = torch.stack(conds)
    return conds_t, ctx.sample(conds_t, noise_idx, desc="interpolation"), meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=1)
    parser.set_defaults(num_images=2)
    g = parser.add_argument_group("interpolation")
    g.add_argument("--steps-between", type=int, default=7, help="points on each path, endpoints included")
    g.add_argument("--methods", default="linear,spherical", help="comma-separated: linear, spherical")
    g.add_argument(
        "--pairs",
        default=None,
        help="pairs of image positions 'i-j,k-l' (default: consecutive images 0-1, 2-3, ...)",
    )


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown interpolation method {m!r}; choose from {', '.join(METHODS)}")
    if args.steps_between < 2:
        raise ValueError(f"--steps-between must be at least 2, got {args.steps_between}")
    ctx = common.StudyContext.from_args(args)
    feats = ctx.clean_features()
    pairs = common.parse_pairs(args.pairs, len(ctx.sources))
    common.loaded(args, ctx, f"{len(pairs)} pairs")
    t = torch.linspace(0, 1, args.steps_between)
    conds_t, samples, meta = interpolation_samples(ctx, feats, pairs, methods, t, args.samples)
    out.save_png(_figure(ctx, pairs, methods, t, samples, args.samples))
    out.save_csv(_rows(ctx, feats, t, conds_t, samples, meta))
    return []


def _rows(ctx: common.StudyContext, feats, t, conds_t, samples, meta) -> list[dict]:
    """Per sample: distances of its conditioning and of its representation to both ends."""
    src = ctx.sources
    emb = ctx.embed_samples(samples)
    rows = []
    for r, (p, i, j, m, s, n) in enumerate(meta):
        a, b = feats[i], feats[j]
        rows.append(
            {
                "pair": p,
                "image_a": src.names[i],
                "image_b": src.names[j],
                "method": m,
                "t": float(t[s]),
                "sample": n,
                "cond_cos_dist_a": float(cosine_distance(conds_t[r], a)),
                "cond_cos_dist_b": float(cosine_distance(conds_t[r], b)),
                "cond_norm": float(conds_t[r].norm()),
                "sample_cos_dist_a": float(cosine_distance(emb[r], a.to(emb))),
                "sample_cos_dist_b": float(cosine_distance(emb[r], b.to(emb))),
            }
        )
    return rows


def _figure(ctx: common.StudyContext, pairs, methods, t, samples, k: int):
    src = ctx.sources
    imgs = as_tiles(samples)
    per = len(t) * k
    fig_rows, labels = [], []
    for p, (i, j) in enumerate(pairs):
        for mi, m in enumerate(methods):
            base = (p * len(methods) + mi) * per
            for n in range(k):
                tiles = [imgs[base + s * k + n] for s in range(len(t))]
                fig_rows.append([src.show[i], *tiles, src.show[j]])
                labels.append(f"{src.names[i]}->{src.names[j]}\n{m}" + (f" #{n}" if k > 1 else ""))
    cols = ["A", *[f"t={float(v):.2f}" for v in t], "B"]
    title = f"Interpolation ({ctx.describe()}), same noise along each row"
    return labelled_table(fig_rows, labels, cols, title)
