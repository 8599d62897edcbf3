"""The flag factory: published names and defaults, channel_mult / attention parsing, unknown-flag errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import rcdm
from rcdm.factory import (
    MODEL_FLAGS_128,
    UnknownFlagError,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    create_model_from_flags,
    model_and_diffusion_defaults,
    parse_attention_resolutions,
    parse_channel_mult,
)

PUBLISHED_FLAGS = {
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
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}


def test_defaults_are_the_published_ones():
    assert model_and_diffusion_defaults() == PUBLISHED_FLAGS
    # A fresh copy each call: callers may mutate it.
    model_and_diffusion_defaults()["image_size"] = 1
    assert model_and_diffusion_defaults()["image_size"] == 64


def test_published_call_pattern_ports_unchanged():
    # The published sampling scripts pass ssl_dim (and feat_cond) next to the parsed defaults.
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, {**model_and_diffusion_defaults(), "image_size": 32})
    argv = ["--num_channels", "32", "--attention_resolutions", "16", "--channel_mult", "1,2"]
    args = parser.parse_args(argv)
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**flags, G_shared=False, feat_cond=True, ssl_dim=48)
    assert model.ssl_emb.weight.shape == (4 * 32, 48)
    assert diffusion.num_timesteps == 1000


def test_model_flags_128_build_the_published_model():
    assert set(MODEL_FLAGS_128) <= set(PUBLISHED_FLAGS) | {"ssl_dim"}
    with torch.device("meta"):
        model = create_model_from_flags(**MODEL_FLAGS_128)
    assert model.channel_mult == (1, 1, 2, 3, 4)
    assert model.attention_resolutions == {4, 8, 16}
    assert model.out_channels == 6 and model.ssl_dim == 2048 and model.model_channels == 256


@pytest.mark.parametrize(
    ("size", "expected"),
    [(64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4)), (256, (1, 1, 2, 2, 4, 4)), (512, (0.5, 1, 1, 2, 2, 4, 4))],
)
def test_default_channel_mult_per_resolution(size, expected):
    assert parse_channel_mult("", size) == expected


def test_channel_mult_parsing_and_errors():
    assert parse_channel_mult("1,2,2", 32) == (1, 2, 2)
    assert parse_channel_mult("0.5,1", 32) == (0.5, 1)
    assert parse_channel_mult((1, 2), 32) == (1, 2)
    with pytest.raises(ValueError, match="no default channel_mult for image_size 32"):
        parse_channel_mult("", 32)
    with pytest.raises(ValueError, match="not a number"):
        parse_channel_mult("1,x", 32)
    with pytest.raises(ValueError, match="positive"):
        parse_channel_mult("1,0", 32)


def test_attention_resolutions_become_downsample_rates():
    assert parse_attention_resolutions("32,16,8", 128) == (4, 8, 16)
    assert parse_attention_resolutions("16,8", 32) == (2, 4)
    assert parse_attention_resolutions("", 64) == ()
    with pytest.raises(ValueError, match="does not divide image_size 128"):
        parse_attention_resolutions("48", 128)


def test_512_default_builds_half_width_first_level():
    with torch.device("meta"):
        model = create_model_from_flags(image_size=512, num_channels=64, attention_resolutions="32")
    assert model.input_blocks[0][0].weight.shape == (32, 3, 3, 3)
    assert model.out[2].weight.shape == (3, 32, 3, 3)


def test_unknown_flag_is_named_with_suggestions():
    with pytest.raises(UnknownFlagError) as err:
        create_model_and_diffusion(num_channel=64, image_size=32, channel_mult="1,2", bogus_flag=1)
    message = str(err.value)
    assert "'num_channel'" in message and "did you mean 'num_channels'" in message
    assert "'bogus_flag'" in message
    assert isinstance(err.value, TypeError)
    with pytest.raises(UnknownFlagError, match="'sssl_dim'"):
        create_model_from_flags(sssl_dim=3)


def test_published_call_site_extras_are_accepted():
    model = create_model_from_flags(
        image_size=32, num_channels=32, channel_mult="1,2", feat_cond=True, G_shared=False, pretrained=False
    )
    assert model.ssl_dim == 2048
    assert (
        create_model_from_flags(image_size=32, num_channels=32, channel_mult="1,2", feat_cond=False).ssl_emb
        is None
    )


def test_public_api_reexports():
    assert rcdm.create_model_and_diffusion is create_model_and_diffusion
    assert rcdm.model_and_diffusion_defaults is model_and_diffusion_defaults
    from rcdm.checkpoint import load_model

    assert rcdm.load_model is load_model


def test_golden_through_create_model_and_diffusion(reference_dir: Path):
    """The factory wires learn_sigma / schedule flags into a diffusion reproducing the published losses."""
    golden = torch.load(reference_dir / "golden_small.pt", weights_only=True)
    model, diffusion = create_model_and_diffusion(**golden["flags"])
    model.load_state_dict(golden["state_dict"])
    model.eval()
    assert diffusion.num_timesteps == golden["flags"]["diffusion_steps"]
    with torch.no_grad():
        out = model(golden["x"], golden["t"], feat=golden["feat"])
        losses = diffusion.training_losses(
            model,
            golden["x_start"],
            golden["t"],
            model_kwargs={"feat": golden["feat"]},
            noise=golden["noise"],
        )
    torch.testing.assert_close(out, golden["model_out"], rtol=1e-4, atol=1e-5)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(losses[key], golden["loss"][key], rtol=1e-4, atol=1e-6, msg=key)
