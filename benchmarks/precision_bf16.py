"""bf16 autocast versus fp32 features of a ResNet-50 encoder with projector heads (issue 12, item 4).

The encoder is built as ``rcdm.encoders`` builds the published ones (torchvision ResNet-50 trunk, pooled
2048-d; projector heads with the published layer shapes of VICReg, SimCLR and DINO), with random weights:
torchvision's initialisation, then every BatchNorm's running statistics recalibrated on the images themselves
(one pass in train mode, cumulative average), so activations are normalised as in a trained network. Each
image goes through extraction's own path (``center_crop_arr`` at 224, [-1, 1], no mean/std normalisation)
and the encoder runs once in fp32 and once under ``rcdm.stages.extract.encoder_precision(device, "bf16")``
(what ``rcdm extract --precision bf16`` uses). Per layer and image set it reports, over images, the cosine
distance ``1 - cos(f32, bf16)`` and the relative L2 ``|bf16 - f32| / |f32|`` (mean, median, max); as scales,
the relative L2 between an image's fp32 features and those of its horizontal mirror and the median cosine
distance between different images; and the share of images whose nearest other image (cosine) is the same
in bf16 as in fp32. Two diagnostics tell precision loss from the network's own sensitivity: the relative L2
when only the input is rounded to bf16 and the network runs in fp32, and the bf16 error of the trunk's
feature maps after each ResNet stage (on the first batch).

Image sets: ``photos``, random crops (seeded) of scikit-image's bundled photographs, and ``shapes``, the
built-in synthetic validation images; ``--num-images`` of each (default 64).

Usage: ``python benchmarks/precision_bf16.py [--num-images 64] [--out results/precision_bf16.json]``.
Pretrained weights may behave differently: ``--encoder NAME --encoder-checkpoint FILE`` measures a weights
file that ``rcdm.encoders`` reads (its own trunk and head, BatchNorm statistics as stored).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rcdm import encoders
from rcdm.data import open_dataset
from rcdm.preprocess import center_crop_arr, encoder_input
from rcdm.stages.extract import encoder_precision

HEADS = {  # the published projector shapes (rcdm.encoders._layout_*)
    "vicreg": dict(dims=[2048, 8192, 8192, 8192], bias=[True, True, False], norm="bn", act="relu"),
    "simclr": dict(dims=[2048, 2048, 128], bias=True, norm="none", act="relu"),
    "dino": dict(dims=[2048, 2048, 256], bias=True, norm="bn", act="gelu"),
}


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random square crops (side 35-100 % of the shorter side) of the bundled photographs, then the
    published centre crop at ``size``."""
    source = open_dataset("photos")
    photos = [source.load(i) for i in range(len(source))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = photos[rng.integers(len(photos))]
        side = int(min(im.size) * rng.uniform(0.35, 1.0))
        left, top = rng.integers(0, im.size[0] - side + 1), rng.integers(0, im.size[1] - side + 1)
        out.append(center_crop_arr(im.crop((left, top, left + side, top + side)), size))
    return np.stack(out)


def shape_images(n: int, size: int, seed: int) -> np.ndarray:
    source = open_dataset("shapes", "val", num_images=n, seed=seed, native_size=64)
    return np.stack([center_crop_arr(source.load(i), size) for i in range(n)])


class TrunkAndHeads(nn.Module):
    """A trunk and heads on its pooled output, computed as ``rcdm.encoders.EncoderPair`` computes trunk and
    head (one trunk pass serves every head)."""

    def __init__(
        self, trunk: nn.Module, heads: dict[str, nn.Module], input_size: int, input_norm: str
    ) -> None:
        super().__init__()
        self.trunk, self.heads = trunk, nn.ModuleDict(heads)
        self.input_size, self.input_norm = input_size, input_norm

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = encoders._pooled(self.trunk(x))
        return {"trunk": h, **{name: head(h) for name, head in self.heads.items()}}


def random_encoder(seed: int) -> TrunkAndHeads:
    """torchvision's random ResNet-50 trunk with a random head of each published shape."""
    torch.manual_seed(seed)
    trunk = encoders.resnet50_trunk()
    heads = {
        name: encoders.mlp(s["dims"], bias=s["bias"], norm=s["norm"], act=s["act"])
        for name, s in HEADS.items()
    }
    return TrunkAndHeads(trunk, heads, 224, "none")


def loaded_encoder(name: str, checkpoint: Path, trust: bool) -> TrunkAndHeads:
    """A weights file read by ``rcdm.encoders`` (its trunk and, when it has one, its head)."""
    if name == "supervised":
        enc = encoders.load(name, checkpoint, "trunk", trust=trust)
        return TrunkAndHeads(enc.trunk, {}, enc.input_size, enc.input_norm)
    pair = encoders.load_pair(name, checkpoint, trust=trust)
    return TrunkAndHeads(pair.trunk, {name: pair.head}, pair.input_size, pair.input_norm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Running mean/var of every BatchNorm = their cumulative average over ``x`` (train-mode pass)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for lo in range(0, len(x), batch_size):
        model(x[lo : lo + batch_size])
    model.eval()


@torch.inference_mode()
def features(model: nn.Module, x: torch.Tensor, precision: str, batch_size: int) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(x), batch_size):
        with encoder_precision(x.device, precision):
            f = model(x[lo : lo + batch_size])
        for layer, v in f.items():
            out.setdefault(layer, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double(), b.double()
    cos = 1 - torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = (b - a).norm(dim=1) / a.norm(dim=1)
    out = {}
    for name, v in (("cos_dist", cos), ("rel_l2", rel)):
        out |= {
            f"{name}_mean": v.mean().item(),
            f"{name}_median": v.median().item(),
            f"{name}_max": v.max().item(),
        }
    return out


@torch.inference_mode()
def stage_errors(model: TrunkAndHeads, x: torch.Tensor) -> dict[str, float]:
    """Median relative L2 (over images) of bf16 vs fp32 feature maps after each ResNet stage, on ``x``."""
    t = model.trunk
    stages = {"stem": nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool), "layer1": t.layer1,
              "layer2": t.layer2, "layer3": t.layer3, "layer4": t.layer4}  # fmt: skip
    maps = {}
    for precision in ("fp32", "bf16"):
        h, maps[precision] = x, []
        with encoder_precision(x.device, precision):
            for stage in stages.values():
                h = stage(h)
                maps[precision].append(h.float().flatten(1))
    return {
        name: ((b - a).norm(dim=1) / a.norm(dim=1)).median().item()
        for name, a, b in zip(stages, maps["fp32"], maps["bf16"])
    }


def neighbours(f: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each image's nearest other image (cosine) and the median cosine distance between different images."""
    z = torch.nn.functional.normalize(f.double(), dim=1)
    sim = z @ z.T
    off = ~torch.eye(len(f), dtype=torch.bool)
    return sim.masked_fill(~off, -2).argmax(1), (1 - sim[off]).median().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--encoder", help="with --encoder-checkpoint: measure these weights (dino, simclr, ...)"
    )
    parser.add_argument("--encoder-checkpoint", type=Path, help="weights file (default: random weights)")
    parser.add_argument("--trust-encoder", action="store_true", help="allow files that unpickle code")
    parser.add_argument("--out", type=Path, help="JSON file for the numbers (printed either way)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if (args.encoder is None) != (args.encoder_checkpoint is None):
        parser.error("--encoder and --encoder-checkpoint go together")

    def build() -> TrunkAndHeads:
        if args.encoder_checkpoint is None:
            return random_encoder(args.seed)
        return loaded_encoder(args.encoder, args.encoder_checkpoint, args.trust_encoder)

    size = build().input_size
    sets = {
        "photos": photo_crops(args.num_images, size, args.seed),
        "shapes": shape_images(args.num_images, size, args.seed),
    }
    rows, growth = [], {}
    t0 = time.perf_counter()
    for set_name, images in sets.items():
        model = build().to(device).eval()
        x = encoder_input(torch.from_numpy(images), model.input_norm).to(device)
        if args.encoder_checkpoint is None:
            recalibrate_batchnorm(model, x, args.batch_size)
        f32 = features(model, x, "fp32", args.batch_size)
        bf16 = features(model, x, "bf16", args.batch_size)
        mirror = features(model, x.flip(-1), "fp32", args.batch_size)
        rounded = features(model, x.bfloat16().float(), "fp32", args.batch_size)  # fp32 net, bf16 input
        if all(hasattr(model.trunk, k) for k in ("conv1", "layer4")):  # a torchvision ResNet trunk
            growth[set_name] = stage_errors(model, x[: args.batch_size])
        for layer in ("trunk", *model.heads):
            name = f"{'trunk' if layer == 'trunk' else layer + ' head'} ({f32[layer].shape[1]}-d)"
            mirror_rel = compare(f32[layer], mirror[layer])["rel_l2_median"]
            rounded_rel = compare(f32[layer], rounded[layer])["rel_l2_median"]
            nn32, between = neighbours(f32[layer])
            same_nn = (neighbours(bf16[layer])[0] == nn32).double().mean().item()
            rows.append({"images": set_name, "layer": name, **compare(f32[layer], bf16[layer]),
                         "mirror_rel_l2_median": mirror_rel, "between_cos_dist_median": between,
                         "same_nearest_neighbour": same_nn,
                         "input_rounding_rel_l2_median": rounded_rel})  # fmt: skip
    report = {
        "encoder": f"{args.encoder} {args.encoder_checkpoint}" if args.encoder else "random resnet50 + heads",
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type,
        "torch": torch.__version__,
        "num_images": args.num_images,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "trunk_stage_rel_l2_median": growth,
    }
    print("| images | layer | cosine distance mean / median / max | relative L2 mean / median / max | "
          "mirror relative L2 (median, fp32) | cosine distance between images (median, fp32) | "
          "same nearest neighbour | relative L2 of bf16-rounded input, fp32 network (median) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cos = " / ".join(f"{r[f'cos_dist_{k}']:.2e}" for k in ("mean", "median", "max"))
        rel = " / ".join(f"{r[f'rel_l2_{k}']:.2e}" for k in ("mean", "median", "max"))
        print(f"| {r['images']} | {r['layer']} | {cos} | {rel} | {r['mirror_rel_l2_median']:.2e} | "
              f"{r['between_cos_dist_median']:.2e} | {r['same_nearest_neighbour']:.0%} | "
              f"{r['input_rounding_rel_l2_median']:.2e} |")  # fmt: skip
    for set_name, g in growth.items():
        print(
            f"{set_name}: bf16 vs fp32 relative L2 (median) of the trunk's feature maps after each stage, "
            f"first {args.batch_size} images: " + ", ".join(f"{k} {v:.2e}" for k, v in g.items())
        )
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
