"""Load RCDM checkpoints (published ones and ours) safely, strictly, with errors that say what to change.

Files are read with ``torch.load(weights_only=True)`` (code-needing files are refused unless trusted).
What the state dict itself reveals about the architecture is inferred (:func:`infer_flags`); a mismatch
between the flags and the file lists every missing, unexpected and mis-shaped key and the inferred flags.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from rcdm.io import safe_torch_load

#: Container keys under which training scripts commonly nest the model's state dict (searched in this order).
CONTAINER_KEYS = ("ema", "model_ema", "ema_model", "state_dict", "model_state_dict", "model", "net", "params")

#: Flags that a state dict cannot reveal: attention head split, attention order, dropout, image size.
NOT_INFERABLE = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order", "dropout")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys/shapes do not fit the model built from the given flags."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


class _AmbiguousCheckpointError(ValueError):
    """The container holds several candidate weight sets; guessing one would be wrong."""


def _ema_state_dict(obj: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The weights in a training checkpoint's EMA state (``{"rates", "names", "params"}``), if one rate."""
    rates, names, params = obj.get("rates"), obj["names"], obj["params"]
    if len(params) != 1:
        raise _AmbiguousCheckpointError(
            f"{source}: holds EMA weights for {len(params)} rates {rates}; load one of the exported "
            "ema_<rate>_<tag>.pt files instead"
        )
    return dict(zip(names, params[0]))


def _find_state_dict(obj: Any, source: str, depth: int) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if _is_state_dict(obj):
        return dict(obj)
    if not isinstance(obj, Mapping) or depth > 3:
        raise ValueError(f"{source}: no model state dict found (got {type(obj).__name__})")
    if isinstance(obj.get("names"), list) and isinstance(obj.get("params"), list):
        return _ema_state_dict(obj, source)
    errors = []
    for key in (k for k in CONTAINER_KEYS if k in obj):
        try:
            return _find_state_dict(obj[key], f"{source}[{key!r}]", depth + 1)
        except _AmbiguousCheckpointError:
            raise
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("; ".join(errors))
    raise ValueError(
        f"{source}: a dict with keys {sorted(map(str, obj))[:10]} is neither a state dict nor a "
        f"container with one of {', '.join(CONTAINER_KEYS)}"
    )


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the model state dict in a loaded object.

    Accepted: a raw state dict; one nested under a common key (:data:`CONTAINER_KEYS`, EMA weights first);
    a module; this project's training checkpoint (its EMA weights when it tracks a single rate). A DDP
    ``module.`` or torch.compile ``_orig_mod.`` prefix is stripped.
    """
    sd = _find_state_dict(obj, source, 0)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file on CPU and return the model's state dict (see :func:`unwrap_state_dict`)."""
    return unwrap_state_dict(safe_torch_load(path, trust=trust), source=str(path))


def _block_indices(sd: Mapping[str, torch.Tensor], part: str) -> list[int]:
    pat = re.compile(rf"^{part}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _sub_kinds(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[int, str]:
    """Kind of each child of a TimestepEmbedSequential: 'res', 'attn', 'conv' (plain/resample conv)."""
    kinds: dict[int, str] = {}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(\w+)")
    for k in sd:
        if m := pat.match(k):
            i, name = int(m.group(1)), m.group(2)
            kind = {"in_layers": "res", "qkv": "attn", "norm": "attn"}.get(name, "conv")
            if kinds.get(i) in (None, "conv"):
                kinds[i] = kind
    return kinds


def _fmt_mult(m: float) -> str:
    return str(int(m)) if float(m).is_integer() else str(m)


def infer_flags(state_dict: Mapping[str, torch.Tensor], image_size: int | None = None) -> dict[str, Any]:
    """Architecture flags that a UNet state dict determines.

    Always: ssl_dim (0 -> no ssl_emb, i.e. feat_cond False), feat_cond, class_cond, learn_sigma, num_channels.
    When the block structure is the standard one: num_res_blocks, channel_mult, resblock_updown,
    use_scale_shift_norm, and attention_resolutions if ``image_size`` is given (attention is stored per
    downsample rate; pixels need the image size, which a convolutional state dict does not fix).
    Never: num_heads, num_head_channels, num_heads_upsample, use_new_attention_order, dropout (see
    :data:`NOT_INFERABLE`): they leave no trace in parameter shapes.
    """
    sd = state_dict
    flags: dict[str, Any] = {}
    if "ssl_emb.weight" in sd:
        flags["ssl_dim"] = int(sd["ssl_emb.weight"].shape[1])
        flags["feat_cond"] = True
    else:
        flags["feat_cond"] = False
    flags["class_cond"] = "label_emb.weight" in sd
    if "out.2.weight" in sd:
        flags["learn_sigma"] = int(sd["out.2.weight"].shape[0]) == 6
    if "time_embed.0.weight" in sd:
        model_channels = int(sd["time_embed.0.weight"].shape[1])
        flags["num_channels"] = model_channels
    else:
        return flags

    out_idx = _block_indices(sd, "output_blocks")
    if not out_idx:
        return flags
    # The first output block that ends with an upsampler sits at index num_res_blocks.
    up_blocks: list[tuple[int, str]] = []
    for j in out_idx:
        kinds = _sub_kinds(sd, f"output_blocks.{j}")
        last = max(kinds)
        if last >= 1 and kinds[last] in ("res", "conv"):
            up_blocks.append((j, kinds[last]))
    n_out = len(out_idx)
    if up_blocks:
        nrb = up_blocks[0][0]
        flags["resblock_updown"] = up_blocks[0][1] == "res"
    else:  # one level only: every output block is a plain ResBlock
        nrb = n_out - 1
    if nrb < 0 or n_out % (nrb + 1):
        return flags
    levels = n_out // (nrb + 1)
    flags["num_res_blocks"] = nrb

    # Output block j belongs to level levels - 1 - j // (nrb + 1); its first ResBlock has that level's width
    # and it holds attention iff the level's downsample rate is listed (same rule as the input side).
    mults, attn_ds = [], []
    for level in range(levels):
        j = (levels - 1 - level) * (nrb + 1)
        key = f"output_blocks.{j}.0.in_layers.2.weight"
        if key not in sd:
            return flags
        mults.append(int(sd[key].shape[0]) / model_channels)
        if f"output_blocks.{j}.1.qkv.weight" in sd:
            attn_ds.append(2**level)
    flags["channel_mult"] = ",".join(_fmt_mult(m) for m in mults)
    emb_key, out_key = "output_blocks.0.0.emb_layers.1.weight", "output_blocks.0.0.out_layers.3.weight"
    flags["use_scale_shift_norm"] = int(sd[emb_key].shape[0]) == 2 * int(sd[out_key].shape[0])
    flags["attention_ds"] = tuple(attn_ds)
    if image_size is not None:
        flags["attention_resolutions"] = ",".join(str(image_size // ds) for ds in attn_ds)
    return flags


def _module_of(key: str) -> tuple[str, str]:
    """Split a key into (block-level module, rest), e.g. ('output_blocks.5.1', 'qkv.weight')."""
    parts = key.split(".")
    depth = {"input_blocks": 3, "output_blocks": 3, "middle_block": 2}.get(parts[0], 1)
    depth = min(depth, len(parts) - 1)
    return ".".join(parts[:depth]), ".".join(parts[depth:])


def _group(keys: list[str]) -> str:
    """Every key, compactly: one line per block-level module listing its keys."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        module, rest = _module_of(k)
        groups.setdefault(module, []).append(rest)
    return "\n".join(f"    {m}: {', '.join(v)}" for m, v in groups.items())


def _normalised(key: str, value: Any, flags: Mapping[str, Any], inferred: Mapping[str, Any]) -> Any:
    """A flag value in comparable form: channel_mult as a tuple, attention as the set of reachable rates."""
    from rcdm.factory import parse_attention_resolutions, parse_channel_mult

    image_size = flags.get("image_size")
    try:
        if key == "channel_mult" and image_size:
            return tuple(float(m) for m in parse_channel_mult(value, image_size))
        if key == "attention_resolutions" and image_size and "channel_mult" in inferred:
            reachable = {2**i for i in range(len(str(inferred["channel_mult"]).split(",")))}
            return frozenset(parse_attention_resolutions(value, image_size)) & reachable
    except (TypeError, ValueError):
        pass
    return str(value)


def _hint(flags: Mapping[str, Any], inferred: Mapping[str, Any]) -> str:
    diffs = [
        f"{k}={inferred[k]!r} (flags say {flags.get(k)!r})"
        for k in inferred
        if k in flags
        and k != "attention_ds"
        and _normalised(k, inferred[k], flags, inferred) != _normalised(k, flags[k], flags, inferred)
    ]
    if not diffs:
        return (
            "the inferable flags agree; check image_size / attention_resolutions and that the file is an "
            "RCDM UNet"
        )
    return "set " + ", ".join(diffs)


def check_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    flags: Mapping[str, Any] | None = None,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointMismatchError` listing all missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shaped = [
        k for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    if not (missing or unexpected or shaped):
        return
    parts = [f"{source} does not fit the model built from the given flags:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s):\n{_group(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s):\n{_group(unexpected)}")
    if shaped:
        rows = [
            f"    {k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in shaped
        ]
        parts.append(f"  {len(shaped)} mis-shaped key(s):\n" + "\n".join(rows))
    image_size = (flags or {}).get("image_size")
    inferred = infer_flags(state_dict, image_size=image_size)
    shown = {k: v for k, v in inferred.items() if k != "attention_ds"}
    parts.append(f"  inferred from the checkpoint: {shown} (not inferable: {', '.join(NOT_INFERABLE)})")
    parts.append(f"  hint: {_hint(flags or {}, inferred)}")
    raise CheckpointMismatchError("\n".join(parts))


def flags_for_checkpoint(
    state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """The flags :func:`load_model` builds with: ``flags``, else MODEL_FLAGS_128 + what the file shows."""
    from rcdm.factory import MODEL_FLAGS_128

    if flags is None:
        out = dict(MODEL_FLAGS_128)
        image_size = overrides.get("image_size", out["image_size"])
        inferred = infer_flags(state_dict, image_size=image_size)
        inferred.pop("attention_ds", None)
        if not inferred.get("feat_cond", True):
            inferred.pop("ssl_dim", None)
        out.update(inferred)
    else:
        out = dict(flags)
    out.update(overrides)
    return out


def load_model(
    path: str | os.PathLike,
    flags: Mapping[str, Any] | None = None,
    *,
    trust: bool = False,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load a checkpoint file into ``(model, diffusion)``; strict, model in eval mode on ``device``.

    ``flags`` default to those a training checkpoint records, else to MODEL_FLAGS_128 (the published
    checkpoints) updated with what the file reveals
    (ssl_dim, learn_sigma, num_channels, channel_mult, ...); ``overrides`` (e.g.
    ``timestep_respacing="ddim25"``, ``use_fp16=True``) win over both. A mismatch raises
    :class:`CheckpointMismatchError`.
    """
    from rcdm.factory import create_diffusion_from_flags

    sd, full, model = _checked(path, flags, trust, overrides)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if full["use_fp16"]:
        model.convert_to_fp16()
    model.to(device).eval()
    return model, create_diffusion_from_flags(**full)


def _checked(
    path: str | os.PathLike, flags: Mapping[str, Any] | None, trust: bool, overrides: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.nn.Module]:
    """(state dict, full flags, a meta-device model those flags build), the state dict checked against it."""
    from rcdm.factory import create_model_from_flags, resolve_flags

    raw = safe_torch_load(path, trust=trust)
    sd = unwrap_state_dict(raw, source=str(path))
    if flags is None and isinstance(raw, Mapping) and isinstance(raw.get("model_flags"), Mapping):
        flags = raw["model_flags"]  # a training checkpoint records the flags it was built with
    full = resolve_flags(**flags_for_checkpoint(sd, flags, **overrides))
    # Built without allocating or initialising weights; load_model then adopts the checkpoint's tensors.
    with torch.device("meta"):
        model = create_model_from_flags(**{**full, "use_fp16": False})
    check_state_dict(model, sd, full, source=str(path))
    return sd, full, model


def checkpoint_flags(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *, trust: bool = False
) -> dict[str, Any]:
    """Every flag :func:`load_model` builds ``path`` with (the flags a training checkpoint records, else the
    published ones updated with what the file shows), ``overrides`` on top; checked against the file."""
    return _checked(path, None, trust, dict(overrides or {}))[1]
