"""``rcdm study NAME ...``: the paper's studies, one module each, every one writing a labelled PNG figure
and a CSV of its numbers into ``--out`` (see ``rcdm study NAME --help``).

- ``conditioned``: validation images, each followed by k samples (Fig. 1a)
- ``ood``: the same for out-of-distribution images (scikit-image photos or any folder; Fig. 1b)
- ``trunk-head``: the same images and noise conditioned on trunk and on head representations
- ``augment``: SSL augmentations at several strengths: representation distance, kept factors
- ``adversarial``: L-inf PGD on the encoder input: representation change and sample agreement
- ``interpolate``: linear and spherical paths between two representations, same noise
- ``manipulate``: shared dimensions of an image's nearest neighbours zeroed / replaced (published script)
- ``probe``: trains the shapes factor probe the other studies use with ``--probe``
"""

from __future__ import annotations

import argparse
import importlib

STUDIES: dict[str, tuple[str, str]] = {
    "conditioned": ("rcdm.stages.study.conditioned", "validation images, each followed by k samples"),
    "ood": (
        "rcdm.stages.study.ood",
        "out-of-distribution images (photos or a folder), each followed by k samples",
    ),
    "trunk-head": ("rcdm.stages.study.trunk_head", "trunk vs head conditioning, same images and noise"),
    "augment": ("rcdm.stages.study.augment", "augmentation invariance of the representation"),
    "adversarial": (
        "rcdm.stages.study.adversarial",
        "L-inf PGD on the input: representation and sample change",
    ),
    "interpolate": (
        "rcdm.stages.study.interpolate",
        "linear / spherical interpolation between representations",
    ),
    "manipulate": ("rcdm.stages.study.manipulate", "zero / replace dimensions shared by nearest neighbours"),
    "probe": ("rcdm.stages.study.probe", "train the shapes factor probe used by --probe"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each option's default (when it has a real one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = (
            action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        )
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per study, each with its module's options."""
    sub = parser.add_subparsers(dest="study", metavar="NAME", required=True)
    for name, (module_name, help_text) in STUDIES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=_Formatter,
        )
        module.add_arguments(p)


def run(args: argparse.Namespace) -> int | None:
    """Dispatch to the chosen study's ``run``."""
    if args.study not in STUDIES:
        raise SystemExit(f"unknown study {args.study!r}; choose from {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[args.study][0]).run(args)
