"""Stage ``rcdm merge-samples``: sample shards -> ``samples.npz`` (ADM evaluation format) and PNG grids.

Grid rows show the conditioning image (from the images file, or the shards' own ``cond_images`` when
conditioned on an image folder) followed by its samples, without any contrast stretching.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from rcdm import finished
from rcdm.errors import InputFileError, reading
from rcdm.formats import hdf5
from rcdm.formats.npz import write_npz
from rcdm.formats.samples import (
    COND_IDS,
    COND_IMAGES,
    SAMPLES,
    check_samples_file,
    common_settings,
    iter_shard_samples,
    ordered_shards,
    shard_cond_features,
    shard_paths,
)

# ----------------------------------------------------------------------------------------------- grids


def _cond_image_lookup(
    paths: Sequence[Path], settings: dict[str, Any], images_file: str | os.PathLike | None
) -> tuple[Any, str]:
    """A function cond_index -> uint8 image, and where the images come from."""
    shard_images: dict[int, np.ndarray] = {}
    if images_file is None and settings.get("cond_source") == "images":
        for p in paths:
            with h5py.File(p, "r") as h5:
                if COND_IMAGES in h5:
                    ids = h5[COND_IDS][:]
                    for i, cid in enumerate(ids):
                        shard_images[int(cid)] = i, p

        def from_shards(cid: int) -> np.ndarray:
            i, p = shard_images[cid]
            with h5py.File(p, "r") as h5:
                return h5[COND_IMAGES][i]

        return from_shards, "shards' cond_images"
    images_file = images_file or settings.get("images_file") or None
    fix = "pass --images (the images file the features were extracted from), or --no-grid"
    if images_file is None:
        raise SystemExit(f"rcdm merge-samples: the shards name no conditioning images file: {fix}")
    if not Path(images_file).is_file():
        raise InputFileError(images_file, "conditioning images file not found", fix)
    with reading(images_file):
        hdf5.check_images_file(images_file, deep=False)

    def from_images(cid: int) -> np.ndarray:
        with h5py.File(images_file, "r") as h5:
            return h5[hdf5.IMAGES][cid]

    return from_images, str(images_file)


def sample_grid(
    paths: Sequence[str | os.PathLike],
    *,
    rows: int = 8,
    cols: int = 8,
    images_file: str | os.PathLike | None = None,
) -> np.ndarray:
    """Grid of the first ``rows`` conditionings (sample order): the conditioning, then <= ``cols`` samples."""
    from rcdm.grids import conditioning_grid

    paths = ordered_shards(paths)
    settings = common_settings(paths)
    lookup, _ = _cond_image_lookup(paths, settings, images_file)
    picked: dict[int, list[tuple[int, np.ndarray]]] = {}
    for images, cond, samp in iter_shard_samples(paths, chunk=256):
        for img, c, s in zip(images, cond, samp):
            c = int(c)
            if c not in picked and len(picked) == rows:
                continue
            picked.setdefault(c, [])
            if len(picked[c]) < cols:
                picked[c].append((int(s), img))
        if len(picked) == rows and all(
            len(v) == min(cols, settings["samples_per_image"]) for v in picked.values()
        ):
            break
    cond_ids = list(picked)
    return conditioning_grid(
        [lookup(c) for c in cond_ids],
        [[img for _, img in sorted(picked[c], key=lambda t: t[0])] for c in cond_ids],
    )


# ----------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the --out name given to `rcdm sample` (X.h5)")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--out", required=True, help="samples .npz to write")
    parser.add_argument("--grid", help="PNG grid to write (default: next to --out, <stem>_grid.png)")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--grid-cols", type=int, default=8, help="samples per grid row")
    parser.add_argument(
        "--images", help="images file holding the conditioning images (default: from settings)"
    )
    parser.add_argument("--forget-finished", type=Path, metavar="ROOT", help=finished.FORGET_HELP)


def shard_fix(path: Path, shard: int, num_shards: int) -> str:
    """What to do about a missing or broken samples shard: (delete it and) make that shard again."""
    rerun = (
        f"rerun shard {shard} of {num_shards} (Snakemake's sample job makes it; outside Snakemake, "
        f"`rcdm sample ... --shard {shard} --num-shards {num_shards}`)"
    )
    return rerun if not path.exists() else f"delete it and {rerun}"


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from rcdm.grids import save_png

    paths = shard_paths(args.input, args.num_shards)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(paths)} shards)" if len(missing) > 1 else ""
        first = paths[missing[0]]
        raise InputFileError(first, f"shard missing{more}", shard_fix(first, missing[0], args.num_shards))
    for i, p in enumerate(paths):  # each shard complete and readable, named when it is not
        with reading(p, fix=shard_fix(p, i, args.num_shards)):
            check_samples_file(p)
    with reading(*paths, fix="delete the shard named and rerun it (Snakemake's sample job makes it again)"):
        settings = common_settings(paths)
    if not args.no_grid:  # the grid's conditioning images, found before anything is written
        _cond_image_lookup(ordered_shards(paths), settings, args.images)
    n = 0
    size = int(settings["image_size"])
    for p in paths:
        with h5py.File(p, "r") as h5:
            n += h5[SAMPLES].shape[0]
    bar = tqdm(total=n, unit="img", desc="merge-samples")

    def chunks():
        for images, c, s in iter_shard_samples(paths):
            yield images, c, s
            bar.update(len(images))

    write_npz(args.out, (n, size, size, 3), chunks(), settings, cond_features=shard_cond_features(paths))
    bar.close()
    print(args.out)
    if not args.no_grid:
        grid_path = (
            Path(args.grid) if args.grid else Path(args.out).with_name(Path(args.out).stem + "_grid.png")
        )
        grid = sample_grid(paths, rows=args.grid_rows, cols=args.grid_cols, images_file=args.images)
        save_png(grid_path, grid)
        print(grid_path, file=sys.stderr)
    if (root := finished.forget_root(args.forget_finished)) is not None:
        forgot = finished.forget(paths, root)
        print(f"rcdm merge-samples: forgot {forgot} kept copies of the shards", file=sys.stderr)
    return 0
