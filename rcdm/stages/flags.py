"""Stage ``rcdm flags``: the full model flags of an RCDM checkpoint file, as JSON.

What sampling, the studies and the tradeoff rebuild the network with: the flags a training checkpoint records,
else the published 128 px flags updated with what the file shows (``ssl_dim``, ``learn_sigma``,
``num_channels``, ``channel_mult``, ...), then ``--model-flags`` on top. The file is loaded strictly on the
meta device (no weights allocated) to prove the flags fit it, so a workflow that starts from a published
checkpoint fails here, in seconds, rather than in its first GPU job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rcdm.checkpoint import CheckpointMismatchError, checkpoint_flags
from rcdm.errors import reading
from rcdm.factory import UnknownFlagError, model_flags_file, read_model_flags
from rcdm.io import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="RCDM checkpoint (published, an export, or a training checkpoint)")
    parser.add_argument(
        "--model-flags", help="flags that cannot be read off the file (JSON or YAML/JSON file)"
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow files that unpickle code")


#: what to do about a checkpoint that cannot be read
CHECKPOINT_FIX = (
    "delete it and get it again (`rcdm fetch` downloads a published one; Snakemake trains ours again), "
    "or fix the path"
)


def run(args: argparse.Namespace) -> int:
    with reading(model_flags_file(args.model_flags)):
        overrides = read_model_flags(args.model_flags)
    try:
        with reading(args.checkpoint, fix=CHECKPOINT_FIX):
            flags = checkpoint_flags(args.checkpoint, overrides, trust=args.trust_checkpoint)
    except (ValueError, UnknownFlagError, CheckpointMismatchError) as err:  # flags that do not fit the file
        print(f"rcdm flags: {args.checkpoint}: {err}", file=sys.stderr)
        return 1
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(flags, indent=2, sort_keys=True))
    print(args.out)
    return 0
