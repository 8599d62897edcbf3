"""Exponential moving averages of model parameters at one or several rates.

``ema <- rate * ema + (1 - rate) * param`` after every optimizer step, as guided-diffusion's
``update_ema`` does, with one fused ``torch._foreach_lerp_`` per rate instead of a Python loop over
tensors. Sampling uses the EMA weights; they are exported as plain model state dicts named like the
published files (``ema_0.9999_NNNNNN.pt``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rate_tag(rate: float) -> str:
    """The rate as it appears in published file names: ``0.9999`` -> ``"0.9999"``."""
    return repr(float(rate))


class EMA:
    """EMA copies (fp32, on the parameters' device) of a model's parameters, one per rate."""

    def __init__(self, model: nn.Module, rates: Sequence[float] = (0.9999,)) -> None:
        self.rates = [float(r) for r in rates]
        if not self.rates:
            raise ValueError("at least one EMA rate is needed")
        for r in self.rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rate must be in [0, 1), got {r}")
        if len(set(self.rates)) != len(self.rates):
            raise ValueError(f"duplicate EMA rates: {self.rates}")
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [[p.detach().float().clone() for _, p in named] for _ in self.rates]

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        """Move every average toward ``params`` (the model's parameters, in ``named_parameters`` order)."""
        params = [p.detach() for p in params]
        if len(params) != len(self.names):
            raise ValueError(f"EMA tracks {len(self.names)} parameters, got {len(params)}")
        if params and params[0].dtype != torch.float32:
            params = [p.float() for p in params]
        for rate, avg in zip(self.rates, self.params):
            torch._foreach_lerp_(avg, params, 1.0 - rate)

    def state_dict(self) -> dict:
        """Resumable state: ``{"rates": [...], "names": [...], "params": [[tensor, ...] per rate]}``."""
        return {
            "rates": list(self.rates),
            "names": list(self.names),
            "params": [[p.detach().cpu().clone() for p in avg] for avg in self.params],
        }

    def load_state_dict(self, state: dict) -> None:
        if [float(r) for r in state["rates"]] != self.rates:
            raise ValueError(f"checkpoint EMA rates {state['rates']} differ from the configured {self.rates}")
        if list(state["names"]) != self.names:
            missing = sorted(set(self.names) - set(state["names"]))
            extra = sorted(set(state["names"]) - set(self.names))
            raise ValueError(
                f"checkpoint EMA parameters differ: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for avg, saved in zip(self.params, state["params"]):
            for dst, src in zip(avg, saved):
                if dst.shape != src.shape:
                    raise ValueError(f"EMA tensor shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
                dst.copy_(src)

    def export(self, model: nn.Module, rate: float) -> dict[str, torch.Tensor]:
        """A plain state dict of ``model`` with this rate's averages in place of its parameters (on CPU).

        Buffers (if any) come from the model; the result loads with ``model.load_state_dict(sd)`` (strict).
        """
        idx = self.rates.index(float(rate))
        averaged = dict(zip(self.names, self.params[idx]))
        out = {}
        for key, value in model.state_dict().items():
            src = averaged.get(key, value)
            out[key] = src.detach().to("cpu", value.dtype).clone()
        return out
