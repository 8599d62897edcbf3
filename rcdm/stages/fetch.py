"""``rcdm fetch``: download missing weight files (encoders, RCDM checkpoints, Inception) into a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rcdm.weights import GROUPS, ChecksumError, expand, fetch, markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = ", ".join(GROUPS)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"names, file names or groups ({groups})")
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"), help="where weight files live")
    parser.add_argument("--list", action="store_true", help="print the registry as a markdown table and exit")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(markdown_table(), end="")
        return 0
    if not args.names:
        print("rcdm fetch: name at least one file or group (see --list)", file=sys.stderr)
        return 2
    failed = 0
    for name in expand(args.names):
        try:
            path, status = fetch(name, args.weights_dir, timeout=args.timeout)
        except (ConnectionError, ChecksumError) as err:
            print(f"{name}: FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: {status} {path}")
    return 1 if failed else 0
