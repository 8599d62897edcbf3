"""Stage ``rcdm merge-extract``: concatenate the shard parts of one extraction output into the final file.

Every part must be present, complete and consistent (same kind, settings and datasets; shards 0..k-1 whose
slices tile the whole selection); the merged file is their row-wise concatenation, copied in blocks
(memory bounded), written atomically, with ``num_images``, ``num_bad`` and ``paths_sha256`` recomputed. An
already merged output is a no-op.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
from tqdm import tqdm

from rcdm import finished
from rcdm.errors import InputFileError, reading
from rcdm.formats import hdf5 as hs
from rcdm.io import atomic_path

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20


class MergeError(ValueError):
    """Parts that cannot be merged: missing, incomplete, or inconsistent."""


class PartError(InputFileError, MergeError):
    """One part that cannot be merged: names it and how to make it again."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(path, problem, part_fix(path))


def part_fix(path: str | Path) -> str:
    """What to do about a missing or broken part: (delete it and) make that extraction shard again."""
    parsed = hs.parse_part_path(path)
    shard = f"shard {parsed[1]} of {parsed[2]}" if parsed else "its shard"
    opts = f" --shard {parsed[1]} --num-shards {parsed[2]}" if parsed else ""
    rerun = (
        f"rerun the extraction of {shard} (Snakemake's extract_images / extract_features job makes it; "
        f"outside Snakemake, `rcdm extract ...{opts}`)"
    )
    return f"delete it and {rerun}" if Path(path).exists() else rerun


def find_parts(out: str | Path, num_shards: int) -> list[Path]:
    """The ``num_shards`` part files of output ``out``; a missing one is a :class:`PartError` naming the
    first and counting all."""
    parts = [hs.part_path(out, i, num_shards) for i in range(num_shards)]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        others = f" (and {len(missing) - 1} more of the {num_shards} parts)" if len(missing) > 1 else ""
        raise PartError(missing[0], f"part missing{others}")
    return parts


def _datasets(h5: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    h5.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _layout(h5: h5py.File) -> dict[str, tuple]:
    return {
        name: (ds.shape[1:], ds.dtype.str if ds.dtype.kind != "O" else "str")
        for name, ds in _datasets(h5).items()
    }


def _validate(parts: Sequence[Path], deep: bool) -> tuple[list[Path], list[dict[str, Any]]]:
    """Check each part and their consistency; return them sorted by shard with their attributes."""
    infos = []
    for p in parts:
        if not Path(p).is_file():
            raise PartError(p, "part missing")
        try:
            with reading(p, fix=part_fix(p)):
                infos.append((hs.check_file(p, deep=deep), Path(p)))
        except InputFileError as err:
            raise PartError(p, f"not a complete extraction file: {err.problem}") from err
        named = hs.parse_part_path(p)
        if named is not None and (infos[-1][0].get("shard"), infos[-1][0].get("num_shards")) != named[1:]:
            found = f"shard {infos[-1][0].get('shard')} of {infos[-1][0].get('num_shards')}"
            raise PartError(p, f"holds {found}, not shard {named[1]} of {named[2]} as its name says")
    infos.sort(key=lambda ap: ap[0].get("shard", -1))
    attrs = [a for a, _ in infos]
    paths = [p for _, p in infos]
    k = len(parts)
    shards = [a.get("shard") for a in attrs]
    if shards != list(range(k)) or any(a.get("num_shards") != k for a in attrs):
        raise MergeError(
            f"expected shards 0..{k - 1} of {k}, found shards {shards} "
            f"of {[a.get('num_shards') for a in attrs]}"
        )
    ref = {key: v for key, v in attrs[0].items() if key not in hs.SHARD_ATTRS}
    for a, p in zip(attrs[1:], paths[1:]):
        diff = sorted(
            key for key in set(ref) | set(a) if key not in hs.SHARD_ATTRS and a.get(key) != ref.get(key)
        )
        if diff:
            raise PartError(p, f"made with other settings than {paths[0]} ({', '.join(diff)})")
    bounds = [(a["shard_start"], a["shard_stop"]) for a in attrs]
    expected_start = 0
    for (start, stop), p in zip(bounds, paths):
        if start != expected_start:
            raise PartError(p, f"covers [{start}, {stop}) but the previous part ended at {expected_start}")
        expected_start = stop
    if expected_start != ref["source_size"]:
        raise MergeError(f"the parts cover [0, {expected_start}) of {ref['source_size']} images")
    with h5py.File(paths[0], "r") as h5:
        layout = _layout(h5)
    for p in paths[1:]:
        with h5py.File(p, "r") as h5:
            if _layout(h5) != layout:
                raise PartError(p, f"has other datasets/shapes/dtypes than {paths[0]}")
    return paths, attrs


def merge_parts(
    parts: Sequence[str | Path],
    out: str | Path,
    images_path: str | Path | None = None,
    deep: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge extraction parts (any order) into ``out``; return the merged file's attributes.

    ``images_path`` (for features) makes sure the merged features belong to that images file. ``deep``
    re-verifies each part's paths digest and scans features for NaN/inf.
    """
    out = Path(out)
    if not parts:
        raise MergeError("no parts to merge")
    paths, attrs = _validate([Path(p) for p in parts], deep)
    images_attrs = None
    if images_path is not None:
        with reading(images_path):
            images_attrs = hs.check_images_file(images_path, deep=False)
    total = sum(a["num_images"] for a in attrs)
    digest = hs.PathsDigest()
    with atomic_path(out, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as dst:
        with h5py.File(paths[0], "r") as first:
            for name, ds in _datasets(first).items():
                rows = 0
                for p in paths:
                    with h5py.File(p, "r") as h5:
                        rows += h5[name].shape[0]
                chunks = (min(ds.chunks[0], rows), *ds.chunks[1:]) if rows and ds.chunks else None
                new = dst.create_dataset(name, shape=(rows, *ds.shape[1:]), dtype=ds.dtype, chunks=chunks)
                for key, value in ds.attrs.items():
                    new.attrs[key] = value
        bar = tqdm(total=total, unit="img", desc=f"merge {out.name}", file=sys.stderr, disable=not progress)
        offsets: dict[str, int] = {}
        with bar:
            for p in paths:
                with h5py.File(p, "r") as src:
                    for name, ds in _datasets(src).items():
                        row_bytes = max(1, ds.dtype.itemsize * math.prod(ds.shape[1:]))
                        block = max(1, BLOCK_BYTES // row_bytes)
                        at = offsets.get(name, 0)
                        for start in range(0, ds.shape[0], block):
                            chunk = ds[start : start + block]
                            dst[name][at + start : at + start + len(chunk)] = chunk
                            if name == hs.PATHS:
                                digest.update(hs.read_strings(ds, start, start + block))
                        offsets[name] = at + ds.shape[0]
                    bar.update(src[hs.PATHS].shape[0])
        merged = {k: v for k, v in attrs[0].items() if k not in hs.SHARD_ATTRS}
        merged |= {
            "shard": 0,
            "num_shards": 1,
            "shard_start": 0,
            "shard_stop": attrs[0]["source_size"],
            "num_images": total,
            "num_bad": sum(a["num_bad"] for a in attrs),
            "paths_sha256": digest.hexdigest(),
            "merged_parts": len(paths),
        }
        if images_attrs is not None and (
            images_attrs["paths_sha256"] != merged["paths_sha256"] or images_attrs["num_images"] != total
        ):
            raise MergeError(f"the merged {out} would not match the images of {images_path}")
        merged.pop("complete", None)
        hs.set_attrs(dst, merged)
        dst.attrs["complete"] = True
    log.info("merged %d parts into %s: %d images, %d bad files", len(paths), out, total, merged["num_bad"])
    return merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Parts are found as OUT.part-000i-of-000k.h5 (from --num-shards) or listed with --parts."
    parser.add_argument("--out", type=Path, required=True, help="the final file (images or features)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-shards", type=int, help="find parts 0..k-1 of --out by name")
    which.add_argument("--parts", type=Path, nargs="+", help="explicit part files (any order)")
    parser.add_argument("--images", type=Path, help="features: check the result against this images file")
    parser.add_argument(
        "--delete-parts", action="store_true", help="remove the parts after a successful merge"
    )
    parser.add_argument("--quick", action="store_true", help="skip re-hashing paths and NaN scans of parts")
    parser.add_argument("--forget-finished", type=Path, metavar="ROOT", help=finished.FORGET_HELP)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    expected = args.num_shards if args.num_shards is not None else len(args.parts)
    if args.out.exists():
        with reading(args.out, fix="delete it and rerun (it is merged again from its parts)"):
            found = hs.check_file(args.out, deep=False)
        if found.get("merged_parts", 1) == expected:
            log.info("%s is already merged (%d images): nothing to do", args.out, found["num_images"])
            return 0
        raise InputFileError(args.out, f"exists but was not merged from {expected} parts", "delete it first")
    parts = find_parts(args.out, args.num_shards) if args.num_shards is not None else args.parts
    try:
        merge_parts(
            parts, args.out, images_path=args.images, deep=not args.quick, progress=not args.no_progress
        )
    except InputFileError:
        raise
    except MergeError as err:  # the parts as a whole (shard numbers, coverage): one line
        raise SystemExit(f"rcdm merge-extract: error: {err}") from None
    if (root := finished.forget_root(args.forget_finished)) is not None:
        log.info("forgot %d kept copies of the parts", finished.forget(parts, root))
    if args.delete_parts:
        for p in parts:
            Path(p).unlink()
        log.info("deleted %d parts", len(parts))
    return 0
