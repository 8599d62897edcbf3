"""``rcdm bench``: throughput and memory of every pipeline stage on the current device (a measurement).

Benchmarks (``--benchmarks``): ``sample`` (images/s of full sampling runs per sampler, step count and batch
size), ``train`` (full training steps: forward, hybrid loss, backward, AdamW, EMA), ``update`` (the optimizer
step and EMA update alone: for-loop vs foreach vs fused AdamW, per-tensor vs foreach EMA), ``data`` (training
batches read from HDF5 with 0 vs N DataLoader workers and prefetching), ``extract`` (decode + crop + encode +
write of a synthetic JPEG folder through ``rcdm.stages.extract.run_extraction``) and ``evaluate`` (the
embedding pass of ``rcdm.scoring.evaluate``: conditioning encoder, plus the FID Inception when available).

Two kinds of comparison, each a ratio of images/s measured in the same run:

* ``speedup_vs_fp32_eager``: each UNet *variant* (bf16 autocast, channels_last, torch.compile, the einsum
  attention reference instead of SDPA, CUDA graphs for sampling; all chosen options together) against the
  plain fp32 eager path. Benchmarks without a UNet run for the baseline variant only.
* ``speedup_vs_plain``: options inside a benchmark (``option`` column, e.g. ``batch=16``, ``adamw=fused``,
  ``workers=2``) against its plain setting (``plain_option`` column, e.g. ``batch=1``, ``adamw=for-loop``).

Timing is honest: warm-up runs first (compilation, allocator, autotuning, graph capture), the device is
synchronised around every timed repeat, and the median with min / max / interquartile range is reported.
Results go to ``NAME.csv`` and ``NAME.json``. Other modules add benchmarks with :func:`register`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rcdm.device import resolve_device
from rcdm.factory import MODEL_FLAGS_128
from rcdm.io import atomic_path

__all__ = [
    "BENCHMARKS",
    "CSV_COLUMNS",
    "PRESETS",
    "BenchContext",
    "Variant",
    "add_arguments",
    "flags_from_spec",
    "measure",
    "random_resnet50",
    "random_small_encoder",
    "register",
    "run",
    "run_benchmarks",
    "summarize",
    "variants",
    "write_results",
]

#: Model flag presets: the published 128 px checkpoints' flags and a small model for quick checks.
PRESETS: dict[str, dict[str, Any]] = {
    "128": dict(MODEL_FLAGS_128),
    "small": {
        "attention_resolutions": "16,8",
        "channel_mult": "1,2,2",
        "diffusion_steps": 1000,
        "image_size": 32,
        "learn_sigma": True,
        "num_channels": 64,
        "num_heads": 4,
        "num_res_blocks": 1,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "ssl_dim": 128,
    },
}

CSV_COLUMNS = [
    "benchmark",
    "variant",
    "dtype",
    "channels_last",
    "compile",
    "attention",
    "cuda_graph",
    "option",
    "plain_option",
    "sampler",
    "steps",
    "nfe",
    "batch_size",
    "image_size",
    "images",
    "repeats",
    "median_s",
    "min_s",
    "max_s",
    "iqr_s",
    "images_per_s",
    "speedup_vs_fp32_eager",
    "speedup_vs_plain",
    "peak_mem_mb",
    "mem_kind",
    "device",
]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the UNet: compute dtype, memory format, compilation, attention, CUDA graphs."""

    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    attention: str = "sdpa"
    cuda_graph: bool = False

    @property
    def name(self) -> str:
        parts = (
            [self.dtype]
            + (["channels_last"] if self.channels_last else [])
            + (["compile"] if self.compile else [])
            + (["attn_einsum"] if self.attention == "einsum" else [])
            + (["cuda_graph"] if self.cuda_graph else [])
        )
        return "+".join(parts) if len(parts) > 1 or self.dtype != "fp32" else "fp32_eager"

    @property
    def is_baseline(self) -> bool:
        return self == Variant()


@dataclasses.dataclass
class BenchContext:
    """What every benchmark gets: the model flags, the device, the parsed command line and a scratch dir."""

    flags: dict[str, Any]
    device: torch.device
    args: argparse.Namespace
    scratch: Path | None = None

    def build(self, variant: Variant, train: bool = False):
        """A fresh (model, diffusion) for ``variant``, seeded so every variant has the same weights."""
        from rcdm.factory import create_model_and_diffusion

        torch.manual_seed(self.args.seed)
        model, diffusion = create_model_and_diffusion(**self.flags)
        model = model.to(self.device).train(train)
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if variant.compile:
            model = torch.compile(model)
        return model, diffusion

    def autocast(self, variant: Variant) -> contextlib.AbstractContextManager:
        """bf16 autocast for the bf16 variant, nothing otherwise."""
        if variant.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def running(self, variant: Variant) -> Iterator[None]:
        """Autocast and the attention backend of ``variant`` (entered around every timed call)."""
        from rcdm.unet import attention_backend

        with attention_backend(variant.attention), self.autocast(variant):
            yield

    def inputs(self, batch: int, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images in [-1, 1] and representations, in the variant's memory format."""
        gen = torch.Generator(device="cpu").manual_seed(self.args.seed)
        size, dim = int(self.flags["image_size"]), int(self.flags.get("ssl_dim", 2048))
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(self.device)
        feat = torch.randn(batch, dim, generator=gen).to(self.device)
        if variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, feat

    def workdir(self, name: str) -> Path:
        """A fresh directory under the scratch directory (synthetic inputs, throw-away outputs)."""
        if self.scratch is None:
            raise RuntimeError("BenchContext.scratch is not set")
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch))


Benchmark = Callable[[BenchContext, Variant], list[dict[str, Any]]]
BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str) -> Callable[[Benchmark], Benchmark]:
    """Decorator adding a benchmark under ``name`` (selectable with ``--benchmarks``)."""

    def deco(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float]) -> dict[str, Any]:
    """Median, min, max and interquartile range of timings (seconds)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": q[2] - q[0],
        "repeats": len(times),
    }


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> dict[str, Any]:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls; device synchronised around each call.

    Returns :func:`summarize` of the timings plus the raw ``times``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {**summarize(times), "times": times}


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict filled on exit with the peak memory in MB of the block (CUDA) or of the process (CPU)."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["mem_kind"] = "cuda_max_allocated"
    else:
        import resource

        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out["mem_kind"] = "process_max_rss"


def _timed(ctx: BenchContext, fn: Callable[[], Any], images: int, **fields: Any) -> dict[str, Any]:
    """One result row: ``fn`` processes ``images`` images per call (raw ``times`` kept for pooling)."""
    with _peak_memory(ctx.device) as mem:
        timing = measure(fn, ctx.device, warmup=ctx.args.warmup, repeats=ctx.args.repeats)
    return {"images": images, "images_per_s": images / timing["median_s"], **timing, **mem, **fields}


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from err
    if not values or min(values) < 0:
        raise ValueError(f"{what} must be a non-empty comma list of integers >= 0, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------- benchmarks
def _parse_samplers(text: str) -> list[tuple[str, int]]:
    from rcdm.samplers import SAMPLERS

    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, steps = item.rpartition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(
                f"bad --samplers item {item!r}: use NAME:STEPS with NAME in {', '.join(SAMPLERS)}"
            )
        pairs.append((name, int(steps)))
    return pairs


@register("sample")
def bench_sampling(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Images/s of a full sampling run (all steps) per sampler, step count and batch size.

    Every element of a batch has its own conditioning, so the batch sweep measures how much batching
    distinct conditionings gains over sampling them one at a time (``speedup_vs_plain``, plain = smallest).
    """
    from rcdm.samplers import sample

    batches = sorted(set(_int_list(ctx.args.batch_sizes or str(ctx.args.batch_size), "--batch-sizes")))
    if batches[0] < 1:
        raise ValueError("--batch-sizes must all be >= 1")
    model, diffusion = ctx.build(variant)
    rows = []
    for batch in batches:
        noise, feat = ctx.inputs(batch, variant)
        noise = torch.randn_like(noise)
        for sampler, steps in _parse_samplers(ctx.args.samplers):

            def once(sampler=sampler, steps=steps, noise=noise, feat=feat):
                with torch.inference_mode(), ctx.running(variant):
                    return sample(
                        model, diffusion, noise.shape, sampler=sampler, steps=steps, noise=noise,
                        model_kwargs={"feat": feat}, device=ctx.device, cuda_graph=variant.cuda_graph,
                    )  # fmt: skip

            rows.append(
                _timed(ctx, once, batch, sampler=sampler, steps=steps, nfe=steps, batch_size=batch,
                       option=f"batch={batch}", plain_option=f"batch={batches[0]}")
            )  # fmt: skip
    return rows


@register("train")
def bench_training(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Images/s of full training steps (forward, hybrid loss, backward, AdamW, EMA) and peak memory.

    The optimizer and EMA are those ``rcdm train`` uses: fused AdamW on CUDA (foreach elsewhere) and the
    foreach EMA of ``rcdm.ema``.
    """
    from rcdm.ema import EMA

    if variant.cuda_graph:
        return []
    batch = ctx.args.train_batch_size or ctx.args.batch_size
    model, diffusion = ctx.build(variant, train=True)
    params = list(model.parameters())
    fused = ctx.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
    ema = EMA(model)
    x, feat = ctx.inputs(batch, variant)
    gen = torch.Generator(device="cpu").manual_seed(ctx.args.seed)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen).to(ctx.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx.running(variant):
            loss = diffusion.training_losses(model, x, t, model_kwargs={"feat": feat})["loss"].mean()
        loss.backward()
        opt.step()
        ema.update(params)

    option = f"adamw={'fused' if fused else 'foreach'},ema=foreach"
    return [_timed(ctx, step, batch, batch_size=batch, option=option)]


def _loop_ema_update(averages: list[torch.Tensor], params: list[torch.Tensor], rate: float) -> None:
    """The published per-tensor EMA update (one multiply and one add kernel per parameter)."""
    with torch.no_grad():
        for avg, p in zip(averages, params):
            avg.mul_(rate).add_(p, alpha=1 - rate)


@register("update")
def bench_update(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Parameter updates alone (gradients fixed): AdamW for-loop / foreach / fused, EMA per-tensor / foreach.

    Images/s counts the training batch size per update, so the numbers compare with ``train``.
    """
    from rcdm.ema import EMA

    if not variant.is_baseline:
        return []
    batch = ctx.args.train_batch_size or ctx.args.batch_size
    model, _ = ctx.build(variant, train=True)
    params = list(model.parameters())
    gen = torch.Generator(device="cpu").manual_seed(ctx.args.seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(ctx.device)
    rows = []
    impls = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for impl, kw in impls.items():
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            opt.step()  # fused AdamW is not implemented for every device / dtype: fail here, not mid-timing
        except (RuntimeError, NotImplementedError) as err:
            print(f"rcdm bench: update adamw={impl} skipped: {err}", file=sys.stderr)
            continue
        rows.append(_timed(ctx, opt.step, batch, batch_size=batch, option=f"adamw={impl}",
                           plain_option="adamw=for-loop"))  # fmt: skip
    ema = EMA(model)
    averages = [p.detach().float().clone() for p in params]
    rows.append(_timed(ctx, lambda: _loop_ema_update(averages, params, 0.9999), batch, batch_size=batch,
                       option="ema=per-tensor", plain_option="ema=per-tensor"))  # fmt: skip
    rows.append(_timed(ctx, lambda: ema.update(params), batch, batch_size=batch, option="ema=foreach",
                       plain_option="ema=per-tensor"))  # fmt: skip
    return rows


def _synthetic_h5(ctx: BenchContext, n: int) -> tuple[Path, Path]:
    """An images file (random uint8 crops at the model size) and a matching features file."""
    from rcdm.formats import hdf5

    size, dim = int(ctx.flags["image_size"]), int(ctx.flags.get("ssl_dim", 2048))
    rng = np.random.default_rng(ctx.args.seed)
    root = ctx.workdir("data")
    images, features = root / "images.h5", root / "features.h5"
    hdf5.write_images_file(images, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    hdf5.write_features_file(features, rng.standard_normal((n, 2, dim), dtype=np.float32))
    return images, features


@register("data")
def bench_data(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Training batches read from HDF5 (``rcdm.train_data``) as ``rcdm train`` reads them: random rows,
    random flips, uint8 -> [-1, 1] on the device; 0 workers vs ``--workers`` workers with prefetching.
    Steady state: the workers are started during the warm-up calls, as in a long training run."""
    from torch.utils.data import DataLoader

    from rcdm.train_data import H5PairDataset, StepBatchSampler, to_model_images

    if not variant.is_baseline:
        return []
    batch = ctx.args.train_batch_size or ctx.args.batch_size
    steps = ctx.args.data_steps
    images, features = _synthetic_h5(ctx, max(ctx.args.data_images, batch))
    data = H5PairDataset(images, features)
    rows = []
    for workers in sorted({0, ctx.args.workers}):
        sampler = StepBatchSampler(data.num_images, batch, ctx.args.seed)  # unbounded: workers stay up
        loader = DataLoader(
            data, batch_size=None, sampler=sampler, num_workers=workers,
            pin_memory=ctx.device.type == "cuda", prefetch_factor=ctx.args.prefetch if workers else None,
        )  # fmt: skip
        batches = iter(loader)

        def read(batches=batches):
            for _ in range(steps):
                imgs, feats = next(batches)
                to_model_images(imgs, ctx.device)
                feats.to(ctx.device, non_blocking=True)

        option = f"workers={workers}" + (f",prefetch={ctx.args.prefetch}" if workers else "")
        rows.append(_timed(ctx, read, batch * steps, batch_size=batch, option=option,
                           plain_option="workers=0"))  # fmt: skip
        del batches
    data.close()
    return rows


def _with_size(module: nn.Module, size: int) -> nn.Module:
    module.input_size = size
    return module


def random_resnet50() -> nn.Module:
    """Randomly initialised ResNet-50 trunk at 224 px: the published encoders' cost, without their weights
    (usable as ``--encoder rcdm.stages.bench:random_resnet50``; throughput does not depend on the weights)."""
    from rcdm.encoders import resnet50_trunk

    torch.manual_seed(0)
    return _with_size(resnet50_trunk(), 224)


def random_small_encoder() -> nn.Module:
    """Randomly initialised small ResNet (``rcdm pretrain``'s architecture family) at 32 px."""
    from rcdm.encoders import SmallResNet

    torch.manual_seed(0)
    return _with_size(SmallResNet([16, 32], blocks=1), 32)


def _load_encoder(ctx: BenchContext, layer: str = "trunk") -> nn.Module:
    from rcdm import encoders

    name = ctx.args.encoder
    if name in ("resnet50", "small"):
        name = f"rcdm.stages.bench:random_{'resnet50' if name == 'resnet50' else 'small_encoder'}"
    return encoders.load_as_extracted(
        name, ctx.args.encoder_checkpoint, layer, trust=ctx.args.trust_checkpoint
    )


def _jpeg_folder(ctx: BenchContext, n: int, size: int) -> Path:
    """``n`` random-noise JPEGs of ``size`` px (decoding cost of real photos of that size)."""
    from PIL import Image

    root = ctx.workdir("jpegs")
    rng = np.random.default_rng(ctx.args.seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size * 5 // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:06d}.jpg", quality=90)
    return root


@register("extract")
def bench_extract(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Images/s of ``rcdm.stages.extract.run_extraction`` on a synthetic JPEG folder: decode, crop to the
    model size and to the encoder size, encode image and mirror, write both HDF5 files; 0 vs ``--workers``."""
    from rcdm.data import open_dataset
    from rcdm.stages.extract import ExtractJob, run_extraction

    if not variant.is_baseline:
        return []
    n, size = ctx.args.extract_images, int(ctx.flags["image_size"])
    encoder = _load_encoder(ctx)
    folder = _jpeg_folder(ctx, n, max(ctx.args.native_size, size, int(encoder.input_size)))
    source = open_dataset(str(folder))
    counter = itertools.count()
    rows = []
    for workers in sorted({0, ctx.args.workers}):

        def once(workers=workers):
            out = ctx.workdir(f"extract-{next(counter)}")
            job = ExtractJob(
                source=source, dataset="bench", split="bench", image_size=size,
                images_out=out / "images.h5", features_out={"trunk": out / "trunk.h5"},
                encoder_name=ctx.args.encoder,
            )  # fmt: skip
            run_extraction(job, lambda layers: encoder, batch_size=ctx.args.batch_size, workers=workers,
                           device=str(ctx.device), progress=False)  # fmt: skip

        rows.append(_timed(ctx, once, n, batch_size=ctx.args.batch_size, option=f"workers={workers}",
                           plain_option="workers=0"))  # fmt: skip
    return rows


def _inception(ctx: BenchContext):
    """The FID Inception from ``--weights-dir``, a random one with ``--inception-random``, else None."""
    from rcdm.inception import FIDInception, InceptionWeightsMissing, build_fid_inception_v3, load_inception

    if ctx.args.inception_random:
        torch.manual_seed(0)
        return FIDInception(build_fid_inception_v3()).to(ctx.device), "inception=random"
    try:
        return load_inception(ctx.args.weights_dir, device=ctx.device), "inception=published"
    except InceptionWeightsMissing as err:
        print(f"rcdm bench: evaluate measures the encoder alone: {err}", file=sys.stderr)
        return None, "inception=absent"


@register("evaluate")
def bench_evaluate(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Images/s of ``rcdm.scoring.evaluate`` on synthetic samples: the streaming embedding pass (encoder,
    plus Inception when present) and the metric computations (FD_rep, rank/MRR; FID/IS without reference
    statistics are skipped by evaluate itself)."""
    from rcdm.formats import hdf5
    from rcdm.formats.npz import write_npz
    from rcdm.scoring import evaluate

    if not variant.is_baseline:
        return []
    n, size = ctx.args.eval_images, int(ctx.flags["image_size"])
    encoder = _load_encoder(ctx)
    inception, option = _inception(ctx)
    root = ctx.workdir("evaluate")
    rng = np.random.default_rng(ctx.args.seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    cond = np.arange(n, dtype=np.int64)
    samples = write_npz(root / "samples.npz", images.shape, iter([(images, cond, np.zeros(n, np.int64))]),
                        {"sampler": "bench"})  # fmt: skip
    features = root / "features.h5"
    hdf5.write_features_file(features, rng.standard_normal((n, 2, encoder.dim), dtype=np.float32))

    def once():
        evaluate(samples, features=features, encoder=encoder, inception=inception,
                 batch_size=ctx.args.batch_size, workers=ctx.args.workers or 1, device=ctx.device,
                 progress=False)  # fmt: skip

    return [_timed(ctx, once, n, batch_size=ctx.args.batch_size, option=option)]


# ------------------------------------------------------------------------------------------------ driver
def variants(
    dtypes: list[str],
    channels_last: bool,
    compile_: bool,
    *,
    attention_einsum: bool = False,
    cuda_graph: bool = False,
) -> list[Variant]:
    """The baseline, each requested option alone, and (with several speed options) all of them together.

    The einsum attention is the published reference formulation, measured alone to price SDPA; it is not
    part of the all-options variant.
    """
    options: list[Variant] = [Variant(dtype=d) for d in dtypes if d != "fp32"]
    if channels_last:
        options.append(Variant(channels_last=True))
    if compile_:
        options.append(Variant(compile=True))
    if cuda_graph:
        options.append(Variant(cuda_graph=True))
    out = [Variant(), *options]
    if len(options) > 1:
        low = next((d for d in dtypes if d != "fp32"), "fp32")
        out.append(Variant(dtype=low, channels_last=channels_last, compile=compile_, cuda_graph=cuda_graph))
    if attention_einsum:
        out.append(Variant(attention="einsum"))
    return list(dict.fromkeys(out))


def flags_from_spec(spec: str) -> dict[str, Any]:
    """Model flags from a preset name, a JSON object string or a JSON file path."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"--flags {spec!r} is not a preset ({', '.join(PRESETS)}), JSON object or JSON file"
            )
        text = path.read_text()
    try:
        flags = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--flags is not valid JSON: {err}") from err
    if not isinstance(flags, dict):
        raise ValueError("--flags JSON must be an object of model flags")
    return flags


def _case(row: dict[str, Any]) -> tuple:
    return (row.get("sampler"), row.get("steps"), row.get("batch_size"), row.get("option"))


def _option_key(row: dict[str, Any], field: str) -> tuple:
    return (row["benchmark"], row["variant"], row.get("sampler"), row.get("steps"), row.get(field))


def run_benchmarks(
    ctx: BenchContext, names: list[str], variant_list: list[Variant], rounds: int = 1
) -> list[dict[str, Any]]:
    """Run every benchmark for every variant, ``rounds`` times round-robin; adds the variant columns and
    both speed-up ratios.

    With several rounds the timings of a row are pooled over rounds, so a slow drift of the machine (other
    jobs on shared cores) affects every variant alike instead of whichever ran during the busy spell; each
    round starts with a different variant, so no variant always pays for running first.
    """
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pooled: dict[tuple, dict[str, Any]] = {}
    for r in range(rounds):
        for name in names:
            shift = r % len(variant_list)  # rotate the order: no variant always runs first (cold caches)
            for variant in variant_list[shift:] + variant_list[:shift]:
                found = BENCHMARKS[name](ctx, variant)
                what = f"round {r + 1}/{rounds} {name} / {variant.name}"
                print(f"rcdm bench: {what}: {len(found)} measurement(s)", file=sys.stderr)
                for row in found:
                    key = (name, variant.name, _case(row))
                    times = list(row.get("times") or [row["median_s"]])
                    if key in pooled:
                        pooled[key]["times"] += times
                        pooled[key]["peak_mem_mb"] = max(pooled[key]["peak_mem_mb"], row["peak_mem_mb"])
                        continue
                    pooled[key] = {
                        "benchmark": name, "variant": variant.name, "dtype": variant.dtype,
                        "channels_last": variant.channels_last, "compile": variant.compile,
                        "attention": variant.attention, "cuda_graph": variant.cuda_graph,
                        "image_size": ctx.flags.get("image_size"), "device": str(ctx.device),
                        "_baseline": variant.is_baseline, **row, "times": times,
                    }  # fmt: skip
    rows = list(pooled.values())
    for row in rows:
        row.update(summarize(row["times"]))
        images = row.get("images") or row.get("batch_size")
        row["images_per_s"] = images / row["median_s"]
    baseline = {(r["benchmark"], _case(r)): r["images_per_s"] for r in rows if r.pop("_baseline")}
    plain = {_option_key(r, "option"): r["images_per_s"] for r in rows}
    for row in rows:
        base = baseline.get((row["benchmark"], _case(row)))
        row["speedup_vs_fp32_eager"] = row["images_per_s"] / base if base else None
        key = (
            row["benchmark"],
            row["variant"],
            row.get("sampler"),
            row.get("steps"),
            row.get("plain_option"),
        )
        ref = plain.get(key) if row.get("plain_option") else None
        row["speedup_vs_plain"] = row["images_per_s"] / ref if ref else None
    return rows


def _environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def write_results(
    rows: list[dict[str, Any]], out_dir: Path, name: str, meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``name.csv`` (one row per measurement) and ``name.json`` (rows plus environment), atomically."""
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    return csv_path, json_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flags", default="small", help=f"model flags: preset ({', '.join(PRESETS)}), JSON or file"
    )
    parser.add_argument("--benchmarks", default="sample,train", help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--samplers", default="ddim:25,dpm-solver++:20", help="comma list of SAMPLER:STEPS")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (sampling, extract, evaluate)")
    parser.add_argument(
        "--batch-sizes", default=None, help="sampling batch sweep, e.g. 1,4,16 (default: --batch-size)"
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=None, help="training batch (default: --batch-size)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="round-robin passes over all variants, timings pooled (shared hosts)",
    )
    parser.add_argument(
        "--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
        help="compute dtypes to measure (bf16: autocast); fp32 eager is always the baseline",
    )  # fmt: skip
    parser.add_argument(
        "--channels-last", action="store_true", help="also measure channels_last memory format"
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(model)")
    parser.add_argument(
        "--attention-einsum",
        action="store_true",
        help="also measure the published einsum attention (vs SDPA)",
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also measure CUDA-graph replay of sampling (CUDA only)"
    )
    g = parser.add_argument_group("data, extract and evaluate benchmarks")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers compared with 0")
    g.add_argument("--prefetch", type=int, default=4, help="DataLoader prefetch factor (data benchmark)")
    g.add_argument("--data-images", type=int, default=512, help="rows of the synthetic HDF5 files")
    g.add_argument("--data-steps", type=int, default=20, help="training batches read per timed call")
    g.add_argument("--extract-images", type=int, default=64, help="synthetic JPEGs extracted per timed call")
    g.add_argument("--native-size", type=int, default=160, help="side of the synthetic JPEGs (px)")
    g.add_argument("--eval-images", type=int, default=64, help="synthetic samples evaluated per timed call")
    g.add_argument(
        "--encoder", default="small",
        help="resnet50 / small (random weights, same cost) or an rcdm.encoders name + --encoder-checkpoint",
    )  # fmt: skip
    g.add_argument("--encoder-checkpoint", default=None)
    g.add_argument("--trust-checkpoint", action="store_true")
    g.add_argument(
        "--weights-dir", default="weights", help="where the FID Inception weights file is looked up"
    )
    g.add_argument(
        "--inception-random", action="store_true", help="time a randomly initialised FID Inception instead"
    )
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="output directory")
    parser.add_argument("--name", default="bench", help="output file stem (NAME.csv, NAME.json)")


def _describe(row: dict[str, Any]) -> str:
    case = f"{row['sampler']}:{row['steps']}" if row.get("sampler") else ""
    option = row.get("option") or ""
    parts = [f"{row['benchmark']:8s} {row['variant']:26s} {case:16s} {option:28s}",
             f"{row['images_per_s']:10.2f} img/s"]  # fmt: skip
    if row.get("speedup_vs_fp32_eager") is not None:
        parts.append(f"x{row['speedup_vs_fp32_eager']:.2f} vs fp32 eager")
    if row.get("speedup_vs_plain") is not None and row.get("option") != row.get("plain_option"):
        parts.append(f"x{row['speedup_vs_plain']:.2f} vs {row['plain_option']}")
    parts.append(f"peak {row['peak_mem_mb']:.0f} MB")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    flags = flags_from_spec(args.flags)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.workers < 0:
        raise SystemExit("rcdm bench: --repeats and --batch-size must be >= 1, --warmup and --workers >= 0")
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    variant_list = variants(
        list(args.dtype), args.channels_last, args.compile,
        attention_einsum=args.attention_einsum, cuda_graph=args.cuda_graph,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rcdm-bench-") as scratch:
        ctx = BenchContext(flags=flags, device=device, args=args, scratch=Path(scratch))
        rows = run_benchmarks(ctx, names, variant_list, rounds=args.rounds)
    meta = {"flags": flags, "args": vars(args), "environment": _environment(device)}
    csv_path, json_path = write_results(rows, Path(args.out), args.name, meta)
    for row in rows:
        print(_describe(row), file=sys.stderr)
    print(f"rcdm bench: wrote {csv_path} and {json_path}", file=sys.stderr)
    return 0
