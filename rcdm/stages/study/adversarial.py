"""Study 5, adversarial robustness: how far a small L-inf perturbation moves a representation, whether the
samples change with it, and, with ``--classifier``, whether a supervised classifier's decision does.

Every attack is untargeted L-inf PGD on the encoder-size input ``x`` in [0, 1] pixel units: ``|delta|_inf <=
eps`` (default 4/255), ``x + delta`` kept in [0, 1], a uniform random start in the ball, ``--pgd-steps``
signed-gradient ascent steps of ``--pgd-step`` (default 2.5 * eps / steps), one image at a time. Two
objectives (``--attacks``):

- ``representation``: the cosine distance ``1 - cos(f(x + delta), f(x))`` of the conditioning encoder's
  representation (its layer, trunk or head); scale free, so the numbers compare across encoders and layers.
- ``classifier``: the cross-entropy of the ``--classifier`` network (e.g. the supervised torchvision ResNet-50
  with its ``fc``) with respect to its own prediction on the clean image: the classic supervised adversarial
  example, which the conditioning encoder then sees. Run by default when a classifier is given.

A random sign perturbation of the same size is the baseline. ``x`` is the original's centre crop at the
encoder's own input size (what extraction encoded), so no resize sits in the gradient path; without the
original the study stops (see ``--image-root``), unless ``--allow-upsampled-crops``, and the
``encoder_input`` column says which the encoder saw. The classifier sees the same crops.

Samples from the clean and the attacked representations share their noise; agreement is measured in pixels
(mean absolute difference, [0, 1] units), in representation space (cosine similarity of the two samples'
representations), with ``--probe`` as the fraction of shapes factors predicted equal, and with
``--classifier`` as the classes of the clean and attacked inputs (``class_flipped``) and of the samples
(the fraction of the attacked representation's samples in the clean image's class and in the attacked
image's class).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rcdm.figures import as_tiles, labelled_table, resize_tiles
from rcdm.representations import cosine_distance, encoder_forward, relative_l2
from rcdm.stages.study import common
from rcdm.study_images import to_unit

NAME = "adversarial"
ATTACKS = ("representation", "classifier")

# An objective: built on the clean images [N, 3, R, R], it gives each perturbed image's loss [N] to maximise.
Objective = Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def representation_objective(forward: Callable[[torch.Tensor], torch.Tensor]) -> Objective:
    """``1 - cos(forward(x'), forward(x))`` per image."""

    def build(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            ref = forward(x).detach()
        return lambda z: 1 - F.cosine_similarity(forward(z), ref, dim=-1)

    return build


def classifier_objective(classifier: Callable[[torch.Tensor], torch.Tensor]) -> Objective:
    """Cross-entropy of ``classifier(x')`` against the classifier's prediction on ``x``, per image."""

    def build(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            label = classifier(x).argmax(1)
        return lambda z: F.cross_entropy(classifier(z), label, reduction="none")

    return build


def pgd(
    objective: Objective,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-inf PGD maximising ``objective`` per image; x in [0, 1], from a uniform random start.

    Returns ``x'`` with ``|x' - x|_inf <= eps`` and ``0 <= x' <= 1``.
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be non-negative, got {eps}, {steps}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        loss_of = objective(x)
        noise = torch.rand(x.shape, generator=generator, device=x.device if generator is None else "cpu")
        delta = ((noise.to(x.device) * 2 - 1) * eps).clamp(-x, 1 - x)
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_of(x + delta).sum(), delta)
            with torch.no_grad():
                delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
                delta = torch.max(torch.min(delta, 1 - x), -x)
        return (x + delta.detach()).clamp(0, 1)


def pgd_linf(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`pgd` on the representation objective ``1 - cos(forward(x'), forward(x))``."""
    return pgd(representation_objective(forward), x, eps, steps, step_size, generator=generator)


@torch.no_grad()
def objective_values(objective: Objective, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The objective (built on the clean ``x``) at ``x`` and at ``x_adv``: CPU float [N] each."""
    with torch.inference_mode(False):
        loss_of = objective(x.clone())
        return loss_of(x.clone()).float().cpu(), loss_of(x_adv.clone()).float().cpu()


def random_sign(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline: ``x + eps * random sign`` clipped to [0, 1]."""
    s = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
    return (x + eps * s).clamp(0, 1)


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
        "--attacks",
        default=None,
        help="comma-separated objectives: representation (the encoder's cosine distance), classifier (the "
        "--classifier's cross-entropy); default: representation, plus classifier when one is given",
    )
    g.add_argument(
        "--classifier",
        default=None,
        help="image classifier of the supervised comparison: a torchvision ResNet-50 state dict with its fc "
        "(resnet50-0676ba61.pth) or a factor probe file (rcdm study probe)",
    )
    g.add_argument("--classifier-factor", default="kind", help="the factor probe's head used as classifier")


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def attacks_of(args: argparse.Namespace) -> list[str]:
    """The objectives to run, checked: ``--attacks``, else representation (+ classifier with one given)."""
    if args.attacks is None:
        return ["representation", *(["classifier"] if args.classifier else [])]
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise ValueError(
            f"--attacks takes {' and/or '.join(ATTACKS)} (comma-separated), got {args.attacks!r}"
        )
    if "classifier" in names and not args.classifier:
        raise ValueError("--attacks classifier needs the network to attack: --classifier FILE")
    return list(dict.fromkeys(names))


@dataclass
class Outcome:
    """What one attack changed: representations of the clean, attacked and randomly perturbed inputs, the
    samples of the clean and attacked ones (same noise), their representations, the objective at the clean
    and attacked inputs, and what the probe and the classifier say."""

    f_clean: torch.Tensor
    f_adv: torch.Tensor
    f_rnd: torch.Tensor
    s_clean: torch.Tensor
    s_adv: torch.Tensor
    e_clean: torch.Tensor
    e_adv: torch.Tensor
    objective: tuple[torch.Tensor, torch.Tensor]
    probe_agree: dict[str, torch.Tensor] | None = None
    classes: dict[str, torch.Tensor] = field(default_factory=dict)


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list:
    ctx = common.StudyContext.from_args(args)
    attacks = attacks_of(args)
    classifier = _classifier(args, ctx)
    common.loaded(args, ctx, f"attacks {', '.join(attacks)}")
    x = to_unit(ctx.sources.enc).to(ctx.device)  # each original's crop at the encoder's input size
    objectives = {"representation": representation_objective(lambda z: encoder_forward(ctx.encoder, z))}
    if classifier is not None:
        objectives["classifier"] = classifier_objective(classifier)
    # one generator per use, so each attack's start and the baseline do not depend on which attacks run
    rnd = random_sign(x, args.eps, torch.Generator().manual_seed(args.seed))
    adv = {
        a: attack(objectives[a], x, args.eps, args.pgd_steps, args.pgd_step, args.seed + 1 + ATTACKS.index(a))
        for a in attacks
    }
    res = measure(ctx, x, adv, rnd, args.samples, {a: objectives[a] for a in attacks}, classifier)
    rows = _rows(args, ctx, x, adv, res, classifier)
    out.save_png(_figure(args, ctx, x, adv, res, rows, classifier))
    out.save_csv(rows)
    return []


def _classifier(args: argparse.Namespace, ctx: common.StudyContext):
    if not args.classifier:
        return None
    from rcdm.classifiers import load_classifier

    return load_classifier(
        args.classifier, factor=args.classifier_factor, trust=args.trust_checkpoint, device=ctx.device
    )


def attack(
    objective: Objective, x: torch.Tensor, eps: float, steps: int, step_size: float | None, seed: int
) -> torch.Tensor:
    """PGD-attacked copies of encoder-size inputs ``x`` in [0, 1], one image at a time, random starts from one
    generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(
        [pgd(objective, x[i : i + 1], eps, steps, step_size, generator=gen) for i in range(len(x))]
    )


def measure(
    ctx: common.StudyContext,
    x: torch.Tensor,
    adv: dict[str, torch.Tensor],
    rnd: torch.Tensor,
    k: int,
    objectives: dict[str, Objective],
    classifier=None,
) -> dict[str, Outcome]:
    """Per attack: representations of the three inputs, ``k`` samples from the clean and the attacked one
    (all drawn in one pass, same noises), the objective's values, and what the probe and classifier say."""
    f_clean, f_rnd = ctx.embed_inputs(x), ctx.embed_inputs(rnd)
    f_adv = {a: ctx.embed_inputs(v) for a, v in adv.items()}
    n, names = len(x), list(adv)
    samples = ctx.repeat_samples(torch.cat([f_clean, *f_adv.values()]), k, desc="adversarial")
    s_clean = samples[: n * k]
    e_clean = ctx.embed_samples(s_clean)
    size = int(ctx.encoder.input_size)
    if classifier is not None:
        clean_classes = {
            "clean": classifier.predict(x),
            "random": classifier.predict(rnd),
            "s_clean": classifier.predict_samples(s_clean, size),
        }
    res = {}
    for j, a in enumerate(names, start=1):
        s_adv = samples[j * n * k : (j + 1) * n * k]
        r = Outcome(
            f_clean, f_adv[a], f_rnd, s_clean, s_adv, e_clean, ctx.embed_samples(s_adv),
            objective_values(objectives[a], x, adv[a]),
        )  # fmt: skip
        if ctx.probe is not None:
            from rcdm.probe import agreement

            r.probe_agree = agreement(ctx.probe, (s_clean + 1) / 2, (s_adv + 1) / 2)
        if classifier is not None:
            r.classes = {
                **clean_classes,
                "adv": classifier.predict(adv[a]),
                "s_adv": classifier.predict_samples(s_adv, size),
            }
        res[a] = r
    return res


def _objective_text(attack_name: str, ctx: common.StudyContext, classifier) -> str:
    if attack_name == "representation":
        return f"cosine distance of {ctx.encoder.encoder_name} {ctx.encoder.layer}"
    return f"cross-entropy of {classifier.name} on its clean prediction"


def _rows(args, ctx: common.StudyContext, x, adv: dict, res: dict[str, Outcome], classifier) -> list[dict]:
    src, enc, k = ctx.sources, ctx.encoder, args.samples
    step = 2.5 * args.eps / max(args.pgd_steps, 1) if args.pgd_step is None else args.pgd_step
    rows = []
    for i in range(len(x)):
        b = slice(i * k, (i + 1) * k)
        for a, r in res.items():
            pix_diff = ((r.s_clean[b] - r.s_adv[b]).abs() / 2).flatten(1).mean(1)
            row = {
                "image": src.names[i],
                "encoder": enc.encoder_name,
                "layer": enc.layer,
                "attack": a,
                "objective": _objective_text(a, ctx, classifier),
                "eps": args.eps,
                "pgd_steps": args.pgd_steps,
                "pgd_step": float(step),
                "linf": float((adv[a][i] - x[i]).abs().max()),
                "objective_clean": float(r.objective[0][i]),
                "objective_adv": float(r.objective[1][i]),
                "rep_cos_dist_adv": float(cosine_distance(r.f_adv[i], r.f_clean[i])),
                "rep_rel_l2_adv": float(relative_l2(r.f_adv[i], r.f_clean[i])),
                "rep_cos_dist_random": float(cosine_distance(r.f_rnd[i], r.f_clean[i])),
                "sample_pixel_l1": float(pix_diff.mean()),
                "sample_rep_cos_sim": float(F.cosine_similarity(r.e_clean[b], r.e_adv[b], dim=-1).mean()),
                "sample_cos_dist_clean_rep": float(cosine_distance(r.e_clean[b], r.f_clean[i]).mean()),
                "sample_cos_dist_adv_rep": float(cosine_distance(r.e_adv[b], r.f_clean[i]).mean()),
                "encoder_input": common.encoder_input_label(src, i),
            }
            for name, agree in (r.probe_agree or {}).items():
                row[f"probe_agree_{name}"] = float(agree[b].float().mean())
            if r.classes:
                cls = r.classes
                c_clean, c_adv = int(cls["clean"][i]), int(cls["adv"][i])
                row.update(
                    classifier=classifier.name,
                    class_clean=c_clean,
                    class_adv=c_adv,
                    class_clean_name=classifier.class_name(c_clean),
                    class_adv_name=classifier.class_name(c_adv),
                    class_flipped=int(c_clean != c_adv),
                    class_flipped_random=int(c_clean != int(cls["random"][i])),
                    samples_clean_in_class_clean=float((cls["s_clean"][b] == c_clean).float().mean()),
                    samples_adv_in_class_clean=float((cls["s_adv"][b] == c_clean).float().mean()),
                    samples_adv_in_class_adv=float((cls["s_adv"][b] == c_adv).float().mean()),
                    sample_class_agree=float((cls["s_clean"][b] == cls["s_adv"][b]).float().mean()),
                )
            rows.append(row)
    return rows


def _figure(
    args, ctx: common.StudyContext, x, adv: dict, res: dict[str, Outcome], rows: list[dict], classifier
):
    src, k = ctx.sources, args.samples
    size = src.show.shape[1]
    first = next(iter(res.values()))
    img_clean = as_tiles(first.s_clean)
    fig_rows, labels = [], []
    by_key = {(r["image"], r["attack"]): r for r in rows}
    for i in range(len(src)):
        fig_rows.append([src.show[i], None, *img_clean[i * k : (i + 1) * k]])
        row0 = by_key[(src.names[i], next(iter(res)))]
        labels.append(f"{src.names[i]} clean" + (f"\n[{row0['class_clean_name']}]" if classifier else ""))
        for a, r in res.items():
            row = by_key[(src.names[i], a)]
            show_adv = resize_tiles(as_tiles(adv[a][i : i + 1].cpu(), low=0.0), size)[0]
            moved = (adv[a][i : i + 1] - x[i : i + 1]).cpu()
            delta = (0.5 + moved * (0.5 / max(args.eps, 1e-12))).clamp(0, 1)
            delta_vis = resize_tiles(as_tiles(delta, low=0.0), size)[0]
            fig_rows.append([show_adv, delta_vis, *as_tiles(r.s_adv[i * k : (i + 1) * k])])
            label = f"PGD on {a}\ncos dist {row['rep_cos_dist_adv']:.3f}"
            if classifier:
                label += f"\n[{row['class_adv_name']}]" + (" flipped" if row["class_flipped"] else "")
            labels.append(label)
    cols = ["input", "delta\n(x 0.5/eps)", *[f"sample {j + 1}" for j in range(k)]]
    clf = f"; classes: {classifier.name}" if classifier else ""
    attack = f"L-inf eps={args.eps * 255:.1f}/255, {args.pgd_steps} PGD steps"
    title = f"Adversarial ({attack}; {ctx.describe()}{clf})"
    return labelled_table(fig_rows, labels, cols, title)
