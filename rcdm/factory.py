"""Build the RCDM model and diffusion from guided-diffusion style flags (the published names and defaults).

Scripts written against the RCDM fork's ``script_util`` port by changing the import: the flag names, their
defaults and the meaning of ``channel_mult=""`` / ``attention_resolutions="32,16,8"`` are the published ones.
Flags left out take their default; an unknown flag is an error naming it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rcdm.unet import UNetModel

NUM_CLASSES = 1000

#: Per-resolution default channel multipliers, used when ``channel_mult`` is "".
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}

#: The flags of the nine published 128px RCDM checkpoints (trunk checkpoints; heads differ only in ssl_dim).
MODEL_FLAGS_128: dict[str, Any] = {
    "attention_resolutions": "32,16,8",
    "diffusion_steps": 1000,
    "image_size": 128,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "num_channels": 256,
    "num_heads": 4,
    "num_res_blocks": 2,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "ssl_dim": 2048,
}

#: Flags the published ``create_model_and_diffusion`` call sites pass beside the defaults.
#: ``feat_cond`` False builds an unconditional model; ``G_shared`` and ``pretrained`` have no effect on the
#: UNet (nor do they in the published code).
EXTRA_FLAGS: dict[str, Any] = {"ssl_dim": 2048, "feat_cond": True, "G_shared": True, "pretrained": False}


class UnknownFlagError(TypeError):
    """A model/diffusion flag that the published API does not have."""


def diffusion_defaults() -> dict[str, Any]:
    """Defaults of the diffusion flags (published ``diffusion_defaults``)."""
    return {
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    }


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Defaults of the model/diffusion flags, exactly the RCDM fork's ``model_and_diffusion_defaults``.

    ``ssl_dim`` (default 2048) is not among them, as published: scripts pass it next to these, e.g.
    ``create_model_and_diffusion(**args_to_dict(args, defaults.keys()), ssl_dim=d)``.
    """
    flags: dict[str, Any] = {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
    }
    flags.update(diffusion_defaults())
    return flags


def check_flag_names(names: Sequence[str] | Any, allowed: Sequence[str] | Any) -> None:
    """Raise :class:`UnknownFlagError` naming every flag not in ``allowed``, with close matches."""
    allowed = list(allowed)
    unknown = [n for n in names if n not in allowed]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise UnknownFlagError(
        f"unknown model/diffusion flag{'s' if len(unknown) > 1 else ''}: {', '.join(parts)}; "
        f"known flags: {', '.join(sorted(allowed))}"
    )


def _parse_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def parse_channel_mult(channel_mult: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """``"1,1,2,3,4"`` (or a sequence) -> tuple; ``""`` -> the published default for ``image_size``."""
    if isinstance(channel_mult, str):
        if not channel_mult.strip():
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size {image_size} (defaults exist for "
                    f"{', '.join(map(str, DEFAULT_CHANNEL_MULT))}); pass channel_mult, e.g. '1,2,2'"
                )
            return DEFAULT_CHANNEL_MULT[image_size]
        mult = tuple(_parse_number(p, "channel_mult") for p in channel_mult.split(","))
    else:
        mult = tuple(channel_mult)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"channel_mult must be positive multipliers, got {channel_mult!r}")
    return mult


def parse_attention_resolutions(
    attention_resolutions: str | Sequence[int], image_size: int
) -> tuple[int, ...]:
    """``"32,16,8"`` (resolutions in pixels) -> downsample rates ``image_size // res``; "" -> none."""
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        resolutions = [int(_parse_number(p, "attention_resolutions")) for p in parts]
    else:
        resolutions = [int(r) for r in attention_resolutions]
    for res in resolutions:
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image_size {image_size}")
    return tuple(image_size // res for res in resolutions)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[float] = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    feat_cond: bool = True,
    use_checkpoint: bool = False,
    attention_resolutions: str | Sequence[int] = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    ssl_dim: int = 2048,
    G_shared: bool = True,  # noqa: N803 - published name, no effect
    pretrained: bool = False,
) -> UNetModel:
    """The RCDM UNet for the given flags (published ``create_model``; ``feat_cond`` defaults to True here)."""
    del G_shared, pretrained
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        ssl_dim=ssl_dim if feat_cond else None,
    )


MODEL_FLAG_NAMES = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "learn_sigma",
    "class_cond",
    "feat_cond",
    "use_checkpoint",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
    "ssl_dim",
    "G_shared",
    "pretrained",
)


def resolve_flags(**flags: Any) -> dict[str, Any]:
    """Defaults updated with ``flags``; unknown names raise :class:`UnknownFlagError`."""
    full = {**model_and_diffusion_defaults(), **EXTRA_FLAGS}
    check_flag_names(flags, full)
    full.update(flags)
    return full


def create_model_from_flags(**flags: Any) -> UNetModel:
    """The UNet alone from (a subset of) the published flags; diffusion flags are accepted and ignored."""
    full = resolve_flags(**flags)
    return create_model(**{k: full[k] for k in MODEL_FLAG_NAMES})


def create_diffusion_from_flags(**flags: Any):
    """The Gaussian diffusion alone from (a subset of) the published flags."""
    from rcdm.diffusion import create_gaussian_diffusion

    full = resolve_flags(**flags)
    return create_gaussian_diffusion(
        steps=full["diffusion_steps"],
        learn_sigma=full["learn_sigma"],
        sigma_small=False,
        noise_schedule=full["noise_schedule"],
        use_kl=full["use_kl"],
        predict_xstart=full["predict_xstart"],
        rescale_timesteps=full["rescale_timesteps"],
        rescale_learned_sigmas=full["rescale_learned_sigmas"],
        timestep_respacing=full["timestep_respacing"],
    )


def create_model_and_diffusion(**flags: Any) -> tuple[UNetModel, Any]:
    """``(model, diffusion)`` for the published flags; a missing flag takes its default.

    An unknown flag raises :class:`UnknownFlagError` (a TypeError) naming it and suggesting close names.
    """
    full = resolve_flags(**flags)
    return create_model_from_flags(**full), create_diffusion_from_flags(**full)


def str2bool(value: str | bool) -> bool:
    """Parse a command-line boolean (yes/no, true/false, t/f, y/n, 1/0; case-insensitive)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def add_dict_to_argparser(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add ``--name`` options typed after each default (published script_util helper, for ported scripts)."""
    for name, default in defaults.items():
        kind = str if default is None else str2bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name}", default=default, type=kind)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """Named attributes of parsed ``args`` as a dict (e.g. keys of :func:`model_and_diffusion_defaults`)."""
    return {k: getattr(args, k) for k in keys}


def model_flags_file(spec: str | os.PathLike | Mapping[str, Any] | None) -> str | None:
    """The file a ``--model-flags`` value names, or None when it is a JSON object, a mapping or empty."""
    if spec is None or isinstance(spec, Mapping):
        return None
    text = str(spec).strip()
    return None if not text or text.startswith("{") else text


def read_model_flags(spec: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Model flags from ``--model-flags``: a mapping, a JSON object string, or a YAML/JSON file.

    None or "" gives None (callers then take the defaults, or read the flags off a checkpoint). The one
    reader of model flags for every stage; a malformed value is a ``ValueError`` naming what was given.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, Mapping):
        return dict(spec)
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            flags = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-flags is not a valid JSON object: {err}") from err
        where = "--model-flags"
    else:
        import yaml

        path = Path(text)
        if not path.is_file():
            raise ValueError(f"model flags file not found: {path} (give a YAML/JSON file or a JSON object)")
        try:
            flags = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML/JSON: {err}") from err
        where = str(path)
    if not isinstance(flags, dict):
        raise ValueError(
            f"{where}: model flags must be a mapping of flag names to values, got {type(flags).__name__}"
        )
    return flags
