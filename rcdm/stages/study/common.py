"""The study stage's shared plumbing: command-line options, loading model/encoder/images from them, and
writing a study's figure, CSV and settings record atomically.

The maths lives in the library: :mod:`rcdm.study_images` (which images, their crops), :mod:`rcdm.subsets`,
:mod:`rcdm.representations` (distances, the encoder passes), :mod:`rcdm.study_sampling` (fixed noise),
:mod:`rcdm.figures` (labelled tables) and :mod:`rcdm.probe` (the factor probe).

Every study writes ``OUT/<study>.png`` (plus optional ``OUT/<study>_*.png``), ``OUT/<study>.csv`` and, last,
``OUT/<study>.json`` (its settings). A rerun whose settings record matches and whose outputs exist is skipped.
``--check`` runs a study on the CPU up to the end of its loading (:func:`loaded`), then exits without writing:
the workflow's ``study_check`` job.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rcdm.data import check_dataset_input
from rcdm.device import DEVICE_HELP, resolve_device
from rcdm.errors import CHECK_HELP, MAKE_FIRST, REFETCH, InputFileError, check_passed, reading
from rcdm.factory import model_flags_file, read_model_flags
from rcdm.formats import hdf5
from rcdm.io import atomic_path
from rcdm.representations import encode_images, encode_inputs
from rcdm.study_images import Selection, Sources, from_dataset, from_images_file
from rcdm.study_sampling import SamplingSettings, fixed_noise, sample_images

SAMPLERS = ("ddim", "ddpm", "dpm-solver++")
UPSAMPLED_NOTE = "ENCODER INPUT: stored crops upsampled (--allow-upsampled-crops)"

# ------------------------------------------------------------------------------------------------ options


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="RCDM checkpoint (state dict) to sample from")
    g.add_argument("--model-flags", default=None, help="JSON object or YAML/JSON file of creation flags")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow files that need code unpickling")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_encoder_arguments(parser: argparse.ArgumentParser, *, layer: bool = True) -> None:
    g = parser.add_argument_group("encoder")
    g.add_argument(
        "--encoder", required=True, help="encoder name (dino, simclr, ..., small, pkg.mod:factory)"
    )
    g.add_argument(
        "--encoder-checkpoint",
        default=None,
        help="the encoder's weight file (checked against the sha256 the features file records)",
    )
    g.add_argument(
        "--encoder-name",
        default=None,
        help="the encoder's name in the CSVs and figures (default: --encoder; the workflow: its config name)",
    )
    if layer:
        g.add_argument(
            "--layer", choices=("trunk", "head"), default="trunk", help="representation to condition on"
        )


def add_source_arguments(parser: argparse.ArgumentParser, *, dataset_default: str | None = None) -> None:
    g = parser.add_argument_group("conditioning images")
    g.add_argument("--images", default=None, help="images HDF5 file written by `rcdm extract`")
    g.add_argument("--features", default=None, help="its features HDF5 file (clean representations)")
    g.add_argument(
        "--dataset",
        default=dataset_default,
        help="instead of --images: a dataset name (photos, shapes) or an image folder",
    )
    g.add_argument("--split", default="val", help="split of a generated --dataset (shapes)")
    g.add_argument(
        "--image-root",
        default=None,
        help="folder the images file's recorded paths are relative to (default: the folder it records): "
        "the encoder sees each original's centre crop at its input size, as in extraction",
    )
    g.add_argument(
        "--allow-upsampled-crops",
        action="store_true",
        help="when an original cannot be found, upsample the stored crop to the encoder's size instead of "
        "failing (recorded in the CSV and the figure)",
    )
    g.add_argument(
        "--num-images",
        type=int,
        default=4,
        help="how many conditioning images: a seeded random draw over the whole set, stratified by class "
        "when it has labels",
    )
    g.add_argument("--image-seed", type=int, default=None, help="seed of that draw (default: --seed)")
    g.add_argument("--indices", default=None, help="comma-separated image positions (instead of a draw)")
    g.add_argument(
        "--image-names",
        default=None,
        help="comma-separated image paths as recorded, or file names (instead of a draw)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, samples: int = 4) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--samples", type=int, default=samples, help="samples per conditioning (k)")
    g.add_argument("--sampler", choices=SAMPLERS, default="dpm-solver++", help="sampler")
    g.add_argument("--steps", type=int, default=15, help="sampling steps")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    g.add_argument("--batch-size", type=int, default=64, help="samples per model batch")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the initial noise (and augmentations/attacks)"
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--probe", default=None, help="factor probe (`rcdm study probe`) to score kept factors")
    g.add_argument("--force", action="store_true", help="recompute even if finished outputs exist")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--check", action="store_true", help=CHECK_HELP)


def add_standard_arguments(parser: argparse.ArgumentParser, *, samples: int = 4) -> None:
    """The options every sampling study shares (the workflow wires them the same way for all)."""
    add_model_arguments(parser)
    add_encoder_arguments(parser)
    add_source_arguments(parser)
    add_sampling_arguments(parser, samples=samples)
    add_output_arguments(parser)


def parse_indices(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(f"--indices must be comma-separated integers, got {text!r}") from err


def parse_names(text: str | None) -> list[str] | None:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return names or None


def parse_pairs(text: str | None, n: int) -> list[tuple[int, int]]:
    """``--pairs 'i-j,k-l'`` (positions among the loaded images); default consecutive pairs 0-1, 2-3, ..."""
    if not text:
        if n < 2:
            raise ValueError("this study needs at least two conditioning images (--num-images >= 2)")
        return [(i, i + 1) for i in range(0, n - 1, 2)]
    pairs = []
    for item in text.split(","):
        try:
            i, j = (int(v) for v in item.split("-"))
        except ValueError as err:
            raise ValueError(f"--pairs entries look like 'i-j', got {item!r}") from err
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"--pairs {item!r} refers outside the {n} loaded images")
        pairs.append((i, j))
    return pairs


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    if args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    return SamplingSettings(
        args.sampler, args.steps, args.eta, not args.no_clip, args.batch_size, args.seed, not args.no_progress
    )


# ------------------------------------------------------------------------------------------------ loading


def load_rcdm(checkpoint: str, flags: dict | None, *, trust: bool, device: torch.device):
    """(model, diffusion) in eval mode on ``device``."""
    from rcdm.checkpoint import load_model

    if not Path(checkpoint).is_file():
        raise InputFileError(checkpoint, "checkpoint not found", MAKE_FIRST)
    with reading(checkpoint):
        model, diffusion = load_model(checkpoint, flags, trust=trust, device=str(device))
    return model.eval(), diffusion


def model_flags(spec: str | None) -> dict | None:
    """``--model-flags`` (a JSON object or a file), a file that cannot be read named in one line."""
    with reading(model_flags_file(spec)):
        return read_model_flags(spec)


def features_attrs(path: str | None) -> dict[str, Any]:
    """The attributes of a features file (checked), or {} without one: what the encoder is loaded as."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise InputFileError(path, "features file not found", MAKE_FIRST)
    with reading(path):
        return hdf5.check_features_file(path, deep=False)


def load_encoder(args: argparse.Namespace, layer: str, attrs: Mapping[str, Any], device: torch.device):
    """The conditioning encoder as its features were extracted (:func:`rcdm.encoders.load_as_extracted`)."""
    from rcdm.encoders import EncoderMismatchError, load_as_extracted

    with reading(args.encoder_checkpoint, fix=REFETCH, keep=(EncoderMismatchError,)):
        return load_as_extracted(
            args.encoder,
            args.encoder_checkpoint,
            layer,
            features_attrs=attrs,
            trust=args.trust_checkpoint,
            device=device,
        )


def model_image_size(model) -> int:
    size = getattr(model, "image_size", None)
    if size is None:
        raise ValueError("the RCDM model does not record its image_size")
    return int(size)


def model_ssl_dim(model) -> int | None:
    emb = getattr(model, "ssl_emb", None)
    return int(emb.in_features) if isinstance(emb, torch.nn.Linear) else None


def check_dims(model, dim: int, what: str) -> None:
    want = model_ssl_dim(model)
    if want is not None and want != dim:
        raise ValueError(f"the RCDM model is conditioned on {want}-d vectors but {what} gives {dim}-d ones")


def selection_of(args: argparse.Namespace) -> Selection:
    seed = args.image_seed if getattr(args, "image_seed", None) is not None else getattr(args, "seed", 0)
    return Selection(
        num=args.num_images,
        seed=seed,
        indices=parse_indices(getattr(args, "indices", None)),
        names=parse_names(getattr(args, "image_names", None)),
    )


def load_sources(args: argparse.Namespace, image_size: int, encoder_size: int) -> Sources:
    """Conditioning images from ``--images`` (+ ``--features``) or ``--dataset``: rcdm.study_images.
    The files are checked first: a missing or broken one is an InputFileError naming it."""
    if args.images:
        if not Path(args.images).is_file():
            raise InputFileError(args.images, "images file not found", MAKE_FIRST)
        with reading(args.images):
            hdf5.check_images_file(args.images, deep=False)
        features_attrs(args.features)
        return from_images_file(
            args.images,
            args.features,
            selection_of(args),
            image_size,
            encoder_size,
            image_root=args.image_root,
            allow_upsampled=getattr(args, "allow_upsampled_crops", False),
        )
    if args.dataset:
        check_dataset_input(args.dataset)
        return from_dataset(args.dataset, args.split, selection_of(args), image_size, encoder_size)
    raise ValueError("give the conditioning images: --images FILE.h5 or --dataset photos|shapes|FOLDER")


def encoder_input_label(sources: Sources, i: int) -> str:
    """CSV value saying what the encoder saw for image ``i``: its original's crop or the upsampled one."""
    return "upsampled stored crop" if sources.upsampled is not None and sources.upsampled[i] else "original"


# ---------------------------------------------------------------------------------------------- outputs


class StudyOutput:
    """Paths and atomic writers of one study's outputs under ``out``."""

    def __init__(self, out: str | Path, name: str) -> None:
        self.dir = Path(out)
        self.name = name
        self.png = self.dir / f"{name}.png"
        self.csv = self.dir / f"{name}.csv"
        self.record = self.dir / f"{name}.json"

    def finished(self, settings: Mapping) -> bool:
        """True when a previous run with identical settings wrote every output."""
        if not (self.png.is_file() and self.csv.is_file() and self.record.is_file()):
            return False
        try:
            done = json.loads(self.record.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        extra = [self.dir / p for p in done.get("outputs", [])]
        return done.get("settings") == _jsonable(settings) and all(p.is_file() for p in extra)

    def save_png(self, image: Image.Image, suffix: str = "") -> Path:
        path = self.dir / f"{self.name}{suffix}.png"
        with atomic_path(path, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        return path

    def save_csv(self, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
        write_csv(self.csv, rows, columns)
        return self.csv

    def mark_done(self, settings: Mapping, outputs: Sequence[Path] = ()) -> None:
        record = {"study": self.name, "settings": _jsonable(settings), "outputs": [p.name for p in outputs]}
        with atomic_path(self.record, suffix=".json") as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    """Atomic CSV; columns default to the keys of the first row (in order); floats keep 6 digits."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def settings_of(
    args: argparse.Namespace, skip: Sequence[str] = ("force", "no_progress", "func", "check")
) -> dict:
    """The arguments that determine a study's result (recorded and compared for resuming). Input files are
    recorded with their size and modification time, so a rerun after e.g. retraining is not skipped."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in skip or key == "out":
            continue
        if isinstance(value, str) and value and Path(value).is_file():
            stat = Path(value).stat()
            value = {"path": value, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        out[key] = value
    return out


class CheckPassed(Exception):
    """Raised by :func:`loaded` under ``--check``: the study's inputs are loaded and checked; its message says
    what was loaded."""


def loaded(args: argparse.Namespace, ctx: StudyContext, extra: str = "") -> None:
    """Where a study's loading ends and its work begins: under ``--check`` the study stops here
    (:class:`CheckPassed`), having read every input with the code the run uses, before anything is written."""
    if getattr(args, "check", False):
        what = f"{ctx.describe()}; {len(ctx.sources)} images, {ctx.image_size} px samples"
        raise CheckPassed(f"{what}; {extra}" if extra else what)


def run_once(args: argparse.Namespace, name: str, body: Callable[[StudyOutput], list[Path]]) -> int:
    """Run ``body`` unless a finished run with the same settings exists; record settings when it succeeds.
    ``--check``: ``body`` runs on the CPU up to its :func:`loaded` call, whether or not it is finished."""
    out = StudyOutput(args.out, name)
    if getattr(args, "check", False):
        args.device = "cpu"
        try:
            body(out)
        except CheckPassed as done:
            return check_passed("study", f"{name}: {done}")
        raise RuntimeError(f"study {name} did not reach its check point (common.loaded)")
    settings = settings_of(args)
    if not args.force and out.finished(settings):
        print(f"study {name}: finished outputs in {out.dir} match these settings; skipping", file=sys.stderr)
        return 0
    extra = body(out)
    out.mark_done(settings, [p for p in extra if p not in (out.png, out.csv)])
    print(f"study {name}: wrote {out.png} and {out.csv}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- context


@dataclass
class StudyContext:
    """Everything a sampling study needs, loaded once from the standard options."""

    model: torch.nn.Module
    diffusion: object
    encoder: torch.nn.Module
    sources: Sources
    settings: SamplingSettings
    noise: torch.Tensor  # [k, 3, S, S] initial noises shared by all conditions
    device: torch.device
    probe: object | None = None
    image_size: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, layer: str | None = None) -> StudyContext:
        device = resolve_device(args.device)
        settings = sampling_settings(args)
        model, diffusion = load_rcdm(
            args.checkpoint, model_flags(args.model_flags), trust=args.trust_checkpoint, device=device
        )
        encoder = load_encoder(args, layer or args.layer, features_attrs(args.features), device)
        if getattr(args, "encoder_name", None):
            encoder.encoder_name = args.encoder_name  # a label only: the CSVs and figures
        check_dims(model, int(encoder.dim), f"encoder {args.encoder!r} ({encoder.layer})")
        size = model_image_size(model)
        sources = load_sources(args, size, int(encoder.input_size))
        if sources.features is not None and sources.features.shape[1] != encoder.dim:
            raise ValueError(
                f"--features holds {sources.features.shape[1]}-d vectors but the encoder's {encoder.layer} "
                f"is {encoder.dim}-d: pass the features file of this encoder and layer"
            )
        probe = None
        if getattr(args, "probe", None):
            from rcdm.probe import load_probe

            with reading(args.probe, fix="delete it and rerun the probe study (Snakemake makes it again)"):
                probe = load_probe(args.probe, device=device)
        noise = fixed_noise(args.seed, max(1, args.samples), size)
        return cls(model, diffusion, encoder, sources, settings, noise, device, probe, size)

    def describe(self) -> str:
        s = self.settings
        steps = "" if s.steps is None else f" {s.steps} steps"
        note = f"; {UPSAMPLED_NOTE}" if self.sources.any_upsampled else ""
        return f"{self.encoder.encoder_name} {self.encoder.layer}, {s.sampler}{steps}{note}"

    def clean_features(self) -> torch.Tensor:
        """Clean representations [N, D] (CPU): from the features file when given, else encoded here from
        each original's crop at the encoder's size (as extraction does)."""
        if self.sources.features is not None:
            return self.sources.features.float()
        return encode_images(self.encoder, self.sources.enc, self.settings.batch_size)

    def embed_inputs(self, x_unit: torch.Tensor) -> torch.Tensor:
        """Representations (CPU float32) of encoder-size images [N, 3, E, E] in [0, 1], passed as they are."""
        return encode_inputs(self.encoder, x_unit, self.settings.batch_size)

    def embed_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Representations of generated samples [N, 3, S, S] in [-1, 1] (CPU float32), through
        :func:`rcdm.preprocess.encoder_view` like every stored image."""
        return encode_images(self.encoder, samples, self.settings.batch_size)

    def sample(self, feats: torch.Tensor, noise_index, desc: str = "sampling") -> torch.Tensor:
        return sample_images(self.model, self.diffusion, feats, noise_index, self.noise, self.settings, desc)

    def repeat_samples(self, feats: torch.Tensor, k: int, desc: str = "sampling") -> torch.Tensor:
        """``k`` samples of each conditioning (rows m*k .. m*k+k-1 use noises 0..k-1): [M * k, 3, S, S]."""
        conds = feats.repeat_interleave(k, dim=0)
        idx = torch.arange(k).repeat(len(feats))
        return self.sample(conds, idx, desc)
