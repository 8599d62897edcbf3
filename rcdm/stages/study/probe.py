"""``rcdm study probe``: trains the factor probe (:mod:`rcdm.probe`) once on the ``shapes`` training split and
writes ``probe.pt`` (:func:`rcdm.probe.save_probe`), ``probe.csv`` (per factor: classes, chance, train and
held-out accuracy) and ``probe.png`` (accuracy vs chance). The other studies score kept factors with it
(``--probe``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from rcdm.device import DEVICE_HELP, resolve_device
from rcdm.formats import hdf5
from rcdm.probe import DEFAULT_FACTORS, save_probe, train_probe
from rcdm.stages.study import common
from rcdm.study_images import factor_names_of, read_factors

NAME = "probe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training data")
    g.add_argument(
        "--images", default=None, help="images HDF5 file of the shapes training split (with factors)"
    )
    g.add_argument("--dataset", default=None, help="instead: generate this dataset (shapes)")
    g.add_argument("--split", default="train")
    g.add_argument("--num-images", type=int, default=4000, help="training images (first N)")
    g.add_argument("--image-size", type=int, default=32, help="image size when generating --dataset")
    g = parser.add_argument_group("probe")
    g.add_argument("--factors", default=",".join(DEFAULT_FACTORS), help="factors to predict")
    g.add_argument("--bins", type=int, default=3, help="bins of continuous factors")
    g.add_argument("--epochs", type=int, default=6)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--width", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (probe.pt, probe.csv, probe.png)")
    g.add_argument("--force", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def _training_data(args: argparse.Namespace) -> tuple[np.ndarray, dict, dict]:
    if args.images:
        path = Path(args.images)
        if not path.is_file():
            raise FileNotFoundError(f"images file not found: {path}")
        hdf5.check_images_file(path, deep=False)
        with h5py.File(path, "r") as f:
            n = min(args.num_images, f[hdf5.IMAGES].shape[0])
            images = f[hdf5.IMAGES][:n]
            factors, names = read_factors(f, range(n))
        if not factors:
            raise KeyError(
                f"{path} records no generative factors (a 'factors' group): use the shapes dataset"
            )
        return images, factors, names
    if args.dataset:
        from rcdm.data import open_dataset
        from rcdm.preprocess import center_crop_arr

        source = open_dataset(
            args.dataset, split=args.split, num_images=args.num_images, native_size=args.image_size
        )
        if not factor_names_of(source):
            raise ValueError(f"dataset {args.dataset!r} records no generative factors")
        images = np.stack([center_crop_arr(source.load(i), args.image_size) for i in range(len(source))])
        factors: dict[str, list] = {}
        for i in range(len(source)):
            for k, v in source.factors(i).items():
                factors.setdefault(k, []).append(v)
        return images, {k: np.asarray(v) for k, v in factors.items()}, factor_names_of(source)
    raise ValueError("give the probe's training images: --images TRAIN.h5 or --dataset shapes")


def run(args: argparse.Namespace) -> int:
    return common.run_once(args, NAME, lambda out: _study(args, out))


def _study(args: argparse.Namespace, out: common.StudyOutput) -> list[Path]:
    images, factors, names = _training_data(args)
    which = [f.strip() for f in args.factors.split(",") if f.strip()]
    probe, report = train_probe(
        images,
        factors,
        names,
        which=which,
        bins=args.bins,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.no_progress,
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
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3), dpi=100)
    ax.bar(pos - 0.2, [r["train_accuracy"] for r in report], 0.4, label="train")
    ax.bar(pos + 0.2, [r["val_accuracy"] for r in report], 0.4, label="held out")
    ax.scatter(pos, [r["chance"] for r in report], color="black", marker="_", s=400, label="chance", zorder=3)
    ax.set_xticks(pos, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Factor probe")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
