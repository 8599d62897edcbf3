"""``rcdm study probe``: builds the factor probe (:mod:`rcdm.probe`) once: colour, size and position measured
from pixels, and a ``kind`` classifier trained on the silhouettes of the ``shapes`` training split. It then
measures the REAL validation images (``--val-images``, or the generated ``val`` split with ``--dataset``),
as they are and blurred by 0.5 px (how it reads soft-edged samples), and writes ``probe.pt``
(:func:`rcdm.probe.save_probe`, the report inside), ``probe.csv`` (per factor: the rule that decides
"keeps", chance, accuracy on the training and validation images) and ``probe.png``. The other studies score
kept factors with it (``--probe``) and write its validation accuracy beside each rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from rcdm.device import DEVICE_HELP, resolve_device
from rcdm.errors import MAKE_FIRST, InputFileError, reading
from rcdm.formats import hdf5
from rcdm.probe import POSITION_TOL, SIZE_TOL, accuracy_report, save_probe, train_probe
from rcdm.stages.study import common
from rcdm.study_images import factor_names_of, read_factors

NAME = "probe"
FACTORS_NEEDED = ("kind", "colour", "size", "x", "y")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("images")
    g.add_argument(
        "--images", default=None, help="images HDF5 file of the shapes training split (with factors)"
    )
    g.add_argument("--val-images", default=None, help="images HDF5 file of the shapes validation split")
    g.add_argument(
        "--dataset", default=None, help="instead: generate this dataset's train and val splits (shapes)"
    )
    g.add_argument("--num-images", type=int, default=4000, help="training images (the first N)")
    g.add_argument("--num-val-images", type=int, default=1000, help="validation images (the first N)")
    g.add_argument("--image-size", type=int, default=32, help="image size when generating --dataset")
    g = parser.add_argument_group("probe")
    g.add_argument("--steps", type=int, default=800, help="training steps of the kind classifier")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--width", type=int, default=16, help="channels of the kind classifier's first layer")
    g.add_argument("--size-tol", type=float, default=SIZE_TOL, help="size kept: relative difference at most")
    g.add_argument(
        "--position-tol",
        type=float,
        default=POSITION_TOL,
        help="position kept: centre distance (side) at most",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (probe.pt, probe.csv, probe.png)")
    g.add_argument("--force", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def _from_file(path: str, limit: int, what: str) -> tuple[np.ndarray, dict, dict]:
    if not Path(path).is_file():
        raise InputFileError(path, f"{what} images file not found", MAKE_FIRST)
    with reading(path):
        hdf5.check_images_file(path, deep=False)
        with h5py.File(path, "r") as f:
            n = min(limit, f[hdf5.IMAGES].shape[0])
            images = f[hdf5.IMAGES][:n]
            factors, names = read_factors(f, range(n))
    missing = [k for k in FACTORS_NEEDED if k not in factors]
    if missing:
        raise InputFileError(
            path,
            f"records no shapes factors {', '.join(missing)}",
            "the factor probe needs shapes images files",
        )
    return images, factors, names


def _from_dataset(spec: str, split: str, n: int, size: int) -> tuple[np.ndarray, dict, dict]:
    from rcdm.data import open_dataset
    from rcdm.preprocess import center_crop_arr

    source = open_dataset(spec, split=split, num_images=n, native_size=max(64, size))
    names = factor_names_of(source)
    if not all(k in names for k in FACTORS_NEEDED):
        raise ValueError(f"dataset {spec!r} records no shapes factors: the factor probe needs shapes")
    images = np.stack([center_crop_arr(source.load(i), size) for i in range(len(source))])
    factors: dict[str, list] = {}
    for i in range(len(source)):
        for k, v in source.factors(i).items():
            factors.setdefault(k, []).append(v)
    return images, {k: np.asarray(v) for k, v in factors.items()}, names


def _data(args: argparse.Namespace):
    """((train images, factors, names), (val images, factors), where the val images come from)."""
    if args.images:
        if not args.val_images:
            raise ValueError(
                "give the validation images too: --val-images VAL.h5 (the probe reports its accuracy)"
            )
        train = _from_file(args.images, args.num_images, "training")
        val = _from_file(args.val_images, args.num_val_images, "validation")
        if val[0].shape[1:] != train[0].shape[1:]:
            raise ValueError(
                f"{args.val_images} holds {val[0].shape[1]} px images but {args.images} "
                f"{train[0].shape[1]} px: give the two splits of one experiment"
            )
        return train, val[:2], args.val_images
    if args.dataset:
        train = _from_dataset(args.dataset, "train", args.num_images, args.image_size)
        val = _from_dataset(args.dataset, "val", args.num_val_images, args.image_size)
        return train, val[:2], f"{args.dataset} val split (generated)"
    raise ValueError("give the probe's images: --images TRAIN.h5 --val-images VAL.h5, or --dataset shapes")


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list[Path]:
    (images, factors, names), (val_images, val_factors), source = _data(args)
    probe = train_probe(
        images,
        factors,
        names,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        size_tol=args.size_tol,
        position_tol=args.position_tol,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )
    report = accuracy_report(
        probe, val_images, val_factors, train_images=images, train_factors=factors, source=str(source)
    )
    weights = out.dir / "probe.pt"
    save_probe(probe, weights, report)
    out.save_csv(report)
    out.save_png(_accuracy_chart(report))
    return [weights]


def _accuracy_chart(report: list[dict]):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [r["factor"] for r in report]
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 4.0, 3.4), dpi=100)
    ax.bar(pos - 0.27, [r["train_accuracy"] for r in report], 0.27, label="training images")
    bars = ax.bar(pos, [r["val_accuracy"] for r in report], 0.27, label="validation images")
    ax.bar(pos + 0.27, [r["val_accuracy_blurred"] for r in report], 0.27, label="validation, blurred 0.5 px")
    for b, r in zip(bars, report):
        ax.text(
            b.get_x() + b.get_width() / 2,
            0.45,
            f"{r['val_accuracy']:.1%}",
            ha="center",
            fontsize=8,
            rotation=90,
            color="white",
        )
    ax.scatter(pos, [r["chance"] for r in report], color="black", marker="_", s=400, label="chance", zorder=3)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xticks(pos, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("measured = recorded factor")
    n_val = report[0]["n_val"] if report else 0
    ax.set_title(f"Factor probe on real images ({n_val} validation images; dashed: 95 %)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
