"""The frozen encoders whose representations RCDM is conditioned on, loaded from their authors' files.

Every published encoder is a torchvision ResNet-50 trunk (pooled, 2048-d) plus the projection head its
self-supervised method trained; each file keeps its own key layout, so each has a mapping from its key
names onto ours. Mapping is strict: any key of the file that is neither mapped nor explicitly known to be
unused, and any parameter left without a value, is an error listing them. Also loaded here: custom encoders
(``package.module:factory``) and the demo's ``small`` encoder written by ``rcdm pretrain``.

Inputs follow the published RCDM preprocessing: [N, 3, R, R] in [-1, 1] at ``input_size`` R, with no
ImageNet mean/std (the published code feeds [-1, 1] even to the supervised ResNet-50). ``input_norm`` tells
the caller which normalisation the encoder expects ("none" or "imagenet"); the module does not normalise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcdm.io import safe_torch_load

PUBLISHED = ("dino", "simclr", "barlow", "vicreg", "supervised")
LAYERS = ("trunk", "head")
SMALL_FORMAT = "rcdm-small-encoder"
INPUT_NORMS = ("none", "imagenet")


class EncoderLayoutError(ValueError):
    """A checkpoint's keys or shapes do not match the layout its encoder name promises."""


# --------------------------------------------------------------------------------------------- modules


class Encoder(nn.Module):
    """Trunk, optional head, and the layer whose output ``forward`` returns ([N, dim])."""

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module | None,
        layer: str,
        *,
        encoder_name: str,
        dims: Mapping[str, int],
        input_size: int,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if layer == "head" and head is None:
            raise ValueError(f"encoder {encoder_name!r} has no head; use layer='trunk'")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.trunk = trunk
        self.head = head if layer == "head" else None
        self.layer = layer
        self.encoder_name = encoder_name
        self.dim = int(dims[layer])
        self.input_size = int(input_size)
        self.input_norm = input_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _pooled(self.trunk(x))
        return h if self.head is None else self.head(h)


class EncoderPair(nn.Module):
    """Trunk and head outputs of one forward pass: ``{"trunk": [N, D_t], "head": [N, D_h]}``.

    Lets extraction write both layers' features while running the (expensive) trunk once.
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        *,
        encoder_name: str,
        dims: Mapping[str, int],
        input_size: int,
        input_norm: str = "none",
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.encoder_name = encoder_name
        self.layers = LAYERS
        self.dims = {k: int(dims[k]) for k in LAYERS}
        self.input_size = int(input_size)
        self.input_norm = input_norm

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = _pooled(self.trunk(x))
        return {"trunk": h, "head": self.head(h)}


def _pooled(h: torch.Tensor) -> torch.Tensor:
    """Global-average-pool a feature map (custom trunks may return one); pass vectors through."""
    return h.mean(dim=tuple(range(2, h.ndim))) if h.ndim > 2 else h


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def resnet50_trunk() -> nn.Module:
    """torchvision ResNet-50 without its classifier: [N, 3, R, R] -> pooled [N, 2048]."""
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def mlp(
    dims: list[int], *, bias: bool | list[bool] = True, norm: str = "bn", act: str = "relu"
) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``; between consecutive ones: optional BatchNorm, activation.

    ``norm`` is "bn" or "none"; ``act`` is "relu" or "gelu". With BatchNorm the Sequential indices of the
    Linear layers are 0, 3, 6, ...; without, 0, 2, 4, ... (the mappings below rely on this).
    """
    biases = bias if isinstance(bias, list) else [bias] * (len(dims) - 1)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=biases[i]))
        if i < len(dims) - 2:
            if norm == "bn":
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU() if act == "gelu" else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SmallResNet(nn.Module):
    """Small CPU-friendly ResNet (basic blocks) for ``rcdm pretrain``: [N, 3, R, R] -> pooled [N, widths[-1]].

    ``arch`` keys: ``widths`` (one stage per entry; every stage after the first halves the resolution),
    ``blocks`` (basic blocks per stage), ``stem_stride``.
    """

    def __init__(self, widths: list[int], blocks: int = 1, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            for b in range(blocks):
                stages.append(_BasicBlock(c_in, c_out, stride=2 if (i > 0 and b == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def build_small(arch: Mapping) -> tuple[nn.Module, nn.Module]:
    """Trunk and projector of the ``small`` encoder from its ``arch`` dict (as saved by ``rcdm pretrain``)."""
    trunk = SmallResNet(list(arch["widths"]), int(arch.get("blocks", 1)), int(arch.get("stem_stride", 1)))
    head = mlp([trunk.dim, *arch["head_dims"]], bias=[True] * (len(arch["head_dims"]) - 1) + [False])
    return trunk, head


# ------------------------------------------------------------------------------------- strict key mapping


def _strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` from the start of each key, repeatedly (``module.backbone.`` etc.)."""
    out = {}
    for key, value in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if key.startswith(p):
                    key, stripped = key[len(p) :], True
        if key in out:
            raise EncoderLayoutError(f"two keys of the file map to the same name {key!r}")
        out[key] = value
    return out


def _fmt_keys(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(
    module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, *, assign: bool = False
) -> None:
    """``load_state_dict`` that first reports every missing/unexpected key and shape mismatch by name.

    ``assign=True`` (for modules built on the meta device) adopts the file's tensors instead of copying
    into freshly initialised ones; floating tensors are converted to float32.
    """
    own = module.state_dict()
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shared = sorted(set(own) & set(sd))
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in shared
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unmapped keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:8])}")
    if problems:
        raise EncoderLayoutError(f"{what}: " + " | ".join(problems))
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise EncoderLayoutError(f"{what}: tensor {k!r} contains NaN or infinite values")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=assign)


def _dig(obj, path: tuple[str, ...], file: Path):
    """``obj[path[0]][path[1]]...`` with an error naming the first missing level and what exists there."""
    for depth, key in enumerate(path):
        if not isinstance(obj, Mapping) or key not in obj:
            where = ".".join(path[:depth]) or "<top level>"
            have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise EncoderLayoutError(f"{file}: no key {key!r} under {where} (found: {have})")
        obj = obj[key]
    return obj


def _split(sd: Mapping[str, torch.Tensor], head_prefix: str) -> tuple[dict, dict]:
    """Split a flat state dict into trunk keys and head keys (``head_prefix`` removed)."""
    trunk = {k: v for k, v in sd.items() if not k.startswith(head_prefix)}
    head = {k[len(head_prefix) :]: v for k, v in sd.items() if k.startswith(head_prefix)}
    return trunk, head


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    """Rename keys by a prefix table ``{file_prefix: our_prefix}``; a key matching no prefix is an error."""
    out, unmatched = {}, []
    for key, value in sd.items():
        for src, dst in table.items():
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise EncoderLayoutError(f"{what}: unmapped keys ({len(unmatched)}): {_fmt_keys(unmatched)}")
    return out


def _linear_dims(head_sd: Mapping[str, torch.Tensor], weight_keys: list[str], what: str) -> list[int]:
    """Layer widths of an MLP read off its Linear weights (so the head is built to the file's sizes)."""
    missing = [k for k in weight_keys if k not in head_sd]
    if missing:
        raise EncoderLayoutError(f"{what}: missing keys ({len(missing)}): {_fmt_keys(missing)}")
    dims = [int(head_sd[weight_keys[0]].shape[1])]
    dims += [int(head_sd[k].shape[0]) for k in weight_keys]
    return dims


# DINO's last_layer (prototypes, weight-normed in DINO's code, plain in the released ResNet-50 file) maps
# to the 60k-way self-distillation logits; RCDM uses the 256-d bottleneck before it, so it is never loaded.
_DINO_UNUSED = {
    "last_layer.weight",
    "last_layer.weight_g",
    "last_layer.weight_v",
    "last_layer.parametrizations.weight.original0",
    "last_layer.parametrizations.weight.original1",
}


def _layout_dino(ckpt, file: Path) -> tuple[dict, dict, nn.Module]:
    sd = _dig(ckpt, ("teacher",), file)
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    sd = _strip_prefixes(sd, ("module.", "backbone."))
    trunk, head = _split(sd, "head.")
    head = {k: v for k, v in head.items() if k not in _DINO_UNUSED}
    head = _rename(head, {"mlp.0.": "0.", "mlp.1.": "1.", "mlp.3.": "3."}, f"{file} (dino head)")
    dims = _linear_dims(head, ["0.weight", "3.weight"], f"{file} (dino head)")
    return trunk, head, mlp(dims, bias=True, norm="bn", act="gelu")


def _vissl_model(ckpt, file: Path) -> tuple[dict, dict]:
    model = _dig(ckpt, ("classy_state_dict", "base_model", "model"), file)
    trunk = _dig(model, ("trunk",), file)
    heads = _dig(model, ("heads",), file)
    bad = [k for k in trunk if not k.startswith("_feature_blocks.")]
    if bad:
        raise EncoderLayoutError(
            f"{file}: trunk keys without the '_feature_blocks.' prefix: {_fmt_keys(bad)}"
        )
    return _strip_prefixes(trunk, ("_feature_blocks.",)), dict(heads)


def _layout_simclr(ckpt, file: Path) -> tuple[dict, dict, nn.Module]:
    trunk, heads = _vissl_model(ckpt, file)
    head = _rename(heads, {"0.clf.0.": "0.", "1.clf.0.": "2."}, f"{file} (simclr heads)")
    dims = _linear_dims(head, ["0.weight", "2.weight"], f"{file} (simclr heads)")
    return trunk, head, mlp(dims, bias=True, norm="none", act="relu")


def _layout_barlow(ckpt, file: Path) -> tuple[dict, dict, nn.Module]:
    trunk, heads = _vissl_model(ckpt, file)
    table = {"0.clf.0.": "0.", "0.clf.1.": "1.", "1.clf.0.": "3.", "1.clf.1.": "4.", "2.clf.0.": "6."}
    head = _rename(heads, table, f"{file} (barlow heads)")
    dims = _linear_dims(head, ["0.weight", "3.weight", "6.weight"], f"{file} (barlow heads)")
    return trunk, head, mlp(dims, bias=False, norm="bn", act="relu")


def _layout_vicreg(ckpt, file: Path) -> tuple[dict, dict, nn.Module]:
    sd = _strip_prefixes(_dig(ckpt, ("model",), file), ("module.", "backbone."))
    trunk, head = _split(sd, "projector.")
    n_linear = sum(1 for k in head if k.endswith(".weight") and head[k].ndim == 2)
    if n_linear == 0:
        raise EncoderLayoutError(f"{file}: no projector keys ('projector.*') in the vicreg checkpoint")
    weight_keys = [f"{3 * i}.weight" for i in range(n_linear)]
    dims = _linear_dims(head, weight_keys, f"{file} (vicreg projector)")
    return trunk, head, mlp(dims, bias=[True] * (n_linear - 1) + [False], norm="bn", act="relu")


def _layout_supervised(ckpt, file: Path) -> tuple[dict, dict | None, None]:
    sd = ckpt["state_dict"] if isinstance(ckpt, Mapping) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, Mapping):
        raise EncoderLayoutError(f"{file}: expected a state dict, found {type(sd).__name__}")
    sd = _strip_prefixes(sd, ("module.",))
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}, None, None


_LAYOUTS: dict[str, Callable] = {
    "dino": _layout_dino,
    "simclr": _layout_simclr,
    "barlow": _layout_barlow,
    "vicreg": _layout_vicreg,
    "supervised": _layout_supervised,
}


# ------------------------------------------------------------------------------------------- loading


class MissingClass:
    """Stands in for a pickled class whose code is not installed (VISSL's, a training script's)."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (MissingClass,), {"__module__": f"missing:{module}"})


def _read(checkpoint_path: str | os.PathLike, trust: bool):
    """Read a checkpoint weights-only; argparse.Namespace (DINO saves its ``args``) is allowed as data.

    A trusted file that pickles classes or functions of packages not installed here (VISSL checkpoints,
    optimizer states with a training script's functions) is read with placeholders for them: only the
    tensors matter to the encoders.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return safe_torch_load(checkpoint_path, trust=trust)
        except (ImportError, AttributeError):
            if not trust:
                raise
    tolerant = types.SimpleNamespace(__name__="pickle", Unpickler=_TolerantUnpickler, load=pickle.load)
    return torch.load(checkpoint_path, map_location="cpu", weights_only=False, pickle_module=tolerant)


def _published(name: str, file: Path, trust: bool) -> tuple[nn.Module, nn.Module | None, dict]:
    ckpt = _read(file, trust)
    with torch.device("meta"):
        trunk_sd, head_sd, head = _LAYOUTS[name](ckpt, file)
        trunk = resnet50_trunk()
    load_strict(trunk, trunk_sd, f"{file} ({name} trunk)", assign=True)
    trunk = trunk.to(memory_format=torch.channels_last)  # faster convolutions (GPU tensor cores, oneDNN)
    dims = {"trunk": 2048}
    if head is not None:
        load_strict(head, head_sd, f"{file} ({name} head)", assign=True)
        dims["head"] = int(head[-1].out_features)
    return trunk, head, {"dims": dims, "input_size": 224, "input_norm": "none"}


def _small(file: Path, trust: bool) -> tuple[nn.Module, nn.Module, dict]:
    ckpt = _read(file, trust)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != SMALL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise EncoderLayoutError(
            f"{file}: not a small-encoder checkpoint (format {found!r}, want {SMALL_FORMAT!r})"
        )
    for key in ("arch", "trunk", "head", "input_size"):
        _dig(ckpt, (key,), file)
    with torch.device("meta"):
        trunk, head = build_small(ckpt["arch"])
    load_strict(trunk, ckpt["trunk"], f"{file} (small trunk)", assign=True)
    load_strict(head, ckpt["head"], f"{file} (small head)", assign=True)
    dims = {"trunk": trunk.dim, "head": int(head[-1].out_features)}
    meta = {"dims": dims, "input_size": int(ckpt["input_size"]), "input_norm": ckpt.get("input_norm", "none")}
    return trunk, head, meta


def _custom(
    spec: str, file: Path | None, trust: bool, input_size: int | None
) -> tuple[nn.Module, nn.Module | None, dict]:
    """``package.module:factory``: the factory's module maps images to features; its checkpoint (optional)
    is a state dict (bare, or under ``state_dict`` / ``model``) loaded strictly. A module with ``trunk`` and
    ``head`` submodules exposes both layers; any other module is its own trunk."""
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"custom encoder {spec!r}: cannot import {attr!r} from {mod_name!r} ({err})"
        ) from err
    net = factory()
    if not isinstance(net, nn.Module):
        raise TypeError(f"custom encoder {spec!r}: factory returned {type(net).__name__}, not an nn.Module")
    if file is not None:
        sd = _read(file, trust)
        for key in ("state_dict", "model"):
            if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
        load_strict(net, sd, f"{file} (custom {spec})")
    has_head = isinstance(getattr(net, "trunk", None), nn.Module) and isinstance(
        getattr(net, "head", None), nn.Module
    )
    trunk, head = (net.trunk, net.head) if has_head else (net, None)
    size = int(input_size or getattr(net, "input_size", 224))
    norm = getattr(net, "input_norm", "none")
    _freeze(net)
    with torch.inference_mode():
        h = _pooled(trunk(torch.zeros(2, 3, size, size)))
        dims = {"trunk": h.shape[1]} | ({"head": head(h).shape[1]} if head is not None else {})
    return trunk, head, {"dims": dims, "input_size": size, "input_norm": norm}


def _build(name: str, checkpoint_path, trust: bool, input_size: int | None):
    if name in PUBLISHED:
        if checkpoint_path is None:
            raise ValueError(
                f"encoder {name!r} needs its checkpoint file (see docs/weights.md, `rcdm fetch`)"
            )
        return _published(name, Path(checkpoint_path), trust)
    if name == "small":
        if checkpoint_path is None:
            raise ValueError("encoder 'small' needs the checkpoint written by `rcdm pretrain`")
        return _small(Path(checkpoint_path), trust)
    if ":" in name:
        return _custom(name, None if checkpoint_path is None else Path(checkpoint_path), trust, input_size)
    raise ValueError(
        f"unknown encoder {name!r}: choose from {', '.join(PUBLISHED)}, small, or 'package.module:factory'"
    )


def load(
    name: str,
    checkpoint_path: str | os.PathLike | None,
    layer: str = "trunk",
    *,
    trust: bool = False,
    input_size: int | None = None,
    input_norm: str | None = None,
) -> Encoder:
    """Frozen encoder (eval mode, no grads) mapping [N, 3, R, R] in [-1, 1] to the ``layer`` output [N, D].

    ``name``: one of ``PUBLISHED``, ``small``, or ``package.module:factory``. ``trust`` allows checkpoints
    that need code unpickling (some VISSL files). ``input_size``/``input_norm`` override the defaults
    (224 / "none" for the published ResNet-50s, the training size for ``small``).
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if name == "supervised" and layer == "head":
        raise ValueError(
            "encoder 'supervised' has no projection head (its classifier is removed): use layer='trunk'"
        )
    trunk, head, meta = _build(name, checkpoint_path, trust, input_size)
    if layer == "head" and head is None:
        raise ValueError(f"encoder {name!r} has no head: use layer='trunk'")
    enc = Encoder(
        trunk,
        head,
        layer,
        encoder_name=name,
        dims=meta["dims"],
        input_size=input_size or meta["input_size"],
        input_norm=input_norm or meta["input_norm"],
    )
    return _freeze(enc)


def load_pair(
    name: str,
    checkpoint_path: str | os.PathLike | None,
    *,
    trust: bool = False,
    input_size: int | None = None,
    input_norm: str | None = None,
) -> EncoderPair:
    """Frozen encoder whose forward returns ``{"trunk": ..., "head": ...}`` from one trunk pass."""
    if name == "supervised":
        raise ValueError("encoder 'supervised' has no projection head: load it with load(..., layer='trunk')")
    trunk, head, meta = _build(name, checkpoint_path, trust, input_size)
    if head is None:
        raise ValueError(f"encoder {name!r} has no head: load it with load(..., layer='trunk')")
    norm = input_norm or meta["input_norm"]
    if norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {norm!r}")
    pair = EncoderPair(
        trunk,
        head,
        encoder_name=name,
        dims=meta["dims"],
        input_size=input_size or meta["input_size"],
        input_norm=norm,
    )
    return _freeze(pair)


class EncoderMismatchError(ValueError):
    """The encoder file is not the one a features file was extracted with."""


def recorded_encoder_sha256(attrs: Mapping[str, Any]) -> str:
    """The encoder file's sha256 recorded in a features file (``encoder_sha256``; older files:
    ``checkpoint_sha256``), or "" when none was recorded."""
    return str(attrs.get("encoder_sha256") or attrs.get("checkpoint_sha256") or "")


def load_as_extracted(
    name: str | None,
    checkpoint_path: str | os.PathLike | None,
    layer: str | None = None,
    *,
    features_attrs: Mapping[str, Any] | None = None,
    trust: bool = False,
    device: torch.device | str | None = None,
) -> Encoder:
    """The encoder that made a features file, configured as it was: the one loader for re-encoding images.

    ``name`` and ``layer`` default to those recorded in ``features_attrs`` (the attributes of the features
    file); the file's sha256 must equal the recorded one (:class:`EncoderMismatchError` otherwise), and the
    recorded input size and normalisation are used, so samples are encoded exactly like the gallery was.
    """
    from rcdm.io import sha256_file

    attrs = dict(features_attrs or {})
    name = name or attrs.get("encoder") or None
    layer = layer or attrs.get("layer") or "trunk"
    if not name:
        raise ValueError("no encoder named: give --encoder (the features file records none)")
    if checkpoint_path is not None and not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {checkpoint_path}")
    recorded = recorded_encoder_sha256(attrs)
    if checkpoint_path is not None and recorded:
        found = sha256_file(checkpoint_path)
        if found != recorded:
            raise EncoderMismatchError(
                f"{checkpoint_path} (sha256 {found[:12]}...) is not the encoder file the features were "
                f"extracted with (sha256 {recorded[:12]}...): give that file, or re-extract the features"
            )
    enc = load(
        name,
        checkpoint_path,
        layer,
        trust=trust,
        input_size=int(attrs["input_size"]) if attrs.get("input_size") else None,
        input_norm=attrs.get("input_norm") or None,
    )
    return enc if device is None else enc.to(device)
