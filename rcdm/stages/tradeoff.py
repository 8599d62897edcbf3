"""Stage ``rcdm tradeoff``: sampler speed versus quality (FD_rep and MRR against UNet evaluations).

For every sampler and step count of a grid, the same conditionings (a seeded subset of a validation features
file) are sampled with the same per-sample noise (``rcdm.conditioning.make_generators``), timed, written as a
samples ``.npz`` and scored by ``rcdm.scoring.evaluate`` exactly as the evaluation stage scores a 50K set
(FD_rep against the conditionings' representations, rank/MRR of each sample's own conditioning). With the
matching images file the real images are scored the same way (the ceiling a perfect model would reach).

Outputs in ``--out``: ``tradeoff.csv`` (one row per setting), ``tradeoff.png`` (FD_rep and MRR against NFE,
log x), ``recommended.json`` (the cheapest setting whose FD_rep and MRR are both within ``--tolerance`` of
the best values; see :func:`recommend`). Per-setting samples are kept under ``samples/`` with their wall
time, so a rerun only computes missing settings. ``--check`` stops after every input is read and checked
(the model and encoder loaded on the CPU), before sampling or writing: the workflow's ``tradeoff_check`` job.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm import encoders
from rcdm.checkpoint import load_model
from rcdm.conditioning import FeatureConditioning, make_generators, select_conditionings
from rcdm.device import DEVICE_HELP, resolve_device
from rcdm.errors import CHECK_HELP, MAKE_FIRST, REFETCH, InputFileError, check_passed, reading
from rcdm.factory import model_flags_file, read_model_flags
from rcdm.formats import hdf5
from rcdm.formats.npz import write_npz
from rcdm.io import atomic_path, sha256_file
from rcdm.preprocess import to_uint8
from rcdm.scoring import EvalSettings, evaluate

__all__ = ["COLUMNS", "add_arguments", "plot", "recommend", "run", "run_tradeoff"]

COLUMNS = (
    "sampler", "steps", "nfe", "fd_rep", "mrr", "mean_rank", "top1", "chance_mrr", "n_cond",
    "seconds_per_sample", "samples_per_s", "batch_size", "device",
)  # fmt: skip

NFE_PER_STEP = {"ddpm": 1, "ddim": 1, "dpm-solver++": 1}  # DPM-Solver++(2M) is multistep: one call per step


def recommend(rows: Sequence[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The cheapest setting (fewest NFE, then lowest wall time) of near-best quality.

    Near-best: ``fd_rep <= best_fd * (1 + tolerance)`` and ``mrr >= best_mrr * (1 - tolerance)``, best taken
    over all rows. If no row meets both (best FD_rep and best MRR far apart), FD_rep alone decides and
    ``criterion`` says so.
    """
    if not rows:
        raise ValueError("no settings to choose from")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best_fd = min(r["fd_rep"] for r in rows)
    best_mrr = max(r["mrr"] for r in rows)

    def fd_ok(r: dict[str, Any]) -> bool:
        return r["fd_rep"] <= best_fd + abs(best_fd) * tolerance

    def mrr_ok(r: dict[str, Any]) -> bool:
        return r["mrr"] >= best_mrr - abs(best_mrr) * tolerance

    criterion = f"fd_rep within {tolerance:.0%} of the best and mrr within {tolerance:.0%} of the best"
    ok = [r for r in rows if fd_ok(r) and mrr_ok(r)]
    if not ok:
        ok = [r for r in rows if fd_ok(r)]
        criterion = f"fd_rep within {tolerance:.0%} of the best (no setting is near-best on both)"
    pick = min(ok, key=lambda r: (r["nfe"], r["seconds_per_sample"], r["fd_rep"]))
    return {
        "sampler": pick["sampler"],
        "steps": int(pick["steps"]),
        "nfe": int(pick["nfe"]),
        "fd_rep": pick["fd_rep"],
        "mrr": pick["mrr"],
        "seconds_per_sample": pick["seconds_per_sample"],
        "tolerance": tolerance,
        "criterion": criterion,
        "best_fd_rep": best_fd,
        "best_mrr": best_mrr,
    }


def plot(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    real: dict[str, Any] | None = None,
    pick: dict[str, Any] | None = None,
    title: str = "",
) -> Path:
    """Two panels (FD_rep, MRR) against NFE on a log axis, one line per sampler; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (("fd_rep", "FD_rep (lower is better)"), ("mrr", "MRR (higher is better)"))
    for ax, (key, label) in zip(axes, panels):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r[key]) for r in rows if r["sampler"] == sampler)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
        if real is not None and real.get(key) is not None:
            ax.axhline(real[key], color="black", linestyle="--", linewidth=1, label="real images")
        if key == "mrr" and rows and rows[0].get("chance_mrr") is not None:
            ax.axhline(rows[0]["chance_mrr"], color="grey", linestyle=":", linewidth=1, label="chance")
        if pick is not None:
            ax.plot([pick["nfe"]], [pick[key]], marker="*", markersize=16, color="gold",
                    markeredgecolor="black", linestyle="none",
                    label=f"recommended: {pick['sampler']} {pick['steps']}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["nfe"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("UNet evaluations per sample (NFE)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _parse_grid(samplers: str, steps: str) -> list[tuple[str, int]]:
    from rcdm.samplers import SAMPLERS

    names = [s.strip() for s in samplers.split(",") if s.strip()]
    bad = [s for s in names if s not in SAMPLERS]
    if bad or not names:
        raise ValueError(f"--samplers: unknown {bad or 'empty list'}; choose from {', '.join(SAMPLERS)}")
    try:
        counts = sorted({int(s) for s in steps.split(",") if s.strip()})
    except ValueError as err:
        raise ValueError(f"--steps must be a comma list of integers, got {steps!r}") from err
    if not counts or counts[0] < 1:
        raise ValueError(f"--steps must be positive integers, got {steps!r}")
    return [(s, n) for s in names for n in counts]


def _sample_setting(
    model, diffusion, feats: torch.Tensor, ids: np.ndarray, sampler: str, steps: int, args, device
) -> tuple[np.ndarray, float]:
    """uint8 samples [n, S, S, 3] of one setting and the sampling wall time (device synchronised)."""
    from tqdm import tqdm

    from rcdm.samplers import sample

    size = int(model.image_size)
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    bar = tqdm(range(0, len(ids), args.batch_size), desc=f"{sampler} {steps}", file=sys.stderr, leave=False)
    for lo in bar:
        hi = min(lo + args.batch_size, len(ids))
        gens = make_generators(args.seed, ids[lo:hi], np.zeros(hi - lo, np.int64), device)
        with torch.inference_mode():
            x = sample(
                model, diffusion, (hi - lo, 3, size, size), sampler=sampler, steps=steps,
                model_kwargs={"feat": feats[lo:hi].to(device)}, generators=gens, device=device,
                cuda_graph=args.cuda_graph,
            )  # fmt: skip
            out.append(to_uint8(x).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return torch.cat(out).numpy(), seconds


def _score(npz: Path, features: Path, encoder, args, device) -> dict[str, Any]:
    settings = EvalSettings(
        features=features, encoder=encoder, inception_missing="not used by the trade-off study",
        batch_size=args.batch_size, workers=args.workers, device=device, progress=False,
    )  # fmt: skip
    ev = evaluate(npz, settings)
    values = ev.values
    missing = [k for k in ("fd_rep", "mrr") if values.get(k) is None]
    if missing:
        raise RuntimeError(f"evaluate could not compute {missing} for {npz}: {'; '.join(ev.status)}")
    return values


def _write_npz(path: Path, images: np.ndarray, ids: np.ndarray, settings: dict[str, Any]) -> None:
    write_npz(path, images.shape, iter([(images, ids, np.zeros(len(ids), np.int64))]), settings)


def _real_images(images_file: Path, ids: np.ndarray) -> np.ndarray:
    with h5py.File(images_file, "r") as h5:
        return hdf5.read_rows(h5[hdf5.IMAGES], ids)


def _load_encoder(args, attrs: dict[str, Any]):
    with reading(args.encoder_checkpoint, fix=REFETCH):
        return encoders.load_as_extracted(
            args.encoder, args.encoder_checkpoint, args.layer, features_attrs=attrs,
            trust=args.trust_checkpoint,
        )  # fmt: skip


def run_tradeoff(args: argparse.Namespace) -> dict[str, Any]:
    """Sample and score every grid setting (reusing finished ones), then write CSV, PNG and JSON. With
    ``args.check``: every input read and checked on the CPU, nothing written; returns {"check": summary}."""
    device = torch.device("cpu") if args.check else resolve_device(args.device)
    grid = _parse_grid(args.samplers, args.steps)
    features = Path(args.features)
    if not features.is_file():
        raise InputFileError(features, "features file not found", MAKE_FIRST)
    with reading(features):
        features_attrs = hdf5.check_features_file(features, deep=False)
    if args.images is not None:
        with reading(features, args.images):
            hdf5.check_features_file(features, args.images, deep=False)  # rows must pair up
    with reading(model_flags_file(args.model_flags)):
        flags = read_model_flags(args.model_flags)
    with reading(args.checkpoint):
        model, diffusion = load_model(args.checkpoint, flags, trust=args.trust_checkpoint, device=device)
    if args.images is not None:
        with reading(args.images):
            size = int(hdf5.check_images_file(args.images, deep=False)["image_size"])
        if size != int(model.image_size):
            raise InputFileError(
                args.images,
                f"holds {size} px images but the model {args.checkpoint} samples {model.image_size} px ones",
                "give the model's flags (--model-flags model_flags.json) or the images of its data",
            )
    cond = FeatureConditioning(features)
    if int(model.ssl_dim or 0) != cond.dim:
        raise InputFileError(
            features,
            f"holds {cond.dim}-d representations but the model {args.checkpoint} expects {model.ssl_dim}-d "
            "ones",
            "give the features of the model's encoder and layer",
        )
    if args.num_cond > cond.n:
        raise InputFileError(
            features,
            f"holds {cond.n} conditionings, fewer than the {args.num_cond} asked for (--num-cond)",
            f"ask for at most {cond.n}",
        )
    ids = select_conditionings(cond.n, args.num_cond, args.seed)
    feats = cond.features(ids)
    cond.close()
    if not torch.isfinite(feats).all():
        raise ValueError(f"{features} holds NaN/inf features among the selected rows")
    encoder = _load_encoder(args, features_attrs)
    max_steps = diffusion.base_diffusion().num_timesteps
    if any(n > max_steps for _, n in grid):
        raise ValueError(f"--steps above the model's {max_steps} diffusion steps")
    if args.check:
        model_is = f"{args.checkpoint} ({model.image_size} px, {cond.dim}-d)"
        grid_is = f"{len(grid)} settings up to {max(n for _, n in grid)} steps"
        return {"check": f"{model_is}; {len(ids)} conditionings of {features}; {grid_is}"}

    out = Path(args.out)
    sample_dir = out / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    identity = {"model_sha256": sha256_file(args.checkpoint), "model_flags": flags,
                "features": str(features.resolve()), "num_cond": len(ids), "seed": args.seed}  # fmt: skip
    rows = []
    for sampler, steps in grid:
        npz = sample_dir / f"{sampler}_{steps}.npz"
        info_path = npz.with_suffix(".json")
        info = None
        if info_path.is_file() and npz.is_file():
            with reading(info_path, fix="delete it (that setting is then sampled again)"):
                info = json.loads(info_path.read_text())
        if info is None or info.get("identity") != identity:
            images, seconds = _sample_setting(model, diffusion, feats, ids, sampler, steps, args, device)
            settings = {"sampler": sampler, "num_steps": steps, "seed": args.seed, **identity}
            _write_npz(npz, images, ids, settings)
            info = {"identity": identity, "seconds": seconds, "batch_size": args.batch_size,
                    "device": str(device)}  # fmt: skip
            with atomic_path(info_path) as tmp:
                tmp.write_text(json.dumps(info, indent=2))
        values = _score(npz, features, encoder, args, device)
        nfe = steps * NFE_PER_STEP[sampler]
        rows.append({
            "sampler": sampler, "steps": steps, "nfe": nfe, "fd_rep": float(values["fd_rep"]),
            "mrr": float(values["mrr"]), "mean_rank": float(values["mean_rank"]), "top1": values["top1"],
            "chance_mrr": values["chance_mrr"], "n_cond": len(ids),
            "seconds_per_sample": info["seconds"] / len(ids), "samples_per_s": len(ids) / info["seconds"],
            "batch_size": info["batch_size"], "device": info["device"],
        })  # fmt: skip
        row = rows[-1]
        print(f"rcdm tradeoff: {sampler:13s} {steps:4d} steps  FD_rep {row['fd_rep']:10.4f}  "
              f"MRR {row['mrr']:.4f}  {row['seconds_per_sample']:.3f} s/sample", file=sys.stderr)  # fmt: skip

    real = None
    if args.images is not None:
        npz = sample_dir / "real.npz"
        _write_npz(npz, _real_images(Path(args.images), ids), ids, {"sampler": "real images", **identity})
        values = _score(npz, features, encoder, args, device)
        real = {"fd_rep": float(values["fd_rep"]), "mrr": float(values["mrr"])}

    pick = recommend(rows, args.tolerance)
    csv_path = out / "tradeoff.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    title = f"RCDM sampler trade-off: {len(ids)} conditionings, {encoder.encoder_name} {encoder.layer}"
    plot(rows, out / "tradeoff.png", real=real, pick=pick, title=title)
    summary = {**pick, "real_images": real, "grid": [f"{s}:{n}" for s, n in grid], **identity,
               "csv": str(csv_path), "plot": str(out / "tradeoff.png")}  # fmt: skip
    with atomic_path(out / "recommended.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="trained RCDM checkpoint (EMA state dict)")
    parser.add_argument(
        "--model-flags", "--flags", dest="model_flags", default=None,
        help="model flags JSON/YAML (model_flags.json beside a trained model; default: inferred)",
    )  # fmt: skip
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow files that unpickle code")
    parser.add_argument("--features", required=True, help="validation features file (conditionings)")
    parser.add_argument("--images", default=None, help="its images file: adds the real-images ceiling")
    parser.add_argument("--encoder", default=None, help="conditioning encoder (default: the features file's)")
    parser.add_argument("--encoder-checkpoint", default=None)
    parser.add_argument("--layer", default=None, help="trunk / head (default: the features file's)")
    parser.add_argument("--samplers", default="ddpm,ddim,dpm-solver++", help="comma list of samplers")
    parser.add_argument("--steps", default="10,20,50,100,250", help="comma list of step counts")
    parser.add_argument(
        "--num-cond", type=int, default=256, help="conditionings (seeded subset of --features)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="threads cropping samples for the encoder")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative slack from the best quality")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="replay the UNet as a CUDA graph (CUDA only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", default="results/tradeoff", help="output directory")
    parser.add_argument("--check", action="store_true", help=CHECK_HELP)


def run(args: argparse.Namespace) -> int:
    if args.num_cond < 2 or args.batch_size < 1 or not math.isfinite(args.tolerance):
        raise SystemExit("rcdm tradeoff: --num-cond must be >= 2, --batch-size >= 1, --tolerance finite")
    summary = run_tradeoff(args)
    if args.check:
        return check_passed("tradeoff", summary["check"])
    print(
        f"rcdm tradeoff: recommended {summary['sampler']} with {summary['steps']} steps "
        f"({summary['nfe']} NFE, FD_rep {summary['fd_rep']:.4f}, MRR {summary['mrr']:.4f}; "
        f"{summary['criterion']})",
        file=sys.stderr,
    )
    print(Path(args.out) / "recommended.json")
    return 0
