"""``rcdm bench``: throughput and memory of pipeline stages on the current device (not a test: a measurement).

Each registered benchmark (``sample``: images/s per sampler and step count; ``train``: training steps as
images/s and peak memory) runs once per *variant*: the plain fp32 eager path (the baseline), each requested
speed option alone (bf16 autocast, channels_last, torch.compile) and, with several options, all of them
together. Every row carries its speed-up over the baseline of the same run. Timing is honest: warm-up runs
first (compilation, allocator, cuDNN autotuning), the device is synchronised around every timed repeat, and
the median with min / max / interquartile range is reported. Results go to ``NAME.csv`` and ``NAME.json``.

Other stages add their own benchmark with :func:`register` (a function ``(ctx, variant) -> list[dict]``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rcdm.factory import MODEL_FLAGS_128
from rcdm.io import atomic_path

__all__ = [
    "BENCHMARKS",
    "PRESETS",
    "BenchContext",
    "Variant",
    "add_arguments",
    "measure",
    "register",
    "flags_from_spec",
    "run",
    "run_benchmarks",
    "variants",
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
    "sampler",
    "steps",
    "nfe",
    "batch_size",
    "image_size",
    "repeats",
    "median_s",
    "min_s",
    "max_s",
    "iqr_s",
    "images_per_s",
    "speedup_vs_fp32_eager",
    "peak_mem_mb",
    "mem_kind",
    "device",
]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the model: compute dtype, memory format, compilation."""

    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        parts = (
            [self.dtype]
            + (["channels_last"] if self.channels_last else [])
            + (["compile"] if self.compile else [])
        )
        return "+".join(parts) if len(parts) > 1 or self.dtype != "fp32" else "fp32_eager"

    @property
    def is_baseline(self) -> bool:
        return self == Variant()


@dataclasses.dataclass
class BenchContext:
    """What every benchmark gets: the model flags, the device and the parsed command line."""

    flags: dict[str, Any]
    device: torch.device
    args: argparse.Namespace

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
        if variant.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, batch: int, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images in [-1, 1] and representations, in the variant's memory format."""
        gen = torch.Generator(device="cpu").manual_seed(self.args.seed)
        size, dim = int(self.flags["image_size"]), int(self.flags.get("ssl_dim", 2048))
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(self.device)
        feat = torch.randn(batch, dim, generator=gen).to(self.device)
        if variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, feat


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


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> dict[str, float]:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls; device synchronised around each call."""
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
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": q[2] - q[0],
        "repeats": repeats,
    }


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
    """Images/s of a full sampling run (all steps) per sampler and step count."""
    from rcdm.samplers import sample

    batch = ctx.args.batch_size
    model, diffusion = ctx.build(variant)
    noise, feat = ctx.inputs(batch, variant)
    noise = torch.randn_like(noise)
    rows = []
    for sampler, steps in _parse_samplers(ctx.args.samplers):

        def once(sampler=sampler, steps=steps):
            with torch.inference_mode(), ctx.autocast(variant):
                return sample(
                    model, diffusion, noise.shape, sampler=sampler, steps=steps, noise=noise,
                    model_kwargs={"feat": feat}, device=ctx.device,
                )  # fmt: skip

        with _peak_memory(ctx.device) as mem:
            timing = measure(once, ctx.device, warmup=ctx.args.warmup, repeats=ctx.args.repeats)
        rows.append(
            {"sampler": sampler, "steps": steps, "nfe": steps, "batch_size": batch,
             "images_per_s": batch / timing["median_s"], **timing, **mem}
        )  # fmt: skip
    return rows


@register("train")
def bench_training(ctx: BenchContext, variant: Variant) -> list[dict[str, Any]]:
    """Images/s of full training steps (forward, hybrid loss, backward, AdamW update) and peak memory."""
    batch = ctx.args.train_batch_size or ctx.args.batch_size
    model, diffusion = ctx.build(variant, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, feat = ctx.inputs(batch, variant)
    gen = torch.Generator(device="cpu").manual_seed(ctx.args.seed)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen).to(ctx.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx.autocast(variant):
            loss = diffusion.training_losses(model, x, t, model_kwargs={"feat": feat})["loss"].mean()
        loss.backward()
        opt.step()

    with _peak_memory(ctx.device) as mem:
        timing = measure(step, ctx.device, warmup=ctx.args.warmup, repeats=ctx.args.repeats)
    return [{"batch_size": batch, "images_per_s": batch / timing["median_s"], **timing, **mem}]


# ------------------------------------------------------------------------------------------------ driver
def variants(dtypes: list[str], channels_last: bool, compile_: bool) -> list[Variant]:
    """The baseline, each requested option alone, and (with several options) all of them together."""
    options: list[Variant] = [Variant(dtype=d) for d in dtypes if d != "fp32"]
    if channels_last:
        options.append(Variant(channels_last=True))
    if compile_:
        options.append(Variant(compile=True))
    out = [Variant(), *options]
    if len(options) > 1:
        low = next((d for d in dtypes if d != "fp32"), "fp32")
        out.append(Variant(dtype=low, channels_last=channels_last, compile=compile_))
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


def run_benchmarks(ctx: BenchContext, names: list[str], variant_list: list[Variant]) -> list[dict[str, Any]]:
    """Run every benchmark for every variant; adds variant columns and speed-ups against the baseline."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    rows: list[dict[str, Any]] = []
    for name in names:
        baseline: dict[tuple, float] = {}
        for variant in variant_list:
            print(f"rcdm bench: {name} / {variant.name}", file=sys.stderr)
            for row in BENCHMARKS[name](ctx, variant):
                row = {
                    "benchmark": name, "variant": variant.name, "dtype": variant.dtype,
                    "channels_last": variant.channels_last, "compile": variant.compile,
                    "image_size": ctx.flags.get("image_size"), "device": str(ctx.device), **row,
                }  # fmt: skip
                key = (row.get("sampler"), row.get("steps"), row.get("batch_size"))
                if variant.is_baseline:
                    baseline[key] = row["median_s"]
                row["speedup_vs_fp32_eager"] = baseline[key] / row["median_s"] if key in baseline else None
                rows.append(row)
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
    parser.add_argument("--batch-size", type=int, default=16, help="sampling batch size")
    parser.add_argument(
        "--train-batch-size", type=int, default=None, help="training batch (default: --batch-size)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
        help="compute dtypes to measure (bf16: autocast); fp32 eager is always the baseline",
    )  # fmt: skip
    parser.add_argument(
        "--channels-last", action="store_true", help="also measure channels_last memory format"
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(model)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench", help="output directory")
    parser.add_argument("--name", default="bench", help="output file stem (NAME.csv, NAME.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flags = flags_from_spec(args.flags)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("rcdm bench: --repeats and --batch-size must be >= 1, --warmup >= 0")
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    variant_list = variants(list(args.dtype), args.channels_last, args.compile)
    ctx = BenchContext(flags=flags, device=device, args=args)
    rows = run_benchmarks(ctx, names, variant_list)
    meta = {"flags": flags, "args": vars(args), "environment": _environment(device)}
    csv_path, json_path = write_results(rows, Path(args.out), args.name, meta)
    for row in rows:
        case = f"{row['sampler']}:{row['steps']}" if row.get("sampler") else ""
        what = f"{row['benchmark']:6s} {row['variant']:26s} {case:18s}"
        speed = row["speedup_vs_fp32_eager"]
        print(
            f"{what} {row['images_per_s']:10.2f} img/s  x{speed:.2f}  peak {row['peak_mem_mb']:.0f} MB",
            file=sys.stderr,
        )
    print(f"rcdm bench: wrote {csv_path} and {json_path}", file=sys.stderr)
    return 0
