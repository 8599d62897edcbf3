"""Stage ``rcdm extract``: decode each image once, write its centre crop and its encoder features to HDF5.

One pass over a dataset slice produces any of: the images file (crops at the model resolution, labels,
paths, factors) and one features file per encoder layer (trunk and head from one trunk pass). DataLoader
workers decode and crop; the encoder runs batched under ``inference_mode`` on the image and its mirror, in
fp32 as the published code does (``--precision bf16`` opts into bf16 autocast, recorded in the features
file's ``precision`` attribute; docs/speed.md gives its measured effect); rows are appended in chunks, so
memory does not grow with the dataset. Each output is written under a temporary name and renamed when
complete; a finished output is never redone (a rerun is a no-op) and one made with other settings is an
error rather than silently kept or overwritten. ``--check`` opens the dataset, finds the shard and loads the
encoder on the CPU with every requested layer, then exits without decoding an image or writing: the
workflow's ``extract_features_check`` job.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rcdm import finished
from rcdm.data import BAD_IMAGE_POLICIES, BadImageError, ImageSource, open_dataset_input
from rcdm.device import DEVICE_HELP, default_workers, resolve_device
from rcdm.errors import CHECK_HELP, REFETCH, InputFileError, check_passed, reading
from rcdm.formats import hdf5 as hs
from rcdm.io import atomic_path, sha256_file
from rcdm.preprocess import CROP_METHOD, INPUT_NORMS, center_crop_arr, encoder_input

log = logging.getLogger(__name__)

#: attributes that identify what a file was made from; they must match for a rerun to count as done
IDENTITY_KEYS = (
    "kind", "dataset", "split", "selection_seed", "num_images_requested", "source_size",
    "shard", "num_shards", "shard_start", "shard_stop", "image_size",
    "encoder", "layer", "encoder_sha256", "dtype", "precision", "input_norm_requested",
    "input_size_requested",
    # a generated set's drawing: shapes' rendering resolution and style (files of other sources lack them)
    "native_size", "max_count", "shape_kinds", "max_rotation", "primary_size_min", "primary_size_max",
)  # fmt: skip
#: the encoder's compute precision: fp32 (default, as published) or bf16 autocast (opt-in)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Output:
    """One file to produce: its kind, its (part) path, the layer for features, and its identity attributes."""

    kind: str
    path: Path
    attrs: dict[str, Any]
    layer: str | None = None


@dataclass
class ExtractJob:
    """What to extract: a dataset slice and the outputs wanted (final paths; part names derive from them)."""

    source: ImageSource
    dataset: str
    split: str
    image_size: int | None = None
    images_out: Path | None = None
    features_out: dict[str, Path] = field(default_factory=dict)
    encoder_name: str = ""
    encoder_sha256: str = ""
    dtype: str = "float32"
    precision: str = "fp32"
    shard: int = 0
    num_shards: int = 1
    selection_seed: int = 0
    num_images_requested: int | None = None
    input_norm: str | None = None  # override of the encoder's own input_norm (recorded; None: its default)
    input_size: int | None = None  # override of the encoder's own input_size

    def __post_init__(self) -> None:
        if self.images_out is None and not self.features_out:
            raise ValueError("nothing to extract: give an images output and/or features outputs")
        if self.images_out is not None and not self.image_size:
            raise ValueError("an images output needs image_size")
        if self.features_out and not self.encoder_name:
            raise ValueError("features outputs need an encoder")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.dtype not in hs.FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(hs.FEATURE_DTYPES)}, got {self.dtype!r}")
        unknown = set(self.features_out) - {"trunk", "head"}
        if unknown:
            raise ValueError(f"unknown feature layers {sorted(unknown)}; choose trunk and/or head")
        self.start, self.stop = hs.shard_range(len(self.source), self.shard, self.num_shards)

    def _path(self, final: Path) -> Path:
        return Path(final) if self.num_shards == 1 else hs.part_path(final, self.shard, self.num_shards)

    def outputs(self) -> list[Output]:
        common = {
            "format_version": hs.FORMAT_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "selection_seed": self.selection_seed,
            "num_images_requested": -1 if self.num_images_requested is None else self.num_images_requested,
            "source_size": len(self.source),
            "shard": self.shard,
            "num_shards": self.num_shards,
            "shard_start": self.start,
            "shard_stop": self.stop,
            "crop_method": CROP_METHOD,
            **self.source.attrs(),
        }
        outs = []
        if self.images_out is not None:
            attrs = {"kind": hs.KIND_IMAGES, **common, "image_size": self.image_size}
            outs.append(Output(hs.KIND_IMAGES, self._path(self.images_out), attrs))
        for layer, path in sorted(self.features_out.items(), reverse=True):  # trunk before head
            attrs = {
                "kind": hs.KIND_FEATURES,
                **common,
                "encoder": self.encoder_name,
                "layer": layer,
                "encoder_sha256": self.encoder_sha256,
                "dtype": self.dtype,
                "precision": self.precision,
                "input_norm_requested": self.input_norm or "",
                "input_size_requested": self.input_size or 0,
                "images_file": "" if self.images_out is None else str(self.images_out),
            }
            outs.append(Output(hs.KIND_FEATURES, self._path(path), attrs, layer))
        return outs


def _identity_diff(found: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    keys = sorted(k for k in wanted if k in IDENTITY_KEYS and k not in ignore and found.get(k) != wanted[k])
    return ", ".join(f"{k}: file {found.get(k)!r} vs requested {wanted[k]!r}" for k in keys)


def _merged_final(job: ExtractJob, out: Output) -> Path | None:
    """For a shard, the final merged file that already contains it (parts may have been deleted), if any."""
    if job.num_shards == 1:
        return None
    final = Path(job.images_out if out.kind == hs.KIND_IMAGES else job.features_out[out.layer])
    if not final.exists():
        return None
    found = hs.check_file(final, deep=False)
    if found.get("merged_parts") != job.num_shards or _identity_diff(found, out.attrs, hs.SHARD_ATTRS_ALL):
        return None
    return final


def pending_outputs(job: ExtractJob, keep_dir: Path | None = None) -> list[Output]:
    """The outputs of ``job`` still to write; finished ones with matching settings are skipped (logged).

    A shard counts as finished when its part exists, or when the final file merged from all parts does, or
    when ``keep_dir`` holds a copy of its part made with these settings (:mod:`rcdm.finished`: linked back).
    An existing file made with other settings, or a broken one, raises ``FileExistsError`` naming the
    differences: delete it (or pick another name) to redo it.
    """
    todo = []
    for out in job.outputs():
        if keep_dir is not None and job.num_shards > 1:
            finished.restore(out.path, keep_dir, lambda kept, out=out: _made_with(kept, out))
        if not out.path.exists():
            merged = _merged_final(job, out)
            if merged is None:
                todo.append(out)
            else:
                log.info("%s: already merged into %s, nothing to do for it", out.path, merged)
            continue
        try:
            found = hs.check_file(out.path, deep=False)
        except (hs.H5SchemaError, OSError) as err:
            raise FileExistsError(
                f"{out.path} exists but is not a valid {out.kind} file ({err}); delete it"
            ) from err
        diff = _identity_diff(found, out.attrs)
        if diff:
            raise FileExistsError(f"{out.path} exists with other settings ({diff}); delete it to redo it")
        log.info("%s is already complete (%d images): nothing to do for it", out.path, found["num_images"])
    return todo


def _made_with(path: Path, out: Output) -> bool:
    """Whether ``path`` is a complete file of ``out``'s kind and settings (False when it is broken)."""
    try:
        found = hs.check_file(path, deep=False)
    except (hs.H5SchemaError, OSError, KeyError):
        return False
    return found.get("kind") == out.kind and not _identity_diff(found, out.attrs)


# --------------------------------------------------------------------------------------- data loading


class _CropDataset(torch.utils.data.Dataset):
    """Decodes image ``start + j`` once and returns its crops (model size and/or encoder size)."""

    def __init__(
        self, source: ImageSource, start: int, stop: int, image_size: int | None, enc_size: int | None
    ):
        self.source, self.start, self.stop = source, start, stop
        self.image_size, self.enc_size = image_size, enc_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.start + j
        item: dict[str, Any] = {"key": self.source.key(i)}
        try:
            image = self.source.load(i)
        except BadImageError as err:
            item["error"] = str(err)
            return item
        item["label"] = self.source.label(i)
        item["factors"] = self.source.factors(i)
        if self.image_size:
            item["image"] = center_crop_arr(image, self.image_size)
        if self.enc_size:
            item["enc"] = center_crop_arr(image, self.enc_size)
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "error" not in it]
    batch: dict[str, Any] = {
        "bad": [(it["key"], it["error"]) for it in items if "error" in it],
        "n_items": len(items),
        "keys": [it["key"] for it in good],
        "labels": np.array([it["label"] for it in good], dtype=np.int64),
        "factors": {
            k: np.array([it["factors"][k] for it in good]) for k in (good[0]["factors"] if good else {})
        },
    }
    for name in ("image", "enc"):
        if good and name in good[0]:
            batch[name] = torch.from_numpy(np.stack([it[name] for it in good]))
    return batch


# --------------------------------------------------------------------------------------- the extraction


@dataclass
class ExtractSummary:
    """Counts of one run: images written per output, bad files (``path: reason``), outputs, timing."""

    num_images: int = 0
    bad: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _encoder_dims(encoder: nn.Module) -> dict[str, int]:
    """Layer -> dim of an ``rcdm.encoders`` module: one layer (``layer``, ``dim``) or a pair (``dims``)."""
    if hasattr(encoder, "dims"):
        return {k: int(v) for k, v in encoder.dims.items()}
    return {encoder.layer: int(encoder.dim)}


def encoder_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context the encoder runs in: nothing for fp32, bf16 autocast on ``device`` for bf16."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class _FeatureSink:
    """Encodes a batch on the device and writes the previous batch's features meanwhile (one batch lag)."""

    def __init__(self, encoder, writers, layers, dtype, device, precision: str):
        self.encoder, self.writers, self.layers = encoder, writers, layers
        self.dtype = getattr(torch, dtype)
        self.device, self.precision = device, precision
        self.input_norm = encoder.input_norm
        self.pending: tuple[dict[str, torch.Tensor], list[str], torch.cuda.Event | None] | None = None

    @torch.inference_mode()
    def submit(self, enc: torch.Tensor, keys: list[str]) -> None:
        x = encoder_input(enc.to(self.device, non_blocking=True), self.input_norm)
        n = x.shape[0]
        x = torch.cat([x, x.flip(-1)])
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with encoder_precision(self.device, self.precision):
            out = self.encoder(x)
        out = out if isinstance(out, Mapping) else {self.encoder.layer: out}
        host = {}
        for layer in self.layers:
            f = out[layer].float().reshape(2, n, -1).transpose(0, 1).to(self.dtype).contiguous()
            host[layer] = f.to("cpu", non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.flush()
        self.pending = (host, keys, event)

    def flush(self) -> None:
        if self.pending is None:
            return
        host, keys, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        for layer in self.layers:
            feats = host[layer].numpy()
            if not np.isfinite(feats).all():
                raise FloatingPointError(
                    f"encoder produced NaN/inf {layer} features for images {keys[0]} .. {keys[-1]}"
                    + (" (float16 overflow? try --dtype float32)" if self.dtype == torch.float16 else "")
                )
            self.writers[layer].append({hs.FEATURES: feats, hs.PATHS: keys})


def run_extraction(
    job: ExtractJob,
    encoder_factory: Callable[[list[str]], nn.Module] | None = None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    on_bad_image: str = "skip",
    progress: bool = True,
    keep_finished: Path | None = None,
) -> ExtractSummary:
    """Produce the pending outputs of ``job`` in one pass over its slice; return what happened.

    ``encoder_factory(layers)`` is called only when features are pending and returns an ``rcdm.encoders``
    module: ``load(...)`` for one layer, ``load_pair(...)`` for ``["trunk", "head"]``. Phases: what is
    still to do (:func:`pending_outputs`), the encoder and the loader, the writers, the encode loop
    (:func:`_encode_loop`), then the final attributes (:func:`_finish_outputs`) and the renames.
    ``keep_finished`` (shards only): a folder where every finished output is kept, and found again
    (:mod:`rcdm.finished`).
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    summary = ExtractSummary()
    keep_dir = keep_finished if job.num_shards > 1 else None
    todo = pending_outputs(job, keep_dir)
    summary.skipped = [o.path for o in job.outputs() if o not in todo]
    if keep_dir is not None:  # the outputs already there: kept too (a hard link costs nothing)
        for path in summary.skipped:
            if path.exists():
                finished.keep(path, keep_dir)
    if not todo:
        log.info(
            "extract %s/%s shard %d/%d: every output is already complete",
            job.dataset, job.split, job.shard, job.num_shards,
        )  # fmt: skip
        return summary
    t0 = time.perf_counter()
    dev = resolve_device(device)
    images_out = next((o for o in todo if o.kind == hs.KIND_IMAGES), None)
    feature_outs = {o.layer: o for o in todo if o.kind == hs.KIND_FEATURES}
    encoder, dims = _open_encoder(encoder_factory, feature_outs, dev)
    loader = _loader(job, images_out is not None, encoder, batch_size, workers, dev)
    with contextlib.ExitStack() as stack:
        files = {out.path: stack.enter_context(_temporary_h5(out.path)) for out in todo}
        img_writer = _images_writer(files[images_out.path], job) if images_out is not None else None
        sink = None
        if encoder is not None:
            writers = _feature_writers(files, feature_outs, dims, job.dtype)
            sink = _FeatureSink(encoder, writers, list(feature_outs), job.dtype, dev, job.precision)
        bar = tqdm(
            total=job.stop - job.start, unit="img", desc=f"extract {job.dataset}/{job.split}",
            file=sys.stderr, disable=not progress, smoothing=0.1,
        )  # fmt: skip
        paths_sha = _encode_loop(loader, img_writer, sink, summary, on_bad_image, bar)
        _check_against_images(job, feature_outs, images_out, paths_sha, summary.num_images)
        _finish_outputs(files, todo, encoder, dims, summary, paths_sha)
    summary.written = [o.path for o in todo]
    if keep_dir is not None:
        for path in summary.written:
            finished.keep(path, keep_dir)
    summary.seconds = time.perf_counter() - t0
    _log_summary(job, summary)
    return summary


def _open_encoder(
    encoder_factory: Callable[[list[str]], nn.Module] | None,
    feature_outs: dict[str, Output],
    dev: torch.device,
) -> tuple[nn.Module | None, dict[str, int]]:
    """The encoder for the pending feature layers (None when there are none) and its dim per layer."""
    if not feature_outs:
        return None, {}
    if encoder_factory is None:
        raise ValueError("features are pending but no encoder was given")
    encoder = encoder_factory(sorted(feature_outs, reverse=True)).to(dev).eval()
    if dev.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    dims = _encoder_dims(encoder)
    missing = set(feature_outs) - set(dims)
    if missing:
        raise ValueError(f"encoder provides layers {sorted(dims)}, not {sorted(missing)}")
    return encoder, dims


def _loader(
    job: ExtractJob, with_images: bool, encoder: nn.Module | None, batch_size: int, workers: int, dev
) -> torch.utils.data.DataLoader:
    """DataLoader over the job's slice: each image decoded once, cropped at the sizes the outputs need."""
    dataset = _CropDataset(
        job.source, job.start, job.stop, job.image_size if with_images else None,
        int(encoder.input_size) if encoder is not None else None,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )  # fmt: skip


@contextlib.contextmanager
def _temporary_h5(path: Path):
    """An HDF5 file open for writing under a temporary name; closed, then renamed to ``path`` on a clean
    exit (:func:`rcdm.io.atomic_path`), removed otherwise."""
    with atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as h5:
        yield h5


def _images_writer(h5: h5py.File, job: ExtractJob) -> hs.ChunkedWriter:
    """Writer of the images file's datasets (crops, labels, paths, factors with their categories)."""
    s = job.image_size
    specs: dict[str, tuple] = {
        hs.IMAGES: ((s, s, 3), np.uint8),
        hs.LABELS: ((), np.int64),
        hs.PATHS: ((), hs.STR),
    }
    specs |= {f"{hs.FACTORS}/{k}": ((), np.dtype(dt)) for k, (dt, _) in job.source.factor_specs.items()}
    writer = hs.ChunkedWriter(h5, specs)
    for k, (_, categories) in job.source.factor_specs.items():
        if categories is not None:
            writer.datasets[f"{hs.FACTORS}/{k}"].attrs[hs.CATEGORIES] = np.array(categories, dtype=hs.STR)
    return writer


def _feature_writers(
    files: dict[Path, h5py.File], feature_outs: dict[str, Output], dims: dict[str, int], dtype: str
) -> dict[str, hs.ChunkedWriter]:
    """One writer per pending features file: ``features`` [N, 2, D] and ``paths``."""
    return {
        layer: hs.ChunkedWriter(
            files[o.path], {hs.FEATURES: ((2, dims[layer]), hs.FEATURE_DTYPES[dtype]), hs.PATHS: ((), hs.STR)}
        )
        for layer, o in feature_outs.items()
    }


def _encode_loop(loader, img_writer, sink, summary: ExtractSummary, on_bad_image: str, bar) -> str:
    """The pass over the data: bad files recorded (or raised), crops and features appended batch by batch.
    Returns the digest of the paths written."""
    digest = hs.PathsDigest()
    with bar:
        for batch in loader:
            _record_bad(batch["bad"], on_bad_image, summary)
            keys = batch["keys"]
            if keys:
                digest.update(keys)
                if sink is not None:
                    sink.submit(batch["enc"], keys)
                if img_writer is not None:
                    rows = {hs.IMAGES: batch["image"].numpy(), hs.LABELS: batch["labels"], hs.PATHS: keys}
                    rows |= {f"{hs.FACTORS}/{k}": v for k, v in batch["factors"].items()}
                    img_writer.append(rows)
                summary.num_images += len(keys)
            bar.update(batch["n_items"])
        if sink is not None:
            sink.flush()
    return digest.hexdigest()


class BadImageFileError(InputFileError, BadImageError):
    """An image file that cannot be decoded, with ``on_bad_image="error"``: names the file and what to do."""


def _record_bad(bad: list[tuple[str, str]], on_bad_image: str, summary: ExtractSummary) -> None:
    for key, reason in bad:
        if on_bad_image == "error":
            end = reason.find(f"{key}: ") + len(key)  # decode_image's reasons read "<path>: <problem>"
            path, problem = (key, reason) if end < len(key) else (reason[:end], reason[end + 2 :])
            raise BadImageFileError(
                path,
                f"{problem} (on_bad_image=error)",
                "replace or delete that file, or skip such files (--on-bad-image skip; config "
                "data.on_bad_image: skip)",
            )
        summary.bad.append(reason if reason.startswith(key) else f"{key}: {reason}")
        log.warning("skipping bad image %s", reason)


def _finish_outputs(
    files: dict[Path, h5py.File],
    todo: list[Output],
    encoder: nn.Module | None,
    dims: dict[str, int],
    summary: ExtractSummary,
    paths_sha: str,
) -> None:
    """Final attributes of every output (identity, encoder input, counts, digest), ``complete`` last."""
    for out in todo:
        h5 = files[out.path]
        attrs = dict(out.attrs)
        if out.kind == hs.KIND_FEATURES:
            attrs |= {
                "input_norm": encoder.input_norm,
                "input_size": int(encoder.input_size),
                "dim": dims[out.layer],
            }
        hs.write_strings(h5, hs.BAD_PATHS, summary.bad)
        counts = {"num_images": summary.num_images, "paths_sha256": paths_sha, "num_bad": len(summary.bad)}
        hs.set_attrs(h5, attrs | counts)
        h5.attrs["complete"] = True


def _check_against_images(job, feature_outs, images_out, paths_sha: str, n: int) -> None:
    """Features added to an images file made earlier must cover exactly its images (checked pre-rename)."""
    if not feature_outs or images_out is not None or job.images_out is None:
        return
    images_path = job._path(job.images_out)
    if not images_path.exists():
        return
    found = hs.check_images_file(images_path, deep=False)
    if found["paths_sha256"] != paths_sha or found["num_images"] != n:
        raise hs.H5SchemaError(
            f"the images in {images_path} ({found['num_images']}) differ from those decoded now ({n}): "
            "the dataset changed since it was written; delete it and extract both again"
        )


def _log_summary(job: ExtractJob, summary: ExtractSummary) -> None:
    rate = summary.num_images / max(summary.seconds, 1e-9)
    shown = summary.bad[:50]
    more = (
        f" (+{len(summary.bad) - 50} more, all listed in the files' {hs.BAD_PATHS})"
        if len(summary.bad) > 50
        else ""
    )
    log.info(
        "extract %s/%s [%d, %d): %d images, %d bad files skipped%s; %.1f s, %.1f img/s; wrote %s",
        job.dataset, job.split, job.start, job.stop, summary.num_images, len(summary.bad),
        (": " + "; ".join(shown) + more) if shown else "", summary.seconds, rate,
        ", ".join(map(str, summary.written)),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- CLI


def _parse_features_out(items: Sequence[str] | None, layers: Sequence[str] | None) -> dict[str, Path]:
    """``LAYER=PATH`` items (a bare PATH is allowed when exactly one layer is requested)."""
    out: dict[str, Path] = {}
    for item in items or []:
        layer, sep, path = item.partition("=")
        if not sep:
            if not layers or len(layers) != 1:
                raise ValueError(f"--features-out {item!r}: use LAYER=PATH (e.g. trunk={item})")
            layer, path = layers[0], item
        if layer in out:
            raise ValueError(f"--features-out names layer {layer!r} twice")
        out[layer] = Path(path)
    if layers and set(layers) != set(out):
        raise ValueError(f"--layers {sorted(layers)} but --features-out gives {sorted(out)}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Writes an images file (uint8 crops, labels, paths, shapes factors) and/or one features file per "
        "encoder layer ([N, 2, D]: image and mirror). With --num-shards k, each output X.h5 becomes "
        "X.part-000i-of-000k.h5; join them with `rcdm merge-extract`. Finished outputs are skipped on rerun."
    )
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="shapes | photos | PATH of an image folder")
    g.add_argument(
        "--split", default="train", help="split name (generates it for shapes; recorded otherwise)"
    )
    g.add_argument("--num-images", type=int, help="shapes: split size; others: a seeded random subset")
    g.add_argument("--seed", type=int, default=0, help="shapes generation seed / subset seed")
    g.add_argument("--native-size", type=int, default=64, help="shapes: rendering resolution")
    g.add_argument("--shapes-kinds", nargs="+", metavar="KIND", help="shapes: the kinds drawn (default all)")
    g.add_argument("--shapes-max-count", type=int, help="shapes: most shapes in an image (default 3)")
    g.add_argument(
        "--shapes-rotation", type=float, help="shapes: largest rotation, degrees (default 360; 0 upright)"
    )
    g.add_argument(
        "--shapes-size", type=float, nargs=2, metavar=("MIN", "MAX"),
        help="shapes: primary shape diameter range, fractions of the side (default 0.3 0.7)",
    )  # fmt: skip
    g.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="skip")
    o = parser.add_argument_group("outputs")
    o.add_argument("--image-size", type=int, help="model resolution S of the stored crops")
    o.add_argument(
        "--images-out", type=Path, help="images file (also recorded by, and checked against, features)"
    )
    o.add_argument(
        "--encoder", help="dino | simclr | barlow | vicreg | supervised | small | package.module:factory"
    )
    o.add_argument("--encoder-checkpoint", type=Path, help="the encoder's weight file")
    o.add_argument("--trust-encoder", action="store_true", help="allow encoder files that unpickle code")
    # Old spellings (before 0.2), kept so scripts keep working: --checkpoint read as the RCDM model elsewhere.
    o.add_argument("--checkpoint", type=Path, dest="old_checkpoint", help=argparse.SUPPRESS)
    o.add_argument("--trust-checkpoint", action="store_true", dest="old_trust", help=argparse.SUPPRESS)
    o.add_argument(
        "--layers", nargs="+", choices=("trunk", "head"), help="default: the layers of --features-out"
    )
    o.add_argument("--features-out", nargs="+", metavar="LAYER=PATH", help="e.g. trunk=T.h5 head=H.h5")
    o.add_argument("--dtype", choices=sorted(hs.FEATURE_DTYPES), default="float32")
    o.add_argument("--input-norm", choices=INPUT_NORMS, help="override the encoder's input normalisation")
    o.add_argument("--input-size", type=int, help="override the encoder's input resolution (224 published)")
    r = parser.add_argument_group("run")
    r.add_argument("--shard", type=int, default=0)
    r.add_argument("--num-shards", type=int, default=1)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument(
        "--workers", type=int, default=default_workers(), help="DataLoader processes decoding and cropping"
    )
    r.add_argument("--device", default="auto", help=DEVICE_HELP)
    r.add_argument(
        "--precision", choices=tuple(PRECISIONS), default="fp32",
        help="encoder compute precision: fp32 (default, as the published code) or bf16 autocast (faster on "
        "GPUs; recorded in the features file; its measured effect is in docs/speed.md)",
    )  # fmt: skip
    # Before 0.3 the default was bf16 on CUDA and --no-autocast selected fp32, which is now the default.
    r.add_argument("--no-autocast", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--keep-finished", type=Path, metavar="DIR", help=finished.KEEP_HELP)
    r.add_argument("--check", action="store_true", help=f"{CHECK_HELP} (no image encoded)")


def _deprecated_spellings(args: argparse.Namespace) -> None:
    """Map the old ``--checkpoint`` / ``--trust-checkpoint`` onto the encoder options, with a warning."""
    if args.old_checkpoint is not None:
        if args.encoder_checkpoint is not None:
            raise SystemExit("rcdm extract: give --encoder-checkpoint only (--checkpoint is its old name)")
        print("rcdm extract: --checkpoint is deprecated, use --encoder-checkpoint", file=sys.stderr)
        args.encoder_checkpoint = args.old_checkpoint
    if args.no_autocast:
        if args.precision != "fp32":
            raise SystemExit("rcdm extract: --no-autocast (fp32) contradicts --precision " + args.precision)
        print("rcdm extract: --no-autocast is deprecated: fp32 is the default (--precision)", file=sys.stderr)
    if args.old_trust:
        print("rcdm extract: --trust-checkpoint is deprecated, use --trust-encoder", file=sys.stderr)
        args.trust_encoder = True


def _check(args: argparse.Namespace, job: ExtractJob, factory: Callable[[list[str]], nn.Module]) -> int:
    """``--check``: the dataset opened and its shard found (``job``), the encoder loaded on the CPU as the
    run loads it, with every requested layer; nothing read from the images, nothing written."""
    wanted = dict(job.features_out)
    _, dims = _open_encoder(factory if wanted else None, wanted, torch.device("cpu"))
    layers = ", ".join(f"{layer} {dims[layer]}-d" for layer in sorted(wanted, reverse=True))
    shard = f"shard {job.shard} of {job.num_shards}: {job.stop - job.start}"
    encoder = f"; encoder {args.encoder}: {layers}" if layers else ""
    return check_passed("extract", f"{args.dataset} ({len(job.source)} images; {shard}){encoder}")


def dataset_options(args: argparse.Namespace) -> dict:
    """The ``--shapes-*`` options given, as :class:`rcdm.shapes.Style` fields (empty: the default style)."""
    given = {
        "kinds": args.shapes_kinds,
        "max_count": args.shapes_max_count,
        "rotation": args.shapes_rotation,
        "size": args.shapes_size,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if options and args.dataset != "shapes":
        flags = ", ".join("--shapes-" + k.replace("_", "-") for k in options)
        raise SystemExit(
            f"rcdm extract: {flags} set the shapes style; --dataset {args.dataset} is not shapes"
        )
    if options:
        from rcdm.shapes import Style

        try:
            Style(**options)
        except ValueError as err:
            raise SystemExit(f"rcdm extract: {err}") from None
    return options


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _deprecated_spellings(args)
    features_out = _parse_features_out(args.features_out, args.layers)
    if features_out and not args.encoder:
        raise SystemExit("rcdm extract: --features-out needs --encoder (and usually --encoder-checkpoint)")
    source = open_dataset_input(
        args.dataset, args.split, args.num_images, args.seed, args.native_size, options=dataset_options(args)
    )
    sha = ""
    if features_out and args.encoder_checkpoint is not None:
        with reading(args.encoder_checkpoint, fix=REFETCH):
            sha = sha256_file(args.encoder_checkpoint)
    job = ExtractJob(
        source=source,
        dataset=args.dataset,
        split=args.split,
        image_size=args.image_size,
        images_out=args.images_out,
        features_out=features_out,
        encoder_name=args.encoder or "",
        encoder_sha256=sha,
        dtype=args.dtype,
        precision=args.precision,
        shard=args.shard,
        num_shards=args.num_shards,
        selection_seed=args.seed,
        num_images_requested=args.num_images,
        input_norm=args.input_norm,
        input_size=args.input_size,
    )

    def factory(layers: list[str]) -> nn.Module:
        from rcdm import encoders

        kw = dict(trust=args.trust_encoder, input_size=args.input_size, input_norm=args.input_norm)
        with reading(args.encoder_checkpoint, fix=REFETCH):
            if len(layers) == 2:
                return encoders.load_pair(args.encoder, args.encoder_checkpoint, **kw)
            return encoders.load(args.encoder, args.encoder_checkpoint, layers[0], **kw)

    if args.check:
        return _check(args, job, factory)
    try:
        run_extraction(
            job,
            factory,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            on_bad_image=args.on_bad_image,
            progress=not args.no_progress,
            keep_finished=finished.keep_dir(args.keep_finished),
        )
    except FileExistsError as err:  # an existing output made otherwise, or broken: it names it and the fix
        raise SystemExit(f"rcdm extract: error: {err}") from None
    return 0
