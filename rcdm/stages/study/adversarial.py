"""Study 5, adversarial robustness: how far a small L-inf perturbation moves a representation, and whether the
samples change with it.

The attack is untargeted PGD on the encoder's input: maximise the cosine distance between the representation
of ``x + delta`` and that of ``x``, with ``|delta|_inf <= eps`` in [0, 1] pixel units (default 4/255) and
``x + delta`` kept in [0, 1], from a uniform random start (at delta = 0 the gradient of the distance is zero),
signed-gradient steps of ``--pgd-step`` (default 2.5 * eps / steps). The cosine distance is scale free, so the
numbers compare across encoders and layers. A random sign perturbation of the same size is the baseline.
``x`` is the original's centre crop at the encoder's own input size (what extraction encoded), so no resize
sits in the gradient path; without the original the study stops (see ``--image-root``), unless
``--allow-upsampled-crops``, and the ``encoder_input`` column says which the encoder saw.

Samples from the clean and the perturbed representation share their noise; agreement is measured in pixels
(mean absolute difference, [0, 1] units), in representation space (cosine similarity of the two samples'
representations), with ``--probe`` as the fraction of shapes factors predicted equal, and with
``--classifier`` (a linear classifier on the trunk, e.g. the supervised ResNet-50's ``fc``) as class changes
of the input and agreement of the samples' classes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rcdm.figures import as_tiles, labelled_table, resize_tiles
from rcdm.io import safe_torch_load
from rcdm.representations import cosine_distance, encoder_forward, relative_l2
from rcdm.stages.study import common
from rcdm.study_images import to_unit

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


@dataclass
class Outcome:
    """What the attack changed: representations of the clean, attacked and randomly perturbed inputs, the
    samples of the clean and attacked ones (same noise) and their representations, and their agreement."""

    f_clean: torch.Tensor
    f_adv: torch.Tensor
    f_rnd: torch.Tensor
    s_clean: torch.Tensor
    s_adv: torch.Tensor
    e_clean: torch.Tensor
    e_adv: torch.Tensor
    probe_agree: dict[str, torch.Tensor] | None = None
    classes: dict[str, torch.Tensor] = field(default_factory=dict)


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    ctx = common.StudyContext.from_args(args)
    classifier = _classifier(args, ctx)
    x = to_unit(ctx.sources.enc).to(ctx.device)  # each original's crop at the encoder's input size
    adv, rnd = attack_inputs(ctx.encoder, x, args.eps, args.pgd_steps, args.pgd_step, args.seed)
    res = measure(ctx, x, adv, rnd, args.samples, classifier)
    rows = _rows(args, ctx, x, adv, res)
    out.save_png(_figure(args, ctx, x, adv, res, rows))
    out.save_csv(rows)
    return []


def _classifier(args: argparse.Namespace, ctx: common.StudyContext) -> torch.nn.Linear | None:
    if not args.classifier:
        return None
    if ctx.encoder.layer != "trunk":
        raise ValueError("--classifier applies to trunk representations: use --layer trunk")
    return load_linear_classifier(args.classifier, int(ctx.encoder.dim)).to(ctx.device)


def attack_inputs(
    encoder, x: torch.Tensor, eps: float, steps: int, step_size: float | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(PGD-attacked, randomly perturbed) copies of encoder-size inputs ``x`` in [0, 1], one image at a time,
    from one generator seeded by ``seed``; the attack differentiates the encoder at its own resolution."""
    gen = torch.Generator().manual_seed(seed)
    adv = torch.cat(
        [
            pgd_linf(
                lambda z: encoder_forward(encoder, z), x[i : i + 1], eps, steps, step_size, generator=gen
            )
            for i in range(len(x))
        ]
    )
    return adv, random_sign(x, eps, gen)


def measure(ctx: common.StudyContext, x, adv, rnd, k: int, classifier=None) -> Outcome:
    """Representations of the three inputs, ``k`` samples from the clean and the attacked one, and what
    the probe and the classifier say about them."""
    f_clean, f_adv, f_rnd = ctx.embed_inputs(x), ctx.embed_inputs(adv), ctx.embed_inputs(rnd)
    n = len(x)
    samples = ctx.repeat_samples(torch.cat([f_clean, f_adv]), k, desc="adversarial")
    s_clean, s_adv = samples[: n * k], samples[n * k :]
    res = Outcome(f_clean, f_adv, f_rnd, s_clean, s_adv, ctx.embed_samples(s_clean), ctx.embed_samples(s_adv))
    if ctx.probe is not None:
        from rcdm.probe import agreement

        res.probe_agree = agreement(ctx.probe, (s_clean + 1) / 2, (s_adv + 1) / 2)
    if classifier is not None:
        with torch.inference_mode():
            for key, feats in (
                ("clean", f_clean),
                ("adv", f_adv),
                ("s_clean", res.e_clean),
                ("s_adv", res.e_adv),
            ):
                res.classes[key] = classifier(feats.to(ctx.device)).argmax(1).cpu()
    return res


def _rows(args: argparse.Namespace, ctx: common.StudyContext, x, adv, res: Outcome) -> list[dict]:
    src, enc, k = ctx.sources, ctx.encoder, args.samples
    pix_diff = ((res.s_clean - res.s_adv).abs() / 2).flatten(1).mean(1).view(len(x), k)
    rep_agree = F.cosine_similarity(res.e_clean, res.e_adv, dim=-1).view(len(x), k)
    rows = []
    for i in range(len(x)):
        b = slice(i * k, (i + 1) * k)
        row = {
            "image": src.names[i],
            "encoder": enc.encoder_name,
            "layer": enc.layer,
            "eps": args.eps,
            "pgd_steps": args.pgd_steps,
            "linf": float((adv[i] - x[i]).abs().max()),
            "rep_cos_dist_adv": float(cosine_distance(res.f_adv[i], res.f_clean[i])),
            "rep_rel_l2_adv": float(relative_l2(res.f_adv[i], res.f_clean[i])),
            "rep_cos_dist_random": float(cosine_distance(res.f_rnd[i], res.f_clean[i])),
            "sample_pixel_l1": float(pix_diff[i].mean()),
            "sample_rep_cos_sim": float(rep_agree[i].mean()),
            "sample_cos_dist_clean_rep": float(cosine_distance(res.e_clean[b], res.f_clean[i]).mean()),
            "sample_cos_dist_adv_rep": float(cosine_distance(res.e_adv[b], res.f_clean[i]).mean()),
            "encoder_input": common.encoder_input_label(src, i),
        }
        for name, agree in (res.probe_agree or {}).items():
            row[f"probe_agree_{name}"] = float(agree[b].float().mean())
        if res.classes:
            cls = res.classes
            row["class_clean"] = int(cls["clean"][i])
            row["class_adv"] = int(cls["adv"][i])
            row["class_changed"] = int(cls["clean"][i] != cls["adv"][i])
            row["sample_class_agree"] = float((cls["s_clean"][b] == cls["s_adv"][b]).float().mean())
        rows.append(row)
    return rows


def _figure(args: argparse.Namespace, ctx: common.StudyContext, x, adv, res: Outcome, rows: list[dict]):
    src, k = ctx.sources, args.samples
    size = src.show.shape[1]
    show_adv = resize_tiles(as_tiles(adv.cpu(), low=0.0), size)
    delta = (0.5 + (adv - x).cpu() * (0.5 / max(args.eps, 1e-12))).clamp(0, 1)
    delta_vis = resize_tiles(as_tiles(delta, low=0.0), size)
    img_clean, img_adv = as_tiles(res.s_clean), as_tiles(res.s_adv)
    fig_rows, labels = [], []
    for i in range(len(src)):
        fig_rows.append([src.show[i], None, *img_clean[i * k : (i + 1) * k]])
        labels.append(f"{src.names[i]} clean")
        fig_rows.append([show_adv[i], delta_vis[i], *img_adv[i * k : (i + 1) * k]])
        labels.append(f"{src.names[i]} PGD\ncos dist {rows[i]['rep_cos_dist_adv']:.3f}")
    cols = ["input", "delta\n(x 0.5/eps)", *[f"sample {j + 1}" for j in range(k)]]
    title = f"Adversarial (L-inf eps={args.eps * 255:.1f}/255, {args.pgd_steps} PGD steps; {ctx.describe()})"
    return labelled_table(fig_rows, labels, cols, title)
