"""The ADM UNet ("Diffusion Models Beat GANs") conditioned on a self-supervised representation, as in RCDM.

State-dict compatible with the published RCDM code (a fork of openai/guided-diffusion): same module tree, key
names and shapes, same maths. The representation ``feat`` enters through ``ssl_emb = Linear(ssl_dim,
4 * model_channels)``, added to the timestep embedding, which then drives every ResBlock (FiLM scale-shift on
GroupNorm when ``use_scale_shift_norm``). Differences that do not change results: attention runs through
``scaled_dot_product_attention`` in token-major layout (no copies for ``channels_last``), the SiLU of the
shared embedding is computed once per forward instead of once per block, and gradient checkpointing uses
``torch.utils.checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NUM_GROUPS = 32

#: How attention is computed: "sdpa" (fused ``scaled_dot_product_attention``, the default) or "einsum" (the
#: published formulation: explicit weight matrix, softmax in float32), kept for benchmarks and checks.
ATTENTION_BACKENDS = ("sdpa", "einsum")
_attention_backend = "sdpa"


def set_attention_backend(name: str) -> str:
    """Select the attention computation of every UNet (process-wide); returns the previous backend."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    previous, _attention_backend = _attention_backend, name
    return previous


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager running the enclosed forwards with attention backend ``name``."""
    previous = set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (the published fp16 recipe)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The normalisation layer of every block: GroupNorm with 32 groups."""
    if channels % NUM_GROUPS:
        raise ValueError(f"GroupNorm({NUM_GROUPS}) needs a channel count divisible by 32, got {channels}")
    return GroupNorm32(NUM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output layers start as the identity / zero residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (N, dim), float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the shared embedding; optionally resamples (up/down) and changes width.

    ``forward(x, emb_act)`` takes the embedding *after* its SiLU (the UNet computes it once per forward).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        # The SiLU module is kept so that key indices match the published checkpoints (emb_layers.1.*).
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb_act, use_reentrant=False)
        return self._forward(x, emb_act)

    def _forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers[1](emb_act).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions (published parameters, SDPA computation).

    ``use_new_attention_order=False`` reproduces the legacy QKV channel layout (heads, then q/k/v), True the
    newer one (q/k/v, then heads); the weights are the same shapes either way, so the flag cannot be
    inferred from a checkpoint.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        # Token-major (B, T, C): a free view for channels_last inputs, and the layout SDPA wants.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        a = attention_from_qkv(qkv, self.num_heads, self.use_new_attention_order)
        h = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


def attention_from_qkv(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """Softmax attention of a token-major packed projection (B, T, 3*C) -> (B, T, C).

    The published code scales q and k by ch**-0.25 each; the product equals SDPA's default 1/sqrt(ch).
    """
    b, t, width = qkv.shape
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.unflatten(-1, (3, num_heads, ch)).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = qkv.unflatten(-1, (num_heads, 3, ch)).permute(3, 0, 2, 1, 4).unbind(0)
    if _attention_backend == "einsum":
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bhtc,bhsc->bhts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        a = torch.einsum("bhts,bhsc->bhtc", weight, v)
    else:
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, ch)
    return a.transpose(1, 2).reshape(b, t, num_heads * ch)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that passes the (activated) embedding to the ResBlocks among its children."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb_act) if isinstance(layer, ResBlock) else layer(x)
        return x


def _as_int_set(values: Iterable[int]) -> frozenset[int]:
    return frozenset(int(v) for v in values)


class UNetModel(nn.Module):
    """ADM UNet with timestep and representation conditioning (the RCDM model).

    :param attention_resolutions: downsample rates (ds = image_size // resolution) that get attention.
    :param channel_mult: width multiplier per level (floats allowed, e.g. 0.5 at 512px).
    :param ssl_dim: size of the conditioning representation; None builds an unconditional model (no ssl_emb).
    :param num_classes: if set, the model is also class-conditional (``label_emb``, kwarg ``y``).
    :param use_fp16: run the torso (input/middle/output blocks' convolutions) in float16 as the published
        recipe does; norms, embeddings and the output head stay float32 and inputs are cast.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        ssl_dim: int | None = 2048,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D images are supported (dims=2), got dims={dims}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_ds = _as_int_set(attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_ds
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.ssl_dim = ssl_dim
        self.use_fp16 = use_fp16

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Registration order matches the published module tree (time_embed, ssl_emb, label_emb, blocks...).
        self.ssl_emb = nn.Linear(ssl_dim, emb_dim) if ssl_dim else None
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None

        def res(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint,
                **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.convert_to_fp16()

    def _torso_convs(self) -> Iterable[nn.Module]:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, nn.Conv1d | nn.Conv2d):
                    yield m

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16 (the published recipe; norms and embeddings stay fp32)."""
        for m in self._torso_convs():
            m.half()

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        for m in self._torso_convs():
            m.float()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso computes in (float16 after :meth:`convert_to_fp16`)."""
        return self.input_blocks[0][0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        feat: torch.Tensor | None = None,
        *,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model output (eps [+ variance values]) for images ``x`` (N, C, H, W) at ``timesteps``.

        ``feat`` (N, ssl_dim) is the representation to condition on; None leaves the conditioning out (as the
        published code does). ``y`` (N,) are class labels for class-conditional models.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if feat is not None:
            if self.ssl_emb is None:
                raise ValueError("this model was built without representation conditioning (ssl_dim=None)")
            if feat.shape[-1] != self.ssl_dim:
                raise ValueError(
                    f"feat has {feat.shape[-1]} features but the model expects ssl_dim={self.ssl_dim}"
                )
            emb = emb + self.ssl_emb(feat.to(self.ssl_emb.weight.dtype))
        if (y is not None) != (self.label_emb is not None):
            raise ValueError("pass labels y if and only if the model is class-conditional (num_classes set)")
        if y is not None:
            emb = emb + self.label_emb(y)
        emb_act = F.silu(emb)

        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb_act)
            skips.append(h)
        h = self.middle_block(h, emb_act)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        return self.out(h.to(self.out[2].weight.dtype))
