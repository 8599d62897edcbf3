"""Command line entry point: ``rcdm <stage> [options]``.

Each stage lives in its own module under ``rcdm/stages/``, which exposes ``add_arguments(parser)`` and
``run(args) -> int | None``. Modules are imported lazily so ``rcdm --help`` stays fast and a stage's heavy
imports cost only that stage. A missing or broken input file (:class:`rcdm.errors.InputFileError`) is one
line on stderr, ``rcdm <stage>: error: <file>: <problem>; <what to do>``, and exit status
:data:`rcdm.errors.EXIT_PERMANENT` (1), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rcdm.errors import EXIT_PERMANENT, InputFileError

# stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "fetch": ("rcdm.stages.fetch", "download missing weight files (encoders, RCDM checkpoints, Inception)"),
    "pretrain": ("rcdm.stages.pretrain", "train a small self-supervised encoder (demo / own domain)"),
    "extract": ("rcdm.stages.extract", "decode, crop and encode a dataset into HDF5 (sharded)"),
    "merge-extract": ("rcdm.stages.merge_extract", "merge extraction shards into one HDF5 file"),
    "train": ("rcdm.stages.train", "train the representation-conditioned diffusion model"),
    "sample": ("rcdm.stages.sample", "generate samples conditioned on representations (sharded)"),
    "merge-samples": ("rcdm.stages.merge_samples", "merge sample shards into samples.npz and PNG grids"),
    "evaluate": ("rcdm.stages.evaluate", "FID, IS, FD_rep, rank and MRR of a sample set"),
    "tabulate": ("rcdm.stages.tabulate", "merge metrics.csv files into result tables"),
    "study": (
        "rcdm.stages.study",
        "run one of the paper's studies (ood, trunk-head, augment, adversarial, ...)",
    ),
    "flags": ("rcdm.stages.flags", "the full model flags of an RCDM checkpoint (published or ours), as JSON"),
    "bench": ("rcdm.stages.bench", "measure throughput and memory of each stage"),
    "tradeoff": (
        "rcdm.stages.tradeoff",
        "sampler speed versus quality: FD_rep and MRR against UNet evaluations",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcdm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown stage {argv[0]!r}; choose from {', '.join(STAGES)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(STAGES[name][0])
    parser = argparse.ArgumentParser(prog=f"rcdm {name}", description=STAGES[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except InputFileError as err:
        print(f"rcdm {name}: error: {err}", file=sys.stderr)
        return EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
