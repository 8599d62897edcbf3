"""Timestep samplers for diffusion training: uniform, and guided-diffusion's loss-aware second-moment one.

Both importance-sample ``t`` from weights ``w`` and return per-example loss weights ``1 / (T * p[t])``,
so the objective's expectation is unchanged. ``LossSecondMomentSampler`` keeps the last
``history_per_term`` losses of every timestep; once every timestep has a full history,
``w_t = sqrt(mean(history_t ** 2))``, normalised and mixed with ``uniform_prob`` of the uniform
distribution (the published semantics). Unlike the published numpy version, the whole state lives on the
training device and updates are vectorised, so neither sampling nor updating synchronises with the host.
The history is a ring buffer per timestep: its weights depend only on the set of the last H losses, which
is exactly what the published shift register keeps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ScheduleSampler:
    """A distribution over the ``num_timesteps`` diffusion steps."""

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu") -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self.device = torch.device(device)

    def weights(self) -> torch.Tensor:
        """Unnormalised, positive float64 weights, one per timestep (on ``self.device``)."""
        return torch.ones(self.num_timesteps, dtype=torch.float64, device=self.device)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance-sample timesteps: ``(t [B] int64, weights [B] float32)``, both on ``device``."""
        w = self.weights()
        p = w / w.sum()
        idx = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        loss_w = (1.0 / (self.num_timesteps * p[idx])).float()
        dev = self.device if device is None else torch.device(device)
        return idx.to(dev), loss_w.to(dev)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UniformSampler(ScheduleSampler):
    """Uniform timesteps; all loss weights are 1."""

    def sample(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device if device is None else torch.device(device)
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=self.device, generator=generator)
        return t.to(dev), torch.ones(batch_size, dtype=torch.float32, device=dev)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses; every rank keeps an identical copy of the state."""

    def update_with_local_losses(
        self, local_ts: torch.Tensor, local_losses: torch.Tensor, max_batch: int | None = None, group=None
    ) -> None:
        """Gather ``(t, loss)`` of every rank (rank order, like the published code) and update all copies.

        ``max_batch`` is an upper bound on any rank's batch: with it the gather needs no host synchronisation.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            self.update_with_all_losses(local_ts, local_losses)
            return
        world = dist.get_world_size(group)
        dev = local_losses.device
        n = local_ts.shape[0]
        size = torch.tensor([n], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        if max_batch is None:
            max_batch = int(torch.cat(sizes).max())
        if n > max_batch:
            raise ValueError(f"local batch {n} exceeds max_batch {max_batch}")
        pad_t = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        pad_l = torch.zeros(max_batch, dtype=local_losses.dtype, device=dev)
        pad_t[:n] = local_ts.to(dev)
        pad_l[:n] = local_losses
        all_t = [torch.empty_like(pad_t) for _ in range(world)]
        all_l = [torch.empty_like(pad_l) for _ in range(world)]
        dist.all_gather(all_t, pad_t, group=group)
        dist.all_gather(all_l, pad_l, group=group)
        valid = torch.arange(max_batch, device=dev)[None, :] < torch.cat(sizes)[:, None]
        self.update_with_all_losses(
            torch.stack(all_t).flatten(), torch.stack(all_l).flatten(), valid.flatten()
        )

    def update_with_all_losses(
        self, ts: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        raise NotImplementedError


class LossSecondMomentSampler(LossAwareSampler):
    """Sample t proportionally to the RMS of its recent losses (guided-diffusion's ``loss-second-moment``)."""

    def __init__(
        self,
        num_timesteps: int,
        device: torch.device | str = "cpu",
        history_per_term: int = 10,
        uniform_prob: float = 0.001,
    ) -> None:
        super().__init__(num_timesteps, device)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        # One extra row collects the padding entries of uneven gathers; it never enters the weights.
        self._history = torch.zeros(
            num_timesteps + 1, history_per_term, dtype=torch.float64, device=self.device
        )
        self._seen = torch.zeros(num_timesteps + 1, dtype=torch.int64, device=self.device)

    def warmed_up(self) -> torch.Tensor:
        """Device bool: every timestep has a full history."""
        return (self._seen[: self.num_timesteps] >= self.history_per_term).all()

    def weights(self) -> torch.Tensor:
        hist = self._history[: self.num_timesteps]
        w = hist.square().mean(dim=-1).sqrt()
        w = w / w.sum()
        w = w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(self.warmed_up(), w, torch.ones_like(w))

    @torch.no_grad()
    def update_with_all_losses(
        self, ts: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Append each (t, loss) in order to t's history, dropping the oldest once it holds H losses."""
        T, H = self.num_timesteps, self.history_per_term
        ts = ts.to(self.device, torch.int64).flatten()
        losses = losses.to(self.device, torch.float64).flatten()
        if valid is not None:
            ts = torch.where(valid.to(self.device).flatten(), ts, torch.full_like(ts, T))
        n = ts.shape[0]
        if n == 0:
            return
        # Occurrence number of each entry among the entries of the same t, in arrival order.
        order = torch.argsort(ts, stable=True)
        sorted_t = ts[order]
        ar = torch.arange(n, device=self.device)
        is_start = torch.ones(n, dtype=torch.bool, device=self.device)
        is_start[1:] = sorted_t[1:] != sorted_t[:-1]
        group_start = torch.cummax(torch.where(is_start, ar, torch.zeros_like(ar)), dim=0).values
        occurrence = torch.empty_like(ar)
        occurrence[order] = ar - group_start
        counts = torch.bincount(ts, minlength=T + 1)
        # Only the last H entries of a timestep in this batch survive; the others go to the padding row, so
        # the remaining writes hit distinct ring slots and their order does not matter.
        keep = occurrence >= counts[ts] - H
        rows = torch.where(keep, ts, torch.full_like(ts, T))
        slots = (self._seen[ts] + occurrence) % H
        self._history.index_put_((rows, slots), losses)
        self._seen += counts
        self._history[T].zero_()
        self._seen[T] = 0

    def state_dict(self) -> dict:
        return {"history": self._history.cpu().clone(), "seen": self._seen.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["history"].shape) != tuple(self._history.shape):
            raise ValueError(
                f"sampler history shape {tuple(state['history'].shape)} != {tuple(self._history.shape)} "
                "(another number of diffusion steps or history length)"
            )
        self._history.copy_(state["history"])
        self._seen.copy_(state["seen"])


def create_named_schedule_sampler(
    name: str, num_timesteps: int, device: torch.device | str = "cpu"
) -> ScheduleSampler:
    """``"uniform"`` or ``"loss-second-moment"`` (guided-diffusion's names)."""
    if name == "uniform":
        return UniformSampler(num_timesteps, device)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps, device)
    raise ValueError(f"unknown schedule sampler {name!r}; choose 'uniform' or 'loss-second-moment'")
