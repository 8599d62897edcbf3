"""Study 2, out-of-distribution conditioning: samples conditioned on images unlike the training data.

The conditioning set is ``--dataset photos`` (the photographs bundled with scikit-image: astronaut, coffee,
chelsea, rocket, Hubble deep field, microscopy, ...) or any image folder; each image is centre-cropped for the
encoder as extraction does. Figure and numbers as in ``conditioned``.
"""

from __future__ import annotations

import argparse

from rcdm.stages.study import common
from rcdm.stages.study.conditioned import conditioned_study

NAME = "ood"
TITLE = "Samples conditioned on out-of-distribution images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_standard_arguments(parser, samples=4)
    parser.set_defaults(dataset="photos", num_images=4)


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: conditioned_study(args, out, TITLE))
