"""Scoring a sample set: realism (FID, IS, precision/recall) and faithfulness (FD_rep, rank, MRR).

One streaming pass over ``samples.npz`` feeds every metric: the FID Inception (pool3 statistics, logits for
IS, optionally pool3 features for precision/recall) and the conditioning encoder (representations of the
samples through :func:`rcdm.preprocess.encoder_view`, the path a stored image takes at extraction). FD_rep
compares the samples' representations with those of the conditioning images; rank/MRR ranks each sample's
own conditioning among all conditionings used. Reference Inception statistics are computed once per
reference set and cached in a file keyed by the reference images' content, the chosen rows and the Inception
weights. Whatever cannot be computed (no Inception file, no encoder checkpoint, ...) is left empty and the
``status`` says why; no number is ever made up.

FID/IS subsets (:func:`select_rows`). With ``n_fid`` the Inception metrics use a seeded random subset of
``n_fid`` samples (seed ``fid_seed``, default 0), never the first ones: samples are stored in conditioning
order and a class-per-folder dataset is sorted by class, so the first 10,000 of ImageNet val's 50,000 cover
about 200 classes. When the samples' conditioning images have class labels (the images file's ``labels``,
-1 = unlabelled; a sample's label is that of row ``cond_index`` of the images file named by
``conditioning_images``, else by the features file, else by the samples' settings) the subset is
class-stratified (:func:`rcdm.subsets.stratified_draw`): each class gets its share ``n_fid * n_class / n``
rounded by largest remainder (ties broken by the seed), drawn uniformly within the class; without labels it
is a uniform draw (``np.sort(np.random.default_rng(seed).choice(n, n_fid, replace=False))``). The
``n_reference`` reference images are chosen the same way from the reference images file (its own labels,
seed ``reference_seed``, default 1: a different draw, so samples conditioned on the reference images are not
paired one to one with them). ``metrics.csv`` records each choice: ``fid_selection`` / ``reference_selection``
(``all``, ``random``, ``stratified`` or, for ``--reference-stats``, ``precomputed``), the seed, the number of
classes covered and ``*_rows_sha256`` (the first 16 hex digits of the sha256 of the sorted row indices as
little-endian int64). Memory stays bounded: the sorted rows are picked chunk by chunk from the sample
stream, and reference images are read in batches of rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rcdm.formats import hdf5
from rcdm.formats.metrics_csv import COLUMNS
from rcdm.formats.npz import iter_npz_array, npz_sample_count, read_npz_meta
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
from rcdm.subsets import stratified_draw

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


FID_SEED = 0
REFERENCE_SEED = 1
DIGEST_CHARS = 16


@dataclass(frozen=True)
class Selection:
    """Rows chosen for FID/IS: sorted ``rows`` of ``n_total``, how (``method``) and with which ``seed``.

    ``n_classes``: distinct class labels (>= 0) among the chosen rows (None without labels).
    """

    rows: np.ndarray
    method: str
    seed: int
    n_total: int
    n_classes: int | None = None

    @property
    def digest(self) -> str:
        """First 16 hex digits of the sha256 of ``rows`` as little-endian int64."""
        return hashlib.sha256(np.ascontiguousarray(self.rows, dtype="<i8").tobytes()).hexdigest()[
            :DIGEST_CHARS
        ]

    def record(self, prefix: str) -> dict[str, Any]:
        """The ``metrics.csv`` fields describing this selection (``fid_*`` or ``reference_*``)."""
        return {
            f"{prefix}_selection": self.method,
            f"{prefix}_seed": self.seed,
            f"{prefix}_classes": self.n_classes,
            f"{prefix}_rows_sha256": self.digest,
        }


def select_rows(n_total: int, n_pick: int | None, seed: int, labels: np.ndarray | None = None) -> Selection:
    """A seeded subset of ``n_pick`` of ``n_total`` rows (all of them when ``n_pick`` is None or larger).

    With ``labels`` (one per row, -1 = unlabelled) that hold at least one class, the subset is stratified
    (:func:`rcdm.subsets.stratified_draw`, the studies' draw too): each label (-1 included, as one group)
    gets ``n_pick * count / n_total`` rows, floored, and the rows left over go one each to the labels with
    the largest remainders (ties in a seeded random order); the rows of a label are drawn uniformly.
    Otherwise the draw is uniform over all rows. The rows are returned sorted.
    """
    labeled = labels is not None and bool((np.asarray(labels) >= 0).any())
    if labels is not None and len(labels) != n_total:
        raise ValueError(f"{len(labels)} labels for {n_total} rows")
    if n_pick is None or n_pick >= n_total:
        rows, method = np.arange(n_total, dtype=np.int64), "all"
    elif n_pick < 0:
        raise ValueError(f"cannot pick {n_pick} rows")
    elif not labeled:
        rng = np.random.default_rng(seed)
        rows, method = np.sort(rng.choice(n_total, size=n_pick, replace=False)).astype(np.int64), "random"
    else:
        rows, method = (
            np.sort(stratified_draw(np.asarray(labels), n_pick, seed)).astype(np.int64),
            "stratified",
        )
    n_classes = None
    if labeled:
        chosen = np.asarray(labels)[rows]
        n_classes = int(len(np.unique(chosen[chosen >= 0])))
    return Selection(rows, method, int(seed), int(n_total), n_classes)


def image_labels(images_file: str | os.PathLike) -> np.ndarray:
    """The ``labels`` of an images file (int64 [N], -1 = unlabelled)."""
    with h5py.File(images_file, "r") as h5:
        return h5[hdf5.LABELS][:].astype(np.int64)


def reference_selection(
    images_file: str | os.PathLike, n_reference: int | None, seed: int = REFERENCE_SEED
) -> Selection:
    """The reference rows of ``images_file``: :func:`select_rows` over its images and labels."""
    hdf5.check_images_file(images_file, deep=False)
    labels = image_labels(images_file)
    return select_rows(len(labels), n_reference, seed, labels)


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
    seed: int = REFERENCE_SEED,
    selection: Selection | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 100,
    with_features: bool = False,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Inception pool3 ``mu``, ``sigma``, ``n`` (and ``features``) of the images of an images file.

    ``features`` are kept when asked for or when there are at most 2048 of them (they make the Frechet
    distance of a small set cheap and exact). The rows are ``selection``, by default
    :func:`reference_selection` (``n_reference`` rows, seeded, class-stratified when the file has labels),
    read in batches of ``batch_size`` rows. Results are cached in ``cache_dir`` (see
    :func:`reference_cache_path`); a cache without features is recomputed when features are needed.
    """
    from tqdm.auto import tqdm

    if selection is None:
        selection = reference_selection(images_file, n_reference, seed)
    else:
        hdf5.check_images_file(images_file, deep=False)
    rows = selection.rows
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
            pool, _ = inception.embed_uint8(torch.from_numpy(hdf5.read_rows(ds, rows[lo : lo + batch_size])))
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


@dataclass
class EvalSettings:
    """What :func:`evaluate` scores against and how (every field optional; a metric whose input is missing is
    left empty, with the ``*_missing`` reason in the status column).

    ``inception`` (a :class:`rcdm.inception.FIDInception`) enables FID (against ``reference_stats`` or the
    statistics of ``reference_images``), IS and precision/recall; ``encoder`` (the conditioning encoder)
    enables FD_rep and rank/MRR against ``features`` (or the samples file's own conditioning features).
    ``n_fid`` limits the Inception metrics (FID, IS, precision/recall) to a seeded random subset of
    ``n_fid`` samples (seed ``fid_seed``; class-stratified by the labels of the conditioning images, read
    from ``conditioning_images`` or the images file the features file or the samples' settings name; the
    paper: 10,000 for FID/IS, all 50,000 for rank/MRR), which also saves those Inception passes;
    ``n_reference`` keeps a subset of the reference images chosen the same way (seed ``reference_seed``).
    """

    features: str | os.PathLike | None = None
    encoder: torch.nn.Module | None = None
    encoder_missing: str = "no encoder given"
    inception: Any = None
    inception_missing: str = "no Inception network given"
    reference_images: str | os.PathLike | None = None
    reference_stats: str | os.PathLike | None = None
    n_reference: int | None = None
    n_fid: int | None = None
    fid_seed: int = FID_SEED
    reference_seed: int = REFERENCE_SEED
    conditioning_images: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    rank_metric: str = "cosine"
    with_precision_recall: bool = False
    is_splits: int = 10
    batch_size: int = 100
    workers: int = 4
    device: str | torch.device = "cpu"
    progress: bool = True


@dataclass
class _Streamed:
    """What the streaming pass keeps: Inception statistics/logits/pool3 rows and encoder statistics/rows."""

    inc_stats: RunningStats | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    pools: list[torch.Tensor] = field(default_factory=list)
    rep_stats: RunningStats | None = None
    embs: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(
    samples: str | os.PathLike, settings: EvalSettings | None = None, **overrides: Any
) -> Evaluation:
    """Compute every metric that ``settings`` allow for the samples in ``samples`` (a samples ``.npz``).

    ``overrides`` replace fields of ``settings`` (or of the defaults): ``evaluate(path, encoder=enc)``.
    Phases: the sample set's description, the conditionings, one streaming pass over the samples
    (:func:`stream_samples`), then the reference (:func:`reference_for`), FID/IS (:func:`fid_and_is`),
    precision/recall (:func:`sample_precision_recall`) and faithfulness (:func:`faithfulness`).
    """
    s = replace(settings if settings is not None else EvalSettings(), **overrides)
    samples = Path(samples)
    n = npz_sample_count(samples)
    meta = read_npz_meta(samples)
    ev = Evaluation()
    ev.values.update(describe_sample_set(samples, n, meta))
    encoder, cond = _conditionings(s, meta, ev)
    fid_rows = None
    if s.inception is None:
        ev.status.append(f"fid, is: {s.inception_missing}")
    else:
        selection = fid_selection(n, meta, s, ev)
        fid_rows = selection.rows
        ev.values.update(selection.record("fid"))
        ev.values["inception_sha256"] = s.inception.weights_sha256
        ev.values["n_fid"] = len(fid_rows)
    streamed = stream_samples(samples, n, s, fid_rows=fid_rows, encoder=encoder)
    ev.values["seconds_embed"] = streamed.seconds
    if fid_rows is not None:
        ref = reference_for(s, ev)
        fid_and_is(ev, s, streamed, ref, len(fid_rows))
        if s.with_precision_recall and ref is not None and "features" in ref:
            ev.values.update(sample_precision_recall(ref, streamed, s))
    if encoder is not None and cond is not None:
        faithfulness(ev, s, streamed, cond, meta["cond_index"], n)
    return ev


def fid_selection(n: int, meta: dict[str, Any], s: EvalSettings, ev: Evaluation) -> Selection:
    """The samples for FID/IS: :func:`select_rows` of ``n_fid`` of the ``n`` samples (seed ``fid_seed``),
    stratified by the labels of their conditioning images when those are known (:func:`sample_labels`)."""
    labels, note = (None, None) if s.n_fid is None or s.n_fid >= n else sample_labels(meta, s)
    if note:
        ev.status.append(note)
    return select_rows(n, s.n_fid, s.fid_seed, labels)


def sample_labels(meta: dict[str, Any], s: EvalSettings) -> tuple[np.ndarray | None, str | None]:
    """The class label of each sample (its conditioning image's), or None and, when an images file was
    named but cannot give them, a status note saying why.

    The images file is ``conditioning_images``, else the one the features file records, else the one in
    the samples' settings; its ``paths_sha256`` must match the features the samples were conditioned on.
    """
    cond_index = meta["cond_index"]
    settings = meta["settings"]
    has_features = s.features is not None and Path(s.features).is_file()
    attrs = hdf5.check_features_file(s.features, deep=False) if has_features else {}
    named = [
        (s.conditioning_images, "--conditioning-images"),
        (attrs.get("images_file"), f"the features file {s.features}"),
        (settings.get("images_file"), "the samples' settings"),
    ]
    path, source = next(((str(p), src) for p, src in named if p), (None, None))
    if cond_index is None or path is None:
        return None, None
    why = "fid subset not class-stratified"
    if not Path(path).is_file():
        return None, f"{why}: images file {path} (named by {source}) not found"
    images_attrs = hdf5.check_images_file(path, deep=False)
    expected = settings.get("features_paths_sha256") or attrs.get("paths_sha256")
    if expected and images_attrs.get("paths_sha256") != expected:
        return None, f"{why}: images file {path} holds other images than the conditioning features"
    labels = image_labels(path)
    if len(cond_index) and int(cond_index.max()) >= len(labels):
        return None, f"{why}: cond_index up to {int(cond_index.max())} but {path} has {len(labels)} images"
    return labels[cond_index], None


def describe_sample_set(samples: Path, n: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The metrics.csv fields that describe a sample set (from its settings), and the chance level."""
    settings = meta["settings"]
    values: dict[str, Any] = dict(
        n_samples=n, sampler=settings.get("sampler"), steps=settings.get("num_steps", settings.get("steps")),
        eta=settings.get("eta"), seed=settings.get("seed"),
        samples_per_image=settings.get("samples_per_image"),
        model_sha256=settings.get("model_sha256") or settings.get("checkpoint_sha256"),
        dataset=settings.get("dataset"),
        encoder=settings.get("encoder"), layer=settings.get("layer"), samples_file=str(samples),
    )  # fmt: skip
    if meta["cond_index"] is not None:  # the chance level needs only the number of conditionings
        values["n_cond"] = int(len(np.unique(meta["cond_index"])))
        values["chance_mrr"] = chance_mrr(values["n_cond"])
    return values


def _conditionings(
    s: EvalSettings, meta: dict[str, Any], ev: Evaluation
) -> tuple[torch.nn.Module | None, tuple[np.ndarray, np.ndarray, str] | None]:
    """The encoder to use (None when FD_rep/rank cannot be computed; the reason goes to the status) and the
    conditionings' representations from :func:`conditioning_embeddings`."""
    if s.encoder is None:
        ev.status.append(f"fd_rep, rank: {s.encoder_missing}")
        return None, None
    try:
        cond = conditioning_embeddings(meta, s.features)
    except FileNotFoundError as err:
        ev.status.append(f"fd_rep, rank: {err}")
        return None, None
    if cond[1].shape[1] != int(s.encoder.dim):
        raise ValueError(
            f"the encoder gives {s.encoder.dim}-d representations but the conditionings ({cond[2]}) are "
            f"{cond[1].shape[1]}-d: evaluate with the encoder and layer the samples were conditioned on"
        )
    return s.encoder, cond


def stream_samples(
    samples: Path,
    n: int,
    s: EvalSettings,
    *,
    fid_rows: np.ndarray | None,
    encoder: torch.nn.Module | None,
) -> _Streamed:
    """One pass over the samples, chunk by chunk: the sorted sample rows ``fid_rows`` through the Inception
    (pool3 statistics, logits, pool3 rows when precision/recall is asked for), every sample through the
    conditioning encoder (statistics and rows). Memory: one chunk, plus the kept logits and rows."""
    from tqdm.auto import tqdm

    device = torch.device(s.device)
    inception = s.inception if fid_rows is not None else None
    out = _Streamed()
    if inception is not None:
        out.inc_stats = RunningStats(2048, device=device)
    embedder = None
    if encoder is not None:
        out.rep_stats = RunningStats(int(encoder.dim), device=device)
        embedder = _Embedder(encoder, device, s.workers)
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc=f"evaluate {samples.name}", disable=not s.progress)
    try:
        with torch.inference_mode():
            lo = 0
            for chunk in iter_npz_array(samples, chunk=s.batch_size):
                hi = lo + len(chunk)
                if inception is not None:
                    picked = fid_rows[np.searchsorted(fid_rows, lo) : np.searchsorted(fid_rows, hi)] - lo
                    if len(picked):
                        pool, logit = inception.embed_uint8(torch.from_numpy(chunk[picked]))
                        out.inc_stats.update(pool)
                        out.logits.append(logit.float())
                        if s.with_precision_recall:
                            out.pools.append(pool.float())
                if embedder is not None:
                    emb = embedder(chunk)
                    out.rep_stats.update(emb)
                    out.embs.append(emb)
                bar.update(len(chunk))
                lo = hi
    finally:
        bar.close()
        if embedder is not None:
            embedder.close()
    out.seconds = time.perf_counter() - t0
    return out


def reference_for(s: EvalSettings, ev: Evaluation) -> dict[str, np.ndarray] | None:
    """The FID reference: ``reference_stats`` (unless precision/recall needs features) or the statistics
    of the selected ``reference_images`` (:func:`reference_selection`, recorded in ``ev``); None (and a
    status note) when neither is given."""
    if s.reference_stats is not None and not s.with_precision_recall:
        ev.values["reference_selection"] = "precomputed"
        return load_reference_stats(s.reference_stats)
    if s.reference_images is not None:
        selection = reference_selection(s.reference_images, s.n_reference, s.reference_seed)
        ev.values.update(selection.record("reference"))
        return reference_statistics(
            s.inception, s.reference_images, selection=selection, cache_dir=s.cache_dir,
            batch_size=s.batch_size, with_features=s.with_precision_recall, progress=s.progress,
        )  # fmt: skip
    if s.reference_stats is not None:
        ev.status.append("precision/recall: needs --reference-images (statistics have no features)")
        ev.values["reference_selection"] = "precomputed"
        return load_reference_stats(s.reference_stats)
    ev.status.append("fid: no reference images (--reference-images) or statistics (--reference-stats)")
    return None


def fid_and_is(
    ev: Evaluation, s: EvalSettings, streamed: _Streamed, ref: dict[str, np.ndarray] | None, n_inc: int
) -> None:
    """FID against the reference (when there is one) and IS, from the streamed Inception outputs."""
    if ref is not None:
        if n_inc < 2:
            ev.status.append("fid: needs at least 2 samples")
        else:
            ev.values["fid"] = frechet_distance_stats(
                streamed.inc_stats, ref["mu"], ref["sigma"], rows2=ref.get("features")
            )
        ev.values["n_reference"] = int(ref["n"]) if "n" in ref else None
    if n_inc >= s.is_splits:
        ev.values["is_mean"], ev.values["is_std"] = inception_score(
            torch.cat(streamed.logits), splits=s.is_splits
        )
    else:
        ev.status.append(f"is: needs at least {s.is_splits} samples (splits), got {n_inc}")


def sample_precision_recall(
    ref: dict[str, np.ndarray], streamed: _Streamed, s: EvalSettings
) -> dict[str, float]:
    """k-NN (k=3) precision and recall of the streamed pool3 rows against the reference's."""
    return precision_recall(ref["features"], torch.cat(streamed.pools), k=3, device=torch.device(s.device))


def faithfulness(
    ev: Evaluation,
    s: EvalSettings,
    streamed: _Streamed,
    cond: tuple[np.ndarray, np.ndarray, str],
    cond_index: np.ndarray,
    n: int,
) -> None:
    """FD_rep (samples' representations vs their conditionings') and rank/MRR of each sample's own
    conditioning among all conditionings used."""
    device = torch.device(s.device)
    ids, cond_emb, _ = cond
    ev.values["n_cond"] = len(ids)
    ev.values["rank_metric"] = s.rank_metric
    if n >= 2 and len(ids) >= 2:
        cond64 = cond_emb.astype(np.float64)
        ev.values["fd_rep"] = frechet_distance_stats(
            streamed.rep_stats, cond64.mean(0), np.cov(cond64, rowvar=False), rows2=cond64
        )
    else:
        ev.status.append("fd_rep: needs at least 2 samples and 2 conditionings")
    ranks = rank_mrr(
        torch.cat(streamed.embs), torch.from_numpy(cond_emb).to(device), s.rank_metric,
        sample_to_cond=np.searchsorted(ids, cond_index), device=device,
    )  # fmt: skip
    ev.values.update({k: ranks[k] for k in ("mean_rank", "median_rank", "mrr", "top1", "top5")})
