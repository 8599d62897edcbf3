"""Image classifiers for the adversarial study's supervised comparison: which class an image, its attacked
copy and the samples of their representations are given.

Two kinds of file load (:func:`load_classifier`):

- a torchvision ResNet-50 state dict *with* its ``fc`` layer, e.g. ``resnet50-0676ba61.pth`` (IMAGENET1K_V1,
  the registry's ``supervised`` file: its trunk is the supervised encoder the published RCDM is conditioned
  on, its ``fc`` the 1000-way ImageNet classifier). It classifies as torchvision evaluates it: pixels in
  [0, 1] standardised with the ImageNet mean/std (the published RCDM code feeds the same trunk [-1, 1] when
  it is the encoder; the classifier is not the encoder).
- a factor probe written by ``rcdm study probe`` (the demo's ``shapes``): one of its heads (``kind`` by
  default) is the classifier; it brings any input to its own size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rcdm.io import safe_torch_load
from rcdm.preprocess import apply_input_norm, encoder_view


class _ProbeHead(nn.Module):
    """One head of a factor probe: [N, 3, H, W] in [0, 1] -> logits."""

    def __init__(self, probe: nn.Module, factor: str) -> None:
        super().__init__()
        self.probe = probe
        self.factor = factor

    def forward(self, x_unit: torch.Tensor) -> torch.Tensor:
        return self.probe(x_unit)[self.factor]


class ImageClassifier(nn.Module):
    """A frozen image classifier: ``forward`` takes images [N, 3, H, W] in [0, 1] and returns logits [N, C]
    (differentiable with respect to the images, for attacks).

    ``own_resize``: the network brings inputs to its own size (the factor probe); otherwise it classifies
    inputs at the size it is given, and samples are brought to a given size by
    :func:`rcdm.preprocess.encoder_view` (the one sample-to-encoder-input function).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        input_norm: str = "none",
        own_resize: bool = False,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.input_norm = input_norm
        self.own_resize = own_resize
        self.class_names = class_names

    def forward(self, x_unit: torch.Tensor) -> torch.Tensor:
        if x_unit.ndim != 4 or x_unit.shape[1] != 3:
            raise ValueError(f"{self.name} takes images [N, 3, H, W], got {tuple(x_unit.shape)}")
        if self.own_resize:
            return self.net(x_unit)
        return self.net(apply_input_norm(x_unit * 2.0 - 1.0, self.input_norm))

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def predict(self, x_unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Predicted classes (CPU int64 [N]) of images [N, 3, H, W] in [0, 1], classified as they are."""
        device = self._device()
        out = [
            self(x_unit[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(x_unit), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    @torch.inference_mode()
    def predict_samples(self, samples: torch.Tensor, size: int, batch_size: int = 64) -> torch.Tensor:
        """Predicted classes (CPU int64 [N]) of generated samples [N, 3, S, S] in [-1, 1], each brought to
        ``size`` px as the encoder sees it (:func:`rcdm.preprocess.encoder_view`); a classifier with its own
        resize takes them as they are."""
        device, out = self._device(), []
        for i in range(0, len(samples), batch_size):
            s = samples[i : i + batch_size]
            if self.own_resize:
                logits = self.net(((s.float() + 1) / 2).clamp(0, 1).to(device))
            else:
                logits = self.net(encoder_view(s, size, self.input_norm, device=device))
            out.append(logits.argmax(1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def class_name(self, c: int) -> str:
        """A class's name where the classifier knows them, else its index."""
        names = self.class_names
        return names[c] if names and 0 <= c < len(names) else str(c)


def _imagenet_categories(num_classes: int) -> list[str] | None:
    if num_classes != 1000:
        return None
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])  # shipped with torchvision


def _resnet50_classifier(sd: Mapping[str, torch.Tensor], file: Path) -> ImageClassifier:
    from torchvision.models import resnet50

    from rcdm.encoders import load_strict

    w = sd["fc.weight"]
    if w.ndim != 2 or w.shape[1] != 2048:
        raise ValueError(
            f"{file}: 'fc.weight' is {tuple(w.shape)}, not a ResNet-50 classifier [classes, 2048]"
        )
    with torch.device("meta"):
        net = resnet50(weights=None, num_classes=int(w.shape[0]))
    load_strict(net, sd, f"{file} (torchvision ResNet-50 classifier)", assign=True)
    return ImageClassifier(
        net,
        name=f"ResNet-50 classifier ({file.name})",
        input_norm="imagenet",
        class_names=_imagenet_categories(int(w.shape[0])),
    )


def load_classifier(
    path: str | Path, *, factor: str = "kind", trust: bool = False, device: torch.device | str = "cpu"
) -> ImageClassifier:
    """An image classifier from a torchvision ResNet-50 state dict (with ``fc``) or a factor probe file
    (its ``factor`` head); frozen, in eval mode, on ``device``."""
    from rcdm.probe import FORMAT as PROBE_FORMAT
    from rcdm.probe import load_probe

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"classifier file not found: {file}")
    ckpt = safe_torch_load(file, trust=trust)
    if isinstance(ckpt, Mapping) and ckpt.get("format") == PROBE_FORMAT:
        probe = load_probe(file, device=device)
        specs = {s.name: s for s in probe.specs if s.num_classes > 0}  # the classified factors
        if factor not in specs:
            raise ValueError(
                f"{file}: the factor probe has no {factor!r} head (heads: {', '.join(specs)}); choose one "
                "with --classifier-factor"
            )
        head = _ProbeHead(probe, factor)
        name = f"factor probe '{factor}' ({file.name})"
        return ImageClassifier(head, name=name, own_resize=True, class_names=specs[factor].names).to(device)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping):
        raise ValueError(f"{file}: expected a state dict or a factor probe, found {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "fc.weight" not in sd or "conv1.weight" not in sd:
        raise ValueError(
            f"{file}: not an image classifier: a torchvision ResNet-50 state dict with its 'fc' layer (e.g. "
            "resnet50-0676ba61.pth, `rcdm fetch supervised`) or a factor probe (`rcdm study probe`)"
        )
    return _resnet50_classifier(sd, file).to(device)
