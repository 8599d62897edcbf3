"""Stage ``rcdm evaluate``: score one sample set (:mod:`rcdm.scoring`) and write its ``metrics.csv`` row.

``--check`` reads every input file and loads the Inception network and the encoder on the CPU as the run
does, then exits without scoring or writing (0, or 1 with one line naming the file): the workflow's
``evaluate_check`` job.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import torch

from rcdm import encoders
from rcdm.device import DEVICE_HELP, default_workers, resolve_device
from rcdm.errors import CHECK_HELP, EXIT_PERMANENT, REFETCH, check_passed, reading
from rcdm.formats import hdf5
from rcdm.formats.metrics_csv import write_metrics_csv
from rcdm.formats.npz import npz_sample_count, read_npz_meta
from rcdm.inception import InceptionWeightsMissing, inception_weights_path, load_inception
from rcdm.scoring import FID_SEED, REFERENCE_SEED, EvalSettings, evaluate, load_reference_stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="samples .npz written by `rcdm merge-samples`")
    parser.add_argument("--out", required=True, help="metrics.csv to write")
    parser.add_argument("--run-id", help="run identifier (default: the samples file's folder name)")
    parser.add_argument(
        "--encoder-name",
        help="encoder name for metrics.csv and the tables (default: the encoder's kind: dino, small, ...)",
    )
    parser.add_argument("--dataset", help="dataset name for the table (default: from the samples' settings)")
    g = parser.add_argument_group("realism (FID, IS, precision/recall)")
    g.add_argument("--weights-dir", default="weights", help="folder holding the FID Inception weights file")
    g.add_argument("--reference-images", help="images file whose images are the FID reference set")
    g.add_argument("--reference-stats", help=".npz with mu and sigma of the reference set (instead)")
    g.add_argument(
        "--n-reference", type=int,
        help="FID reference: a seeded random subset of N reference images, class-stratified when labelled",
    )  # fmt: skip
    g.add_argument("--reference-seed", type=int, default=REFERENCE_SEED, help="seed of the reference subset")
    g.add_argument(
        "--n-fid", type=int,
        help="FID/IS on a seeded random subset of N samples, class-stratified by the conditioning images' "
        "labels when known (paper: 10000); default all",
    )  # fmt: skip
    g.add_argument("--fid-seed", type=int, default=FID_SEED, help="seed of the FID/IS sample subset")
    g.add_argument(
        "--conditioning-images",
        help="images file whose labels classify the samples (default: the one the features file names)",
    )
    g.add_argument("--cache-dir", help="where reference statistics are cached (default: beside --out)")
    g.add_argument("--precision-recall", action="store_true", help="also k-NN precision/recall (k=3)")
    g.add_argument("--is-splits", type=int, default=10)
    g = parser.add_argument_group("faithfulness (FD_rep, rank, MRR)")
    g.add_argument("--features", help="features file of the conditioning images (index 0 rows)")
    g.add_argument("--encoder", help="conditioning encoder (default: the features file's)")
    g.add_argument("--encoder-checkpoint", help="its weights file; without it FD_rep and rank are skipped")
    g.add_argument("--layer", choices=("trunk", "head"), help="default: the features file's layer")
    g.add_argument("--trust-encoder", action="store_true", help="allow encoder files that unpickle code")
    g.add_argument("--rank-metric", default="cosine", choices=("cosine", "l2"))
    g = parser.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument(
        "--workers", type=int, default=default_workers(), help="threads cropping samples for the encoder"
    )
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--check", action="store_true", help=CHECK_HELP)


def _load_encoder(args, settings: dict[str, Any]) -> tuple[torch.nn.Module | None, str]:
    """The conditioning encoder configured like extraction, or None and the reason."""
    attrs = hdf5.check_features_file(args.features, deep=False) if args.features else {}
    recorded = {
        "encoder": attrs.get("encoder") or settings.get("encoder"),
        "layer": attrs.get("layer") or settings.get("layer"),
        "input_size": attrs.get("input_size") or settings.get("encoder_input_size"),
        "input_norm": attrs.get("input_norm") or settings.get("encoder_input_norm"),
        "encoder_sha256": encoders.recorded_encoder_sha256(attrs),
    }
    name = args.encoder or recorded["encoder"]
    if not name:
        return None, "no encoder named (--encoder)"
    if not args.encoder_checkpoint and ":" not in name:
        return None, f"no checkpoint for encoder {name!r} given (--encoder-checkpoint)"
    if args.encoder_checkpoint and not Path(args.encoder_checkpoint).is_file():
        return None, f"encoder checkpoint not found at {args.encoder_checkpoint}"
    with reading(args.encoder_checkpoint, fix=REFETCH, keep=(encoders.EncoderMismatchError,)):
        enc = encoders.load_as_extracted(
            name, args.encoder_checkpoint, args.layer, features_attrs=recorded, trust=args.trust_encoder
        )
    return enc, ""


def _settings(args, device, encoder, encoder_missing: str, inception, inception_missing: str) -> EvalSettings:
    return EvalSettings(
        features=args.features, encoder=encoder, encoder_missing=encoder_missing, inception=inception,
        inception_missing=inception_missing, reference_images=args.reference_images,
        reference_stats=args.reference_stats, n_reference=args.n_reference, n_fid=args.n_fid,
        fid_seed=args.fid_seed, reference_seed=args.reference_seed,
        conditioning_images=args.conditioning_images,
        cache_dir=args.cache_dir or Path(args.out).parent / "cache", rank_metric=args.rank_metric,
        with_precision_recall=args.precision_recall, is_splits=args.is_splits, batch_size=args.batch_size,
        workers=args.workers, device=device, progress=not args.no_progress,
    )  # fmt: skip


def _check_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Every input file read once, before any work: a missing or broken one is an InputFileError naming it.
    Returns the samples' settings and their number."""
    with reading(args.samples):
        n = npz_sample_count(args.samples)  # uint8 [N, H, W, 3]
        settings = read_npz_meta(args.samples)["settings"]
    if args.features:
        with reading(args.features):
            hdf5.check_features_file(args.features, deep=False)
    for path in (args.reference_images, args.conditioning_images):
        if path:
            with reading(path):
                hdf5.check_images_file(path, deep=False)
    if args.reference_stats:
        with reading(args.reference_stats, fix="delete it and make it again, or give --reference-images"):
            load_reference_stats(args.reference_stats)
    return settings, n


def run(args: argparse.Namespace) -> int:
    device = torch.device("cpu") if args.check else resolve_device(args.device)
    settings, n = _check_inputs(args)
    try:
        with reading(inception_weights_path(args.weights_dir), fix=REFETCH, keep=(InceptionWeightsMissing,)):
            inception, inception_missing = load_inception(args.weights_dir, device=device), ""
    except InceptionWeightsMissing as err:
        inception, inception_missing = None, str(err)
        if not args.check:  # the check's one line says so
            print(f"rcdm evaluate: {err}", file=sys.stderr)
    try:
        encoder, encoder_missing = _load_encoder(args, settings)
    except encoders.EncoderMismatchError as err:  # names the encoder file first
        print(f"rcdm evaluate: {'error: ' if args.check else ''}{err}", file=sys.stderr)
        return EXIT_PERMANENT if args.check else 2
    if encoder is None and not args.check:
        print(f"rcdm evaluate: FD_rep and rank skipped: {encoder_missing}", file=sys.stderr)
    if args.check:
        fid = "FID/IS skipped (no Inception weights)" if inception is None else "FID/IS with Inception"
        rep = "FD_rep and rank skipped" if encoder is None else f"FD_rep and rank with {encoder.encoder_name}"
        return check_passed("evaluate", f"{args.samples} ({n} samples); {fid}; {rep}")
    ev = evaluate(
        args.samples, _settings(args, device, encoder, encoder_missing, inception, inception_missing)
    )
    ev.values["run_id"] = args.run_id or Path(args.samples).resolve().parent.name
    if args.dataset:
        ev.values["dataset"] = args.dataset
    if encoder is not None:
        ev.values["encoder"], ev.values["layer"] = encoder.encoder_name, encoder.layer
    if args.encoder_name:
        ev.values["encoder"] = args.encoder_name
    ev.values["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    row = ev.row()
    write_metrics_csv(args.out, row)
    shown = {k: row[k] for k in ("fid", "is_mean", "fd_rep", "mean_rank", "mrr", "chance_mrr", "status")}
    print(f"rcdm evaluate: {shown}", file=sys.stderr)
    print(args.out)
    return 0
