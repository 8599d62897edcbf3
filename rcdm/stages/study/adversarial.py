"""Study 5, adversarial robustness: how far a small L-inf perturbation moves a representation, and whether the
samples change with it.

The attack is untargeted PGD on the encoder's input: maximise the cosine distance between the representation
of ``x + delta`` and that of ``x``, with ``|delta|_inf <= eps`` in [0, 1] pixel units (default 4/255) and
``x + delta`` kept in [0, 1], from a uniform random start (at delta = 0 the gradient of the distance is zero),
signed-gradient steps of ``--pgd-step`` (default 2.5 * eps / steps). The cosine distance is scale free, so the
numbers compare across encoders and layers. A random sign perturbation of the same size is the baseline.

Samples from the clean and the perturbed representation share their noise; agreement is measured in pixels
(mean absolute difference, [0, 1] units), in representation space (cosine similarity of the two samples'
representations), with ``--probe`` as the fraction of shapes factors predicted equal, and with
``--classifier`` (a linear classifier on the trunk, e.g. the supervised ResNet-50's ``fc``) as class changes
of the input and agreement of the samples' classes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rcdm.io import safe_torch_load
from rcdm.stages.study import common

NAME = "adversarial"


def pgd_linf(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf PGD maximising ``1 - cos(forward(x'), forward(x))`` per image; x in [0, 1].

    Returns ``x'`` with ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``.
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be non-negative, got {eps}, {steps}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        with torch.no_grad():
            ref = forward(x).detach()
        noise = torch.rand(x.shape, generator=generator, device=x.device if generator is None else "cpu")
        delta = ((noise.to(x.device) * 2 - 1) * eps).clamp(-x, 1 - x)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = (1 - F.cosine_similarity(forward(x + delta), ref, dim=-1)).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
                delta = torch.max(torch.min(delta, 1 - x), -x)
        return (x + delta.detach()).clamp(0, 1)


def random_sign(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline: ``x + eps * random sign`` clipped to [0, 1]."""
    s = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
    return (x + eps * s).clamp(0, 1)


def load_linear_classifier(path: str, dim: int) -> torch.nn.Linear:
    """A linear classifier from a state dict with ``fc.weight``/``fc.bias`` (torchvision) or ``weight``."""
    sd = safe_torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    prefix = "fc." if "fc.weight" in sd else ""
    if f"{prefix}weight" not in sd:
        raise KeyError(f"{path}: no 'fc.weight' or 'weight' tensor for a linear classifier")
    w = sd[f"{prefix}weight"]
    if w.ndim != 2 or w.shape[1] != dim:
        raise ValueError(f"{path}: classifier weight {tuple(w.shape)} does not take {dim}-d representations")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{prefix}bias" in sd)
    lin.weight.data.copy_(w)
    if lin.bias is not None:
        lin.bias.data.copy_(sd[f"{prefix}bias"])
    return lin.eval().requires_grad_(False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=3)
    parser.set_defaults(num_images=3)
    g = parser.add_argument_group("attack")
    g.add_argument(
        "--eps", type=float, default=4 / 255, help="L-inf radius in [0, 1] pixel units (4/255 = 0.0157)"
    )
    g.add_argument("--pgd-steps", type=int, default=10, help="PGD iterations")
    g.add_argument("--pgd-step", type=float, default=None, help="PGD step size (default 2.5 * eps / steps)")
    g.add_argument(
        "--classifier", default=None, help="linear classifier on the trunk (e.g. torchvision ResNet-50)"
    )


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    ctx = common.StudyContext.from_args(args)
    src, k, enc = ctx.sources, args.samples, ctx.encoder
    classifier = None
    if args.classifier:
        if enc.layer != "trunk":
            raise ValueError("--classifier applies to trunk representations: use --layer trunk")
        classifier = load_linear_classifier(args.classifier, int(enc.dim)).to(ctx.device)

    x = common.to_unit(src.enc).to(ctx.device)
    gen = torch.Generator().manual_seed(args.seed)
    adv = torch.cat(
        [
            pgd_linf(
                lambda z: common.encoder_forward(enc, z),
                x[i : i + 1],
                args.eps,
                args.pgd_steps,
                args.pgd_step,
                generator=gen,
            )  # fmt: skip
            for i in range(len(x))
        ]
    )
    rnd = random_sign(x, args.eps, gen)
    f_clean, f_adv, f_rnd = ctx.embed_unit(x), ctx.embed_unit(adv), ctx.embed_unit(rnd)

    n = len(src)
    samples = ctx.repeat_samples(torch.cat([f_clean, f_adv]), k, desc="adversarial")
    s_clean, s_adv = samples[: n * k], samples[n * k :]
    e_clean, e_adv = ctx.embed_samples(s_clean), ctx.embed_samples(s_adv)
    pix_diff = ((s_clean - s_adv).abs() / 2).flatten(1).mean(1).view(n, k)
    rep_agree = F.cosine_similarity(e_clean, e_adv, dim=-1).view(n, k)

    probe_agree = None
    if ctx.probe is not None:
        from rcdm.stages.study.probe import agreement

        probe_agree = agreement(ctx.probe, (s_clean + 1) / 2, (s_adv + 1) / 2)
    cls = {}
    if classifier is not None:
        with torch.inference_mode():
            for key, feats in (("clean", f_clean), ("adv", f_adv), ("s_clean", e_clean), ("s_adv", e_adv)):
                cls[key] = classifier(feats.to(ctx.device)).argmax(1).cpu()

    rows = []
    for i in range(n):
        row = {
            "image": src.names[i],
            "encoder": enc.encoder_name,
            "layer": enc.layer,
            "eps": args.eps,
            "pgd_steps": args.pgd_steps,
            "linf": float((adv[i] - x[i]).abs().max()),
            "rep_cos_dist_adv": float(common.cosine_distance(f_adv[i], f_clean[i])),
            "rep_rel_l2_adv": float(common.relative_l2(f_adv[i], f_clean[i])),
            "rep_cos_dist_random": float(common.cosine_distance(f_rnd[i], f_clean[i])),
            "sample_pixel_l1": float(pix_diff[i].mean()),
            "sample_rep_cos_sim": float(rep_agree[i].mean()),
            "sample_cos_dist_clean_rep": float(
                common.cosine_distance(e_clean[i * k : (i + 1) * k], f_clean[i]).mean()
            ),
            "sample_cos_dist_adv_rep": float(
                common.cosine_distance(e_adv[i * k : (i + 1) * k], f_clean[i]).mean()
            ),
        }
        if probe_agree is not None:
            for name, agree in probe_agree.items():
                row[f"probe_agree_{name}"] = float(agree[i * k : (i + 1) * k].float().mean())
        if cls:
            row["class_clean"] = int(cls["clean"][i])
            row["class_adv"] = int(cls["adv"][i])
            row["class_changed"] = int(cls["clean"][i] != cls["adv"][i])
            same = cls["s_clean"][i * k : (i + 1) * k] == cls["s_adv"][i * k : (i + 1) * k]
            row["sample_class_agree"] = float(same.float().mean())
        rows.append(row)

    show_clean = src.show
    show_adv = common.to_uint8(common.resize(adv.cpu(), show_clean.shape[1]), low=0.0)
    delta_vis = common.to_uint8(
        common.resize(
            (0.5 + (adv - x).cpu() * (0.5 / max(args.eps, 1e-12))).clamp(0, 1), show_clean.shape[1]
        ),
        low=0.0,
    )
    img_clean, img_adv = common.to_uint8(s_clean), common.to_uint8(s_adv)
    fig_rows, labels = [], []
    for i in range(n):
        fig_rows.append([show_clean[i], None, *img_clean[i * k : (i + 1) * k]])
        labels.append(f"{src.names[i]} clean")
        fig_rows.append([show_adv[i], delta_vis[i], *img_adv[i * k : (i + 1) * k]])
        labels.append(f"{src.names[i]} PGD\ncos dist {rows[i]['rep_cos_dist_adv']:.3f}")
    cols = ["input", "delta\n(x 0.5/eps)", *[f"sample {j + 1}" for j in range(k)]]
    title = f"Adversarial (L-inf eps={args.eps * 255:.1f}/255, {args.pgd_steps} PGD steps; {ctx.describe()})"
    out.save_png(common.labelled_table(fig_rows, labels, cols, title))
    out.save_csv(rows)
    return []
