"""Scoring a sample set: realism (FID, IS, precision/recall) and faithfulness (FD_rep, rank, MRR).

One streaming pass over ``samples.npz`` feeds every metric: the FID Inception (pool3 statistics, logits for
IS, optionally pool3 features for precision/recall) and the conditioning encoder (representations of the
samples through :func:`rcdm.preprocess.encoder_view`, the path a stored image takes at extraction). FD_rep
compares the samples' representations with those of the conditioning images; rank/MRR ranks each sample's
own conditioning among all conditionings used. Reference Inception statistics are computed once per
reference set and cached in a file keyed by the reference images' content and the Inception weights.
Whatever cannot be computed (no Inception file, no encoder checkpoint, ...) is left empty and the ``status``
says why; no number is ever made up.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm.formats import hdf5
from rcdm.formats.metrics_csv import COLUMNS
from rcdm.formats.npz import iter_npz_array, npz_array_shape, read_npz_meta
from rcdm.io import atomic_path, sha256_file
from rcdm.metrics import (
    RunningStats,
    chance_mrr,
    frechet_distance_stats,
    inception_score,
    precision_recall,
    rank_mrr,
)
from rcdm.preprocess import encoder_view

CACHE_VERSION = 1


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: ``values`` for metrics.csv, ``status`` notes (why one is empty)."""

    values: dict[str, Any] = field(default_factory=dict)
    status: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        out = {c: self.values.get(c) for c in COLUMNS}
        out["status"] = "; ".join(self.status) if self.status else "ok"
        return out


def _subset(n: int, n_reference: int | None, seed: int = 0) -> np.ndarray:
    if n_reference is None or n_reference >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=n_reference, replace=False)).astype(np.int64)


def reference_cache_path(
    cache_dir: str | os.PathLike, images_file: str | os.PathLike, rows: np.ndarray, inception_sha256: str
) -> Path:
    """Cache file of the reference statistics of ``rows`` of ``images_file`` under given Inception weights."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}:{sha256_file(images_file)}:{inception_sha256}:".encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return Path(cache_dir) / f"fid_ref_{h.hexdigest()[:24]}.npz"


def reference_statistics(
    inception,
    images_file: str | os.PathLike,
    *,
    n_reference: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 100,
    with_features: bool = False,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Inception pool3 ``mu``, ``sigma``, ``n`` (and ``features``) of the images of an images file.

    ``features`` are kept when asked for or when there are at most 2048 of them (they make the Frechet
    distance of a small set cheap and exact). ``n_reference`` keeps a seeded random subset (seed 0, file
    order). Results are cached in ``cache_dir`` (see :func:`reference_cache_path`); a cache without
    features is recomputed when features are needed.
    """
    from tqdm.auto import tqdm

    hdf5.check_images_file(images_file, deep=False)
    with h5py.File(images_file, "r") as h5:
        n_total = h5[hdf5.IMAGES].shape[0]
    rows = _subset(n_total, n_reference)
    cache = None
    if cache_dir is not None:
        cache = reference_cache_path(cache_dir, images_file, rows, inception.weights_sha256 or "")
        if cache.is_file():
            with np.load(cache) as z:
                if not with_features or "features" in z.files:
                    return {k: z[k] for k in z.files}
    stats = RunningStats(2048, device=next(inception.parameters()).device)
    feats = []
    with h5py.File(images_file, "r") as h5, torch.inference_mode():
        ds = h5[hdf5.IMAGES]
        for lo in tqdm(range(0, len(rows), batch_size), desc="reference inception", disable=not progress):
            idx = rows[lo : lo + batch_size]
            block = ds[int(idx[0]) : int(idx[-1]) + 1][idx - idx[0]]
            pool, _ = inception.embed_uint8(torch.from_numpy(block))
            stats.update(pool)
            if with_features or len(rows) <= 2048:
                feats.append(pool.float().cpu())
    out = {"mu": stats.mean(), "sigma": stats.cov(), "n": np.array(len(rows))}
    if with_features or len(rows) <= 2048:
        out["features"] = torch.cat(feats).numpy()
    if cache is not None:
        with atomic_path(cache, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **out)
    return out


def load_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``mu``/``sigma`` from an ``.npz`` (e.g. the ADM suite's reference batch, or a cache file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise KeyError(f"{path}: no {', '.join(missing)} array (has {', '.join(z.files)})")
        return {k: z[k] for k in z.files if k in ("mu", "sigma", "n", "features")}


def conditioning_embeddings(
    meta: dict[str, Any], features_file: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(cond_ids, embeddings [m, D], source)`` for the distinct conditionings the samples used.

    Image-conditioned sample sets carry their conditionings' features; otherwise rows of the features file
    (index 0, the unflipped image) are read.
    """
    cond_index = meta["cond_index"]
    if cond_index is None:
        raise KeyError("the samples file has no cond_index array (not written by `rcdm merge-samples`)")
    ids = np.unique(cond_index)
    if meta.get("cond_features") is not None and features_file is None:
        pos = {int(c): i for i, c in enumerate(meta["cond_ids"])}
        missing = [int(c) for c in ids if int(c) not in pos]
        if missing:
            raise KeyError(f"conditioning features missing for cond_index {missing[:5]}")
        return ids, meta["cond_features"][[pos[int(c)] for c in ids]].astype(np.float32), "samples file"
    if features_file is None:
        raise FileNotFoundError("no features file given (--features) for the conditioning representations")
    attrs = hdf5.check_features_file(features_file, deep=False)
    if int(ids[-1]) >= int(attrs["num_images"]):
        raise ValueError(
            f"cond_index up to {int(ids[-1])} but {features_file} has {attrs['num_images']} rows"
        )
    out = np.empty((len(ids), int(attrs["dim"])), dtype=np.float32)
    with h5py.File(features_file, "r") as h5:
        ds = h5[hdf5.FEATURES]
        step = max(1, (256 << 20) // (8 * int(attrs["dim"])))
        for lo in range(0, len(ids), step):
            part = ids[lo : lo + step]
            first, last = int(part[0]), int(part[-1]) + 1
            if last - first <= 2 * len(part):  # (nearly) contiguous: a slice read, not a slow point selection
                out[lo : lo + step] = ds[first:last, 0][part - first]
            else:
                out[lo : lo + step] = ds[part, 0]
    return ids, out, str(features_file)


class _Embedder:
    """Conditioning-encoder representations of uint8 samples, preprocessed exactly like extraction."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, workers: int) -> None:
        self.encoder = encoder.to(device).eval()
        self.device = device
        self.pool = ThreadPoolExecutor(max(1, workers))  # PIL resizes release the GIL

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = encoder_view(
            images, int(self.encoder.input_size), self.encoder.input_norm, device=self.device, pool=self.pool
        )
        return self.encoder(x).float()

    def close(self) -> None:
        self.pool.shutdown()


def evaluate(
    samples: str | os.PathLike,
    *,
    features: str | os.PathLike | None = None,
    encoder: torch.nn.Module | None = None,
    encoder_missing: str = "no encoder given",
    inception=None,
    inception_missing: str = "no Inception network given",
    reference_images: str | os.PathLike | None = None,
    reference_stats: str | os.PathLike | None = None,
    n_reference: int | None = None,
    n_fid: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    rank_metric: str = "cosine",
    with_precision_recall: bool = False,
    is_splits: int = 10,
    batch_size: int = 100,
    workers: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Evaluation:
    """Compute every metric that the given inputs allow for the samples in ``samples`` (a samples ``.npz``).

    ``inception`` (a :class:`rcdm.inception.FIDInception`) enables FID (against ``reference_stats`` or the
    statistics of ``reference_images``), IS and precision/recall; ``encoder`` (the conditioning encoder)
    enables FD_rep and rank/MRR against ``features`` (or the samples file's own conditioning features).
    ``*_missing`` explain in the status column why a network is absent. ``n_fid`` limits the Inception
    metrics (FID, IS, precision/recall) to the first ``n_fid`` samples (the paper: 10,000 for FID/IS, all
    50,000 for rank/MRR), which also saves those Inception passes.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    ev = Evaluation()
    samples = Path(samples)
    shape, dtype = npz_array_shape(samples)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{samples}: arr_0 is {dtype} {shape}, expected uint8 [N, H, W, 3]")
    n = shape[0]
    n_inc = n if n_fid is None else min(n, int(n_fid))
    meta = read_npz_meta(samples)
    settings = meta["settings"]
    ev.values.update(
        n_samples=n, sampler=settings.get("sampler"), steps=settings.get("num_steps", settings.get("steps")),
        eta=settings.get("eta"), seed=settings.get("seed"),
        samples_per_image=settings.get("samples_per_image"),
        model_sha256=settings.get("model_sha256") or settings.get("checkpoint_sha256"),
        dataset=settings.get("dataset"),
        encoder=settings.get("encoder"), layer=settings.get("layer"), samples_file=str(samples),
    )  # fmt: skip

    if meta["cond_index"] is not None:  # the chance level needs only the number of conditionings
        ev.values["n_cond"] = int(len(np.unique(meta["cond_index"])))
        ev.values["chance_mrr"] = chance_mrr(ev.values["n_cond"])

    # --- conditionings (for FD_rep and rank)
    cond = None
    if encoder is None:
        ev.status.append(f"fd_rep, rank: {encoder_missing}")
    else:
        try:
            cond = conditioning_embeddings(meta, features)
        except FileNotFoundError as err:
            ev.status.append(f"fd_rep, rank: {err}")
            encoder = None
        if cond is not None and cond[1].shape[1] != int(encoder.dim):
            raise ValueError(
                f"the encoder gives {encoder.dim}-d representations but the conditionings ({cond[2]}) are "
                f"{cond[1].shape[1]}-d: evaluate with the encoder and layer the samples were conditioned on"
            )
    if inception is None:
        ev.status.append(f"fid, is: {inception_missing}")
    else:
        ev.values["inception_sha256"] = inception.weights_sha256
        ev.values["n_fid"] = n_inc

    # --- one streaming pass over the samples
    inc_stats = RunningStats(2048, device=device) if inception is not None else None
    rep_stats = RunningStats(int(encoder.dim), device=device) if encoder is not None else None
    logits, pools, embs = [], [], []
    embedder = _Embedder(encoder, device, workers) if encoder is not None else None
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(total=n, unit="img", desc=f"evaluate {samples.name}", disable=not progress)
            seen = 0
            for chunk in iter_npz_array(samples, chunk=batch_size):
                head = chunk[: max(0, n_inc - seen)]
                seen += len(chunk)
                if inception is not None and len(head):
                    pool, logit = inception.embed_uint8(torch.from_numpy(head.copy()))
                    inc_stats.update(pool)
                    logits.append(logit.float())
                    if with_precision_recall:
                        pools.append(pool.float())
                if embedder is not None:
                    emb = embedder(chunk)
                    rep_stats.update(emb)
                    embs.append(emb)
                bar.update(len(chunk))
            bar.close()
    finally:
        if embedder is not None:
            embedder.close()
    ev.values["seconds_embed"] = time.perf_counter() - t0

    # --- realism
    if inception is not None:
        ref = None
        if reference_stats is not None and not with_precision_recall:
            ref = load_reference_stats(reference_stats)
        elif reference_images is not None:
            ref = reference_statistics(
                inception, reference_images, n_reference=n_reference, cache_dir=cache_dir,
                batch_size=batch_size, with_features=with_precision_recall, progress=progress,
            )  # fmt: skip
        elif reference_stats is not None:
            ref = load_reference_stats(reference_stats)
            ev.status.append("precision/recall: needs --reference-images (statistics have no features)")
        else:
            ev.status.append(
                "fid: no reference images (--reference-images) or statistics (--reference-stats)"
            )
        if ref is not None:
            if n_inc < 2:
                ev.status.append("fid: needs at least 2 samples")
            else:
                ev.values["fid"] = frechet_distance_stats(
                    inc_stats, ref["mu"], ref["sigma"], rows2=ref.get("features")
                )
            ev.values["n_reference"] = int(ref["n"]) if "n" in ref else None
            if with_precision_recall and "features" in ref:
                pr = precision_recall(ref["features"], torch.cat(pools), k=3, device=device)
                ev.values.update(pr)
        if n_inc >= is_splits:
            ev.values["is_mean"], ev.values["is_std"] = inception_score(torch.cat(logits), splits=is_splits)
        else:
            ev.status.append(f"is: needs at least {is_splits} samples (splits), got {n_inc}")

    # --- faithfulness
    if encoder is not None and cond is not None:
        ids, cond_emb, _ = cond
        ev.values["n_cond"] = len(ids)
        ev.values["rank_metric"] = rank_metric
        if n >= 2 and len(ids) >= 2:
            cond64 = cond_emb.astype(np.float64)
            ev.values["fd_rep"] = frechet_distance_stats(
                rep_stats, cond64.mean(0), np.cov(cond64, rowvar=False), rows2=cond64
            )
        else:
            ev.status.append("fd_rep: needs at least 2 samples and 2 conditionings")
        sample_to_cond = np.searchsorted(ids, meta["cond_index"])
        ranks = rank_mrr(
            torch.cat(embs), torch.from_numpy(cond_emb).to(device), rank_metric,
            sample_to_cond=sample_to_cond, device=device,
        )  # fmt: skip
        ev.values.update({k: ranks[k] for k in ("mean_rank", "median_rank", "mrr", "top1", "top5")})
    return ev
