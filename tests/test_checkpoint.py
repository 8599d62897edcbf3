"""Checkpoint loading: containers, safe loading, flag inference, mismatch reports, load_model round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rcdm.checkpoint import (
    CheckpointMismatchError,
    check_state_dict,
    infer_flags,
    load_model,
    load_state_dict,
)
from rcdm.factory import MODEL_FLAGS_128, create_model_from_flags
from rcdm.io import UnsafeCheckpointError


class PickledCheckpoint(dict):
    """A checkpoint container whose unpickling needs this module's code."""


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "golden_small.pt", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "step": torch.tensor(3)},
        lambda sd: {"state_dict": sd},
        lambda sd: {"ema": sd, "opt": {"lr": 1e-4}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "model", "state_dict", "ema", "ddp", "model+ddp"],
)
def test_load_state_dict_unwraps_containers(tmp_path, golden, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(golden["state_dict"]), path)
    assert_same_state(load_state_dict(path), golden["state_dict"])


def test_load_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_state_dict(tmp_path / "nothere.pt")
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"a": torch.zeros(1)}, "meta": 1}, path)
    with pytest.raises(ValueError, match="neither a state dict nor a container"):
        load_state_dict(path)


def test_pickled_code_checkpoint_is_refused_unless_trusted(tmp_path, golden):
    path = tmp_path / "pickled.pt"
    torch.save(PickledCheckpoint(golden["state_dict"]), path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict(path)
    assert "trust=True" in str(err.value) and "pickled.pt" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        load_model(path, golden["flags"])
    assert_same_state(load_state_dict(path, trust=True), golden["state_dict"])
    model, _ = load_model(path, golden["flags"], trust=True)
    assert torch.equal(model.ssl_emb.weight, golden["state_dict"]["ssl_emb.weight"])


def test_infer_flags_on_golden(golden):
    inferred = infer_flags(golden["state_dict"], image_size=32)
    assert inferred == {
        "ssl_dim": 32,
        "feat_cond": True,
        "class_cond": False,
        "learn_sigma": True,
        "num_channels": 32,
        "resblock_updown": True,
        "num_res_blocks": 1,
        "channel_mult": "1,2",
        "use_scale_shift_norm": True,
        "attention_ds": (2,),
        # "16,8" at 32px: ds 4 is never reached with two levels, so only 16 px is visible.
        "attention_resolutions": "16",
    }
    assert "attention_resolutions" not in infer_flags(golden["state_dict"])


@pytest.mark.parametrize(
    "flags",
    [
        dict(
            image_size=64,
            num_channels=32,
            num_res_blocks=2,
            channel_mult="1,2,3",
            attention_resolutions="32,16",
            learn_sigma=False,
            resblock_updown=False,
            use_scale_shift_norm=False,
            ssl_dim=8,
            class_cond=True,
        ),
        dict(
            image_size=32,
            num_channels=64,
            num_res_blocks=3,
            channel_mult="0.5,1,2",
            attention_resolutions="8",
            learn_sigma=True,
            resblock_updown=True,
            use_scale_shift_norm=True,
            ssl_dim=128,
        ),
        dict(
            image_size=16, num_channels=32, num_res_blocks=0, channel_mult="1,2", attention_resolutions="16"
        ),
    ],
)
def test_infer_flags_recovers_random_models(flags):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = create_model_from_flags(**flags)
    inferred = infer_flags(model.state_dict(), image_size=flags["image_size"])
    for key, value in flags.items():
        if key != "image_size":
            assert str(inferred[key]) == str(value), key
    assert inferred["feat_cond"] is True


def test_infer_flags_on_published_layout():
    with torch.device("meta"):
        model = create_model_from_flags(**{**MODEL_FLAGS_128, "ssl_dim": 8192})
    inferred = infer_flags(model.state_dict(), image_size=128)
    assert inferred["channel_mult"] == "1,1,2,3,4"
    assert inferred["attention_resolutions"] == "32,16,8"
    assert (inferred["ssl_dim"], inferred["num_channels"], inferred["num_res_blocks"]) == (8192, 256, 2)


def listed_keys(message: str, section: str) -> set[str]:
    """Expand the grouped 'module: a, b' lines of one section of a mismatch message back into keys."""
    block = re.search(rf"\d+ {section} key\(s\):\n((?:    .*\n?)*)", message)
    assert block, (section, message)
    keys = set()
    for line in block.group(1).splitlines():
        module, _, rest = line.strip().partition(": ")
        if section == "mis-shaped":
            keys.add(module)
        else:
            keys.update(f"{module}.{leaf}" for leaf in rest.split(", "))
    return keys


def test_mismatch_lists_every_missing_unexpected_and_misshaped_key(golden):
    sd = golden["state_dict"]
    flags = {**golden["flags"], "num_res_blocks": 2, "ssl_dim": 64, "learn_sigma": False}
    model = create_model_from_flags(**flags)
    expected, got = model.state_dict(), sd
    missing = {k for k in expected if k not in got}
    unexpected = {k for k in got if k not in expected}
    shaped = {k for k in expected if k in got and expected[k].shape != got[k].shape}
    assert missing and unexpected and {"ssl_emb.weight", "out.2.weight", "out.2.bias"} <= shaped
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict(model, sd, flags, source="golden.pt")
    message = str(err.value)
    assert listed_keys(message, "missing") == missing
    assert listed_keys(message, "unexpected") == unexpected
    assert listed_keys(message, "mis-shaped") == shaped
    assert "ssl_emb.weight: checkpoint (128, 32) vs model (128, 64)" in message
    assert "'ssl_dim': 32" in message and "'num_res_blocks': 1" in message  # inferred flags
    hint = message.split("hint:")[1]
    assert "ssl_dim=32" in hint and "learn_sigma=True" in hint and "num_res_blocks=1" in hint
    assert "channel_mult" not in hint and "attention_resolutions" not in hint  # those agree
    assert "num_heads" in message  # says what cannot be inferred


def test_load_model_matches_golden(tmp_path, golden):
    path = tmp_path / "golden_sd.pt"
    torch.save({"model": golden["state_dict"]}, path)
    model, diffusion = load_model(path, golden["flags"])
    assert not model.training
    with torch.inference_mode():
        out = model(golden["x"], golden["t"], feat=golden["feat"])
    torch.testing.assert_close(out, golden["model_out"], rtol=1e-4, atol=1e-5)
    assert diffusion.num_timesteps == 1000
    # Without flags: MODEL_FLAGS_128 + inferred architecture; heads are not inferable, so they are overridden.
    model2, _ = load_model(path, num_heads=2, timestep_respacing="ddim10")
    assert model2.ssl_dim == 32 and model2.model_channels == 32 and model2.channel_mult == (1, 2)
    with torch.inference_mode():
        torch.testing.assert_close(model2(golden["x"], golden["t"], feat=golden["feat"]), out)


def test_load_model_reports_mismatch_with_hint(tmp_path, golden):
    path = tmp_path / "golden_sd.pt"
    torch.save(golden["state_dict"], path)
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)golden_sd\.pt.*ssl_emb\.weight.*hint: set ssl_dim=32"
    ):
        load_model(path, {**golden["flags"], "ssl_dim": 2048})


def test_load_model_fp16_checkpoint_and_use_fp16(tmp_path, golden):
    """A checkpoint stored in fp16 loads into an fp32 model; use_fp16 converts only the torso."""
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in golden["state_dict"].items()}, path)
    model, _ = load_model(path, golden["flags"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model16, _ = load_model(path, golden["flags"], use_fp16=True)
    assert model16.dtype == torch.float16 and model16.out[2].weight.dtype == torch.float32
    with torch.inference_mode():
        a = model(golden["x"], golden["t"], feat=golden["feat"])
        b = model16(golden["x"], golden["t"], feat=golden["feat"])
    assert ((a - b).abs().max() / a.abs().max()) < 2e-2


def test_training_checkpoint_yields_its_ema_weights(tmp_path, golden):
    from rcdm.ema import EMA

    model = create_model_from_flags(**golden["flags"])
    model.load_state_dict(golden["state_dict"])
    ema = EMA(model, rates=(0.99,))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = {
        "format": "rcdm-train-checkpoint",
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "step": 5,
    }
    path = tmp_path / "ckpt_000005.pt"
    torch.save(state, path)
    assert_same_state(load_state_dict(path), golden["state_dict"])  # the EMA, not the moved weights
    state["ema"] = EMA(model, rates=(0.99, 0.9999)).state_dict()
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"2 rates \[0\.99, 0\.9999\].*ema_<rate>_<tag>\.pt"):
        load_state_dict(path)
    state["ema"] = {"unrelated": 1}
    torch.save(state, path)
    assert_same_state(load_state_dict(path), model.state_dict())


def test_load_model_uses_flags_recorded_in_a_training_checkpoint(tmp_path, golden):
    from rcdm.factory import resolve_flags

    path = tmp_path / "ckpt.pt"
    state = {"model": golden["state_dict"], "model_flags": resolve_flags(**golden["flags"]), "step": 1}
    torch.save(state, path)
    model, _ = load_model(path)  # num_heads=2 comes from the recorded flags, not MODEL_FLAGS_128
    with torch.inference_mode():
        out = model(golden["x"], golden["t"], feat=golden["feat"])
    torch.testing.assert_close(out, golden["model_out"], rtol=1e-4, atol=1e-5)


def test_flags_stage_reads_a_published_layout_file(tmp_path, golden, capsys):
    """`rcdm flags` writes every flag a (published-layout) file loads with, checked against it; a wrong
    flag is a one-line error, no traceback."""
    import json

    from rcdm.cli import main
    from rcdm.factory import resolve_flags

    path = tmp_path / "rcdm_ema_dino_trunk.pt"  # the published name and layout: a bare state dict
    torch.save(golden["state_dict"], path)
    out = tmp_path / "flags.json"
    assert main(["flags", str(path), "--model-flags", '{"num_heads": 2}', "--out", str(out)]) == 0
    flags = json.loads(out.read_text())
    assert flags == json.loads(json.dumps(resolve_flags(**flags)))  # complete: every flag, resolved
    assert flags["ssl_dim"] == 32 and flags["num_channels"] == 32 and flags["num_heads"] == 2  # read off
    model, _ = load_model(path, flags)
    with torch.inference_mode():
        out_ = model(golden["x"], golden["t"], feat=golden["feat"])
    torch.testing.assert_close(out_, golden["model_out"], rtol=1e-4, atol=1e-5)
    bad = tmp_path / "bad.json"
    assert main(["flags", str(path), "--model-flags", '{"ssl_dim": 2048}', "--out", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "rcdm flags:" in err and "ssl_dim" in err and "Traceback" not in err and not bad.exists()
