"""The RCDM UNet: published key/shape tables, golden output, attention maths, layouts, checkpointing, fp16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcdm.factory import MODEL_FLAGS_128, create_model_from_flags
from rcdm.unet import AttentionBlock, UNetModel, timestep_embedding

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_heads=2,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
    ssl_dim=8,
)


def read_key_table(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def key_table(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised output layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "golden_small.pt", weights_only=True)


def test_small_keys_and_shapes_match_published(golden, reference_dir):
    model = create_model_from_flags(**golden["flags"])
    assert key_table(model) == read_key_table(reference_dir / "unet_keys_small.tsv")


def test_128px_keys_and_shapes_match_published(reference_dir):
    expected = read_key_table(reference_dir / "unet_keys_published_128.tsv")
    with torch.device("meta"):
        model = create_model_from_flags(**MODEL_FLAGS_128)
    assert key_table(model) == expected
    assert len(expected) == 494
    assert sum(p.numel() for p in model.parameters()) == 422_603_782


@pytest.mark.parametrize("ssl_dim", [256, 128, 8192])
def test_head_checkpoints_differ_only_in_ssl_emb(reference_dir, ssl_dim):
    expected = dict(read_key_table(reference_dir / "unet_keys_published_128.tsv"))
    expected["ssl_emb.weight"] = (1024, ssl_dim)
    with torch.device("meta"):
        model = create_model_from_flags(**{**MODEL_FLAGS_128, "ssl_dim": ssl_dim})
    assert dict(key_table(model)) == expected


def test_golden_model_output(golden):
    model = create_model_from_flags(**golden["flags"])
    model.load_state_dict(golden["state_dict"], strict=True)
    model.eval()
    with torch.inference_mode():
        out = model(golden["x"], golden["t"], feat=golden["feat"])
    ref = golden["model_out"]
    assert out.shape == ref.shape == (3, 6, 32, 32)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs] for ti in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)
    assert torch.all(timestep_embedding(t, 7)[:, -1] == 0)


def reference_attention_block(block: AttentionBlock, x: torch.Tensor, new_order: bool) -> torch.Tensor:
    """The published formulation: conv1d qkv, q and k scaled by ch**-0.25, einsum, float softmax."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(block.norm(x), block.qkv.weight, block.qkv.bias)
    bs, width, length = qkv.shape
    heads = block.num_heads
    ch = width // (3 * heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (z.reshape(bs * heads, ch, length) for z in (q, k, v))
    else:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    h = F.conv1d(a, block.proj_out.weight, block.proj_out.bias)
    return (x + h).reshape(b, c, *spatial)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize(("heads", "head_channels"), [(1, -1), (4, -1), (1, 16)])
def test_sdpa_attention_equals_published_einsum(new_order, heads, head_channels):
    torch.manual_seed(0)
    block = AttentionBlock(64, heads, head_channels, use_new_attention_order=new_order)
    randomise(block, seed=1, std=0.2)
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        ours = block(x)
        ref = reference_attention_block(block, x, new_order)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The two orders really differ (the test would catch a swapped layout).
    other = AttentionBlock(64, heads, head_channels, use_new_attention_order=not new_order)
    other.load_state_dict(block.state_dict())
    if block.num_heads > 1:
        with torch.no_grad():
            assert (other(x) - ours).abs().max() > 1e-3


def tiny_model(**overrides) -> UNetModel:
    torch.manual_seed(0)
    return randomise(create_model_from_flags(**{**TINY, **overrides}), seed=2, std=0.1)


def tiny_inputs(n: int = 2, ssl_dim: int = 8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, torch.tensor([5, 700][:n]), torch.randn(n, ssl_dim, generator=g)


def test_channels_last_matches_default_layout():
    model = tiny_model().eval()
    x, t, feat = tiny_inputs()
    with torch.inference_mode():
        ref = model(x, t, feat=feat)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, feat=feat)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("updown", [True, False])
def test_checkpointing_gives_same_gradients(updown):
    plain = tiny_model(resblock_updown=updown)
    ckpt = tiny_model(resblock_updown=updown, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.input_blocks[1][0].use_checkpoint and not plain.input_blocks[1][0].use_checkpoint
    x, t, feat = tiny_inputs()
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        out = model(x, t, feat=feat)
        (out.square().mean() + out[:, :3].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_feat_none_means_no_representation_term():
    model = tiny_model().eval()
    x, t, feat = tiny_inputs()
    with torch.no_grad():
        with_feat = model(x, t, feat=feat)
        without = model(x, t)
        assert (with_feat - without).abs().max() > 1e-3
        # One representation for a whole batch broadcasts, as the published RCDM sampler relies on.
        torch.testing.assert_close(model(x, t, feat=feat[:1]), model(x, t, feat=feat[:1].expand(2, -1)))
        model.ssl_emb.weight.zero_()
        model.ssl_emb.bias.zero_()
        torch.testing.assert_close(model(x, t, feat=feat), without)


def test_bad_feat_is_a_clear_error():
    model = tiny_model().eval()
    x, t, _ = tiny_inputs()
    with pytest.raises(ValueError, match="ssl_dim=8"):
        model(x, t, feat=torch.randn(2, 5))
    unconditional = tiny_model(feat_cond=False)
    assert unconditional.ssl_emb is None and "ssl_emb.weight" not in unconditional.state_dict()
    with pytest.raises(ValueError, match="without representation conditioning"):
        unconditional(x, t, feat=torch.randn(2, 8))


def test_variants_build_the_published_structure():
    m = tiny_model(learn_sigma=False, resblock_updown=False, use_scale_shift_norm=False)
    sd = m.state_dict()
    assert sd["out.2.weight"].shape[0] == 3
    assert "input_blocks.2.0.op.weight" in sd  # strided-conv Downsample
    assert "output_blocks.1.2.conv.weight" in sd  # Upsample conv
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (32, 128)  # no scale-shift: C, not 2C
    x, t, feat = tiny_inputs()
    with torch.no_grad():
        assert m(x, t, feat=feat).shape == (2, 3, 16, 16)
    heads = tiny_model(num_head_channels=16).input_blocks[3][1]
    assert heads.num_heads == 64 // 16
    upsample_heads = tiny_model(num_heads_upsample=4)
    assert upsample_heads.output_blocks[0][1].num_heads == 4
    assert upsample_heads.input_blocks[3][1].num_heads == 2


def test_class_conditional_needs_labels():
    model = tiny_model(class_cond=True).eval()
    assert model.state_dict()["label_emb.weight"].shape == (1000, 128)
    x, t, feat = tiny_inputs()
    with torch.no_grad():
        a = model(x, t, feat=feat, y=torch.tensor([1, 2]))
        b = model(x, t, feat=feat, y=torch.tensor([3, 2]))
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t, feat=feat)


def test_use_fp16_converts_the_torso_only():
    model = tiny_model(use_fp16=True).eval()
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.input_blocks[3][1].qkv.weight.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    assert model.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
    assert model.time_embed[0].weight.dtype == model.ssl_emb.weight.dtype == model.out[2].weight.dtype
    assert model.out[2].weight.dtype == torch.float32
    ref = tiny_model().eval()
    ref.load_state_dict(model.state_dict())  # identical (fp16-rounded) weights
    x, t, feat = tiny_inputs()
    with torch.no_grad():
        out, expected = model(x, t, feat=feat), ref(x, t, feat=feat)
    assert out.dtype == torch.float32
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < 2e-2, rel
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, feat=feat), expected)


def test_bf16_autocast_stays_close_to_fp32():
    model = tiny_model().eval()
    x, t, feat = tiny_inputs()
    with torch.inference_mode():
        ref = model(x, t, feat=feat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, feat=feat)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert 0 < rel < 3e-2, rel


def test_forward_traces_without_graph_breaks():
    """No host syncs or Python-side data dependence in forward: torch.compile sees one graph."""
    import torch._dynamo as dynamo

    model = tiny_model().eval()
    x, t, feat = tiny_inputs()
    dynamo.reset()
    explanation = dynamo.explain(model)(x, t, feat=feat)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
