"""Encoder zoo: synthetic checkpoints in each published file layout (exact key names and nesting).

The trunk is a random torchvision ResNet-50 state dict renamed into each layout. Heads use the published
shapes; the 8192-wide Barlow/VICReg layers are stored as expanded (stride-0) tensors so the files stay tiny.
"""

from __future__ import annotations

import argparse
import fractions
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

from rcdm import encoders
from rcdm.encoders import EncoderLayoutError
from rcdm.io import UnsafeCheckpointError

SIZE = 64  # input resolution for the tests: any size works for the pooled trunk


def _bn(prefix: str, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}weight": 1 + 0.1 * torch.randn(n, generator=gen),
        f"{prefix}bias": 0.1 * torch.randn(n, generator=gen),
        f"{prefix}running_mean": 0.1 * torch.randn(n, generator=gen),
        f"{prefix}running_var": 0.5 + torch.rand(n, generator=gen),
        f"{prefix}num_batches_tracked": torch.tensor(1000),
    }


def _wide(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A [rows, cols] weight stored as one random row expanded (a few KB on disk, full shape when loaded)."""
    return (torch.randn(cols, generator=gen) / cols**0.5).expand(rows, cols)


@pytest.fixture(scope="module")
def trunk_sd() -> dict[str, torch.Tensor]:
    """Random ResNet-50 trunk weights (fc removed) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    sd = {k: v for k, v in resnet50().state_dict().items() if not k.startswith("fc.")}
    gen = torch.Generator().manual_seed(1)
    for k in list(sd):
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(sd[k].shape, generator=gen)
        elif k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(sd[k].shape, generator=gen)
    return sd


@pytest.fixture(scope="module")
def heads() -> dict[str, dict[str, torch.Tensor]]:
    """Head tensors under the names of each published file (before any prefix)."""
    g = torch.Generator().manual_seed(2)
    dino = {
        "mlp.0.weight": torch.randn(4096, 2048, generator=g) / 45,
        "mlp.0.bias": 0.1 * torch.randn(4096, generator=g),
        **_bn("mlp.1.", 4096, g),
        "mlp.3.weight": torch.randn(256, 4096, generator=g) / 64,
        "mlp.3.bias": 0.1 * torch.randn(256, generator=g),
        "last_layer.weight": _wide(60000, 256, g),
    }
    simclr = {
        "0.clf.0.weight": torch.randn(2048, 2048, generator=g) / 45,
        "0.clf.0.bias": 0.1 * torch.randn(2048, generator=g),
        "1.clf.0.weight": torch.randn(128, 2048, generator=g) / 45,
        "1.clf.0.bias": 0.1 * torch.randn(128, generator=g),
    }
    barlow = {
        "0.clf.0.weight": _wide(8192, 2048, g),
        **_bn("0.clf.1.", 8192, g),
        "1.clf.0.weight": _wide(8192, 8192, g),
        **_bn("1.clf.1.", 8192, g),
        "2.clf.0.weight": _wide(8192, 8192, g),
    }
    vicreg = {
        "0.weight": _wide(8192, 2048, g),
        "0.bias": torch.randn(8192, generator=g),
        **_bn("1.", 8192, g),
        "3.weight": _wide(8192, 8192, g),
        "3.bias": torch.randn(8192, generator=g),
        **_bn("4.", 8192, g),
        "6.weight": _wide(8192, 8192, g),
    }
    return {"dino": dino, "simclr": simclr, "barlow": barlow, "vicreg": vicreg}


def _vissl(trunk: dict, heads: dict, extra=None) -> dict:
    model = {"trunk": {f"_feature_blocks.{k}": v for k, v in trunk.items()}, "heads": dict(heads)}
    ckpt = {
        "phase_idx": 999,
        "iteration": 1000,
        "classy_state_dict": {"base_model": {"model": model, "meta": {}}},
    }
    if extra is not None:
        ckpt["config"] = extra
    return ckpt


def make_checkpoint(name: str, trunk: dict, heads: dict) -> object:
    """A checkpoint with the key names and nesting of the file the authors of ``name`` publish."""
    if name == "dino":
        teacher = {f"module.backbone.{k}": v for k, v in trunk.items()}
        teacher |= {f"module.head.{k}": v for k, v in heads["dino"].items()}
        return {"teacher": teacher, "epoch": 800, "args": argparse.Namespace(arch="resnet50", out_dim=60000)}
    if name in ("simclr", "barlow"):
        return _vissl(trunk, heads[name])
    if name == "vicreg":
        model = {f"module.backbone.{k}": v for k, v in trunk.items()}
        model |= {f"module.projector.{k}": v for k, v in heads["vicreg"].items()}
        return {"epoch": 1000, "model": model}
    if name == "supervised":
        return {**trunk, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    raise AssertionError(name)


@pytest.fixture(scope="module")
def files(tmp_path_factory, trunk_sd, heads) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in encoders.PUBLISHED:
        out[name] = root / f"{name}.pth"
        torch.save(make_checkpoint(name, trunk_sd, heads), out[name])
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1


HEAD_DIMS = {"dino": 256, "simclr": 128, "barlow": 8192, "vicreg": 8192}


@pytest.mark.parametrize("name", encoders.PUBLISHED)
def test_published_layouts_map_every_key(name, files, images):
    enc = encoders.load(name, files[name], "trunk")
    assert (enc.encoder_name, enc.layer, enc.dim, enc.input_size, enc.input_norm) == (
        name,
        "trunk",
        2048,
        224,
        "none",
    )
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with torch.inference_mode():
        out = enc(images)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    if name == "supervised":
        return
    head = encoders.load(name, files[name], "head")
    pair = encoders.load_pair(name, files[name])
    assert head.dim == HEAD_DIMS[name] and pair.dims == {"trunk": 2048, "head": HEAD_DIMS[name]}
    with torch.inference_mode():
        both = pair(images)
        if HEAD_DIMS[name] < 8192:  # the 8192-wide heads' forward is checked once, via the pair
            assert torch.equal(both["head"], head(images))
    assert both["head"].shape == (2, HEAD_DIMS[name]) and torch.isfinite(both["head"]).all()
    assert torch.equal(both["trunk"], out)


def _reference_trunk(trunk_sd, images):
    net = resnet50()
    net.fc = nn.Identity()
    net.load_state_dict(trunk_sd)
    with torch.inference_mode():
        return net.eval()(images)


def test_dino_and_simclr_match_a_reference_computation(files, trunk_sd, heads, images):
    ref = _reference_trunk(trunk_sd, images)
    d, s = heads["dino"], heads["simclr"]
    with torch.inference_mode():
        h = F.linear(ref, d["mlp.0.weight"], d["mlp.0.bias"])
        h = (h - d["mlp.1.running_mean"]) / torch.sqrt(d["mlp.1.running_var"] + 1e-5)
        h = F.gelu(h * d["mlp.1.weight"] + d["mlp.1.bias"])
        dino_ref = F.linear(h, d["mlp.3.weight"], d["mlp.3.bias"])
        h = torch.relu(F.linear(ref, s["0.clf.0.weight"], s["0.clf.0.bias"]))
        simclr_ref = F.linear(h, s["1.clf.0.weight"], s["1.clf.0.bias"])
        dino = encoders.load_pair("dino", files["dino"])(images)
        simclr = encoders.load("simclr", files["simclr"], "head")(images)
    # the loaded trunk runs channels_last: another summation order, so fp32 rounding differs slightly
    for got, want in ((dino["trunk"], ref), (dino["head"], dino_ref), (simclr, simclr_ref)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_vicreg_projector_matches_reference(files, heads, trunk_sd, images):
    v = heads["vicreg"]
    ref = _reference_trunk(trunk_sd, images)

    def bn(h, p):
        return (h - v[p + "running_mean"]) / torch.sqrt(v[p + "running_var"] + 1e-5) * v[p + "weight"] + v[
            p + "bias"
        ]

    with torch.inference_mode():
        h = torch.relu(bn(F.linear(ref, v["0.weight"], v["0.bias"]), "1."))
        h = torch.relu(bn(F.linear(h, v["3.weight"], v["3.bias"]), "4."))
        want = F.linear(h, v["6.weight"])
        got = encoders.load("vicreg", files["vicreg"], "head")(images)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_unmapped_and_missing_keys_are_listed(tmp_path, trunk_sd, heads):
    ckpt = make_checkpoint("vicreg", trunk_sd, heads)
    ckpt["model"]["module.backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    del ckpt["model"]["module.backbone.layer2.1.bn2.running_var"]
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(EncoderLayoutError) as err:
        encoders.load("vicreg", tmp_path / "bad.pth")
    msg = str(err.value)
    assert "layer5.0.conv1.weight" in msg and "layer2.1.bn2.running_var" in msg
    assert "missing keys (1)" in msg and "unmapped keys (1)" in msg


def test_unknown_head_key_and_wrong_shape_are_errors(tmp_path, trunk_sd, heads):
    bad_heads = dict(heads)
    bad_heads["simclr"] = {**heads["simclr"], "2.clf.0.weight": torch.zeros(3, 3)}
    torch.save(make_checkpoint("simclr", trunk_sd, bad_heads), tmp_path / "extra.pth")
    with pytest.raises(EncoderLayoutError, match=r"2\.clf\.0\.weight"):
        encoders.load("simclr", tmp_path / "extra.pth", "head")
    trunk = dict(trunk_sd)
    trunk["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(make_checkpoint("supervised", trunk, heads), tmp_path / "shape.pth")
    with pytest.raises(
        EncoderLayoutError, match=r"conv1\.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"
    ):
        encoders.load("supervised", tmp_path / "shape.pth")


def test_missing_nesting_level_is_named(tmp_path, trunk_sd, heads):
    ckpt = make_checkpoint("dino", trunk_sd, heads)
    ckpt["student"] = ckpt.pop("teacher")
    torch.save(ckpt, tmp_path / "d.pth")
    with pytest.raises(EncoderLayoutError, match=r"no key 'teacher'.*student"):
        encoders.load("dino", tmp_path / "d.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        encoders.load("dino", tmp_path / "nope.pth")


def test_nan_weights_are_rejected(tmp_path, trunk_sd, heads):
    trunk = dict(trunk_sd)
    trunk["layer4.2.conv3.weight"] = trunk["layer4.2.conv3.weight"].clone()
    trunk["layer4.2.conv3.weight"][0, 0] = float("nan")
    torch.save(make_checkpoint("supervised", trunk, heads), tmp_path / "nan.pth")
    with pytest.raises(EncoderLayoutError, match=r"layer4\.2\.conv3\.weight.*NaN"):
        encoders.load("supervised", tmp_path / "nan.pth")


def test_code_pickled_checkpoint_refused_unless_trusted(tmp_path, trunk_sd, heads):
    torch.save(_vissl(trunk_sd, heads["simclr"], extra=fractions.Fraction(1, 3)), tmp_path / "vissl.torch")
    with pytest.raises(UnsafeCheckpointError, match="trust"):
        encoders.load("simclr", tmp_path / "vissl.torch")
    assert encoders.load("simclr", tmp_path / "vissl.torch", "head", trust=True).dim == 128


class _ScriptFunctionHolder:
    pass


def test_trusted_file_with_uninstalled_classes_loads(tmp_path, trunk_sd, heads, monkeypatch):
    # a class from a module that exists while saving (like VISSL's or a training script's), gone at load time
    mod = types.ModuleType("vissl_like_module")
    _ScriptFunctionHolder.__module__, _ScriptFunctionHolder.__qualname__ = "vissl_like_module", "AttrDict"
    mod.AttrDict = _ScriptFunctionHolder
    monkeypatch.setitem(sys.modules, "vissl_like_module", mod)
    ckpt = _vissl(trunk_sd, heads["barlow"], extra=_ScriptFunctionHolder())
    torch.save(ckpt, tmp_path / "barlow.torch")
    monkeypatch.delitem(sys.modules, "vissl_like_module")
    with pytest.raises(UnsafeCheckpointError):
        encoders.load("barlow", tmp_path / "barlow.torch")
    assert encoders.load("barlow", tmp_path / "barlow.torch", "head", trust=True).dim == 8192


def test_supervised_has_no_head(files):
    with pytest.raises(ValueError, match="no projection head"):
        encoders.load("supervised", files["supervised"], "head")
    with pytest.raises(ValueError, match="no projection head"):
        encoders.load_pair("supervised", files["supervised"])


def test_unknown_name_and_layer(files):
    with pytest.raises(ValueError, match="unknown encoder 'mocov3'"):
        encoders.load("mocov3", files["dino"])
    with pytest.raises(ValueError, match="layer must be one of"):
        encoders.load("dino", files["dino"], "neck")


class _TinyWithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        )  # feature map: pooled by the loader
        self.head = nn.Linear(8, 5)
        self.input_size = 16


@pytest.fixture
def factory_module(monkeypatch):
    mod = types.ModuleType("rcdm_test_factories")
    mod.tiny = _TinyWithHead
    mod.plain = lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    monkeypatch.setitem(sys.modules, "rcdm_test_factories", mod)
    return mod


def test_custom_factory_with_checkpoint(tmp_path, factory_module):
    torch.manual_seed(5)
    src = _TinyWithHead()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "tiny.pt")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    enc = encoders.load("rcdm_test_factories:tiny", tmp_path / "tiny.pt", "head")
    pair = encoders.load_pair("rcdm_test_factories:tiny", tmp_path / "tiny.pt")
    assert (enc.dim, enc.input_size, pair.dims) == (5, 16, {"trunk": 8, "head": 5})
    with torch.inference_mode():
        want = src.head(src.trunk(x).mean(dim=(2, 3)))
        torch.testing.assert_close(enc(x), want)
        torch.testing.assert_close(pair(x)["trunk"], src.trunk(x).mean(dim=(2, 3)))
    torch.save({"trunk.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(EncoderLayoutError, match=r"missing keys \(3\)"):
        encoders.load("rcdm_test_factories:tiny", tmp_path / "partial.pt")


def test_custom_factory_without_head(factory_module):
    enc = encoders.load("rcdm_test_factories:plain", None, input_size=8)
    assert (enc.dim, enc.input_size) == (4, 8)
    with pytest.raises(ValueError, match="no head"):
        encoders.load("rcdm_test_factories:plain", None, "head")
    with pytest.raises(ValueError, match="cannot import 'nothing'"):
        encoders.load("rcdm_test_factories:nothing", None)
