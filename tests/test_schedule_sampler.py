import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcdm.schedule_sampler import (
    LossSecondMomentSampler,
    UniformSampler,
    create_named_schedule_sampler,
)


class ReferenceSecondMoment:
    """The published guided-diffusion semantics, sequential numpy (shift register per timestep)."""

    def __init__(self, T, H=10, uniform_prob=0.001):
        self.T, self.H, self.u = T, H, uniform_prob
        self.hist = np.zeros([T, H])
        self.counts = np.zeros([T], dtype=int)

    def weights(self):
        if not (self.counts == self.H).all():
            return np.ones([self.T])
        w = np.sqrt(np.mean(self.hist**2, axis=-1))
        w /= w.sum()
        w *= 1 - self.u
        w += self.u / self.T
        return w

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.H:
                self.hist[t, :-1] = self.hist[t, 1:]
                self.hist[t, -1] = loss
            else:
                self.hist[t, self.counts[t]] = loss
                self.counts[t] += 1


def test_uniform_sampler_weights_are_one_and_range():
    s = UniformSampler(7)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample(1000, generator=g)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 6
    assert set(t.tolist()) == set(range(7))
    assert torch.equal(w, torch.ones(1000))


def test_second_moment_matches_published_semantics_with_duplicates_and_wraparound():
    T, H = 5, 3
    ours = LossSecondMomentSampler(T, history_per_term=H, uniform_prob=0.01)
    ref = ReferenceSecondMoment(T, H, 0.01)
    rng = np.random.default_rng(0)
    warmed = []
    for step in range(12):
        n = int(rng.integers(1, 9))
        # heavy duplicates, sometimes more than H of one t in a single batch
        ts = rng.integers(0, T, n) if step % 3 else np.full(n, step % T)
        losses = rng.random(n) * (1 + ts)
        ours.update_with_all_losses(torch.from_numpy(ts), torch.from_numpy(losses).float())
        ref.update(ts, torch.from_numpy(losses).float().double().numpy())
        np.testing.assert_allclose(ours.weights().numpy(), ref.weights(), rtol=1e-12, atol=1e-15)
        warmed.append(bool(ours.warmed_up()))
    assert not warmed[0] and warmed[-1]  # both regimes exercised


def test_second_moment_sample_importance_weights():
    T = 4
    s = LossSecondMomentSampler(T, history_per_term=2, uniform_prob=0.0)
    s.update_with_all_losses(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1, 2, 2, 3, 3, 4, 4]))
    p = np.array([1, 2, 3, 4]) / 10
    np.testing.assert_allclose(s.weights().numpy() / s.weights().numpy().sum(), p, rtol=1e-12)
    t, w = s.sample(4000, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / 4000
    np.testing.assert_allclose(freq, p, atol=0.03)
    # unbiased: E[w(t) f(t)] = mean_t f(t)
    f = np.array([3.0, -1.0, 2.0, 5.0])
    assert abs((w.numpy() * f[t.numpy()]).mean() - f.mean()) < 0.15


def test_state_dict_round_trip_and_padding_entries_ignored():
    s = LossSecondMomentSampler(3, history_per_term=2)
    s.update_with_all_losses(
        torch.tensor([0, 1, 2, 0, 1, 2, 1]),
        torch.tensor([1.0, 2, 3, 4, 5, 6, 99]),
        valid=torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool),
    )
    ref = ReferenceSecondMoment(3, 2)
    ref.update([0, 1, 2, 0, 1, 2], [1.0, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(s.weights().numpy(), ref.weights(), rtol=1e-12)
    s2 = LossSecondMomentSampler(3, history_per_term=2)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.weights(), s.weights())
    with pytest.raises(ValueError, match="history shape"):
        LossSecondMomentSampler(4, history_per_term=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("beta", 10)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        s = LossSecondMomentSampler(4, history_per_term=2, uniform_prob=0.0)
        # uneven local batches, padded to max_batch=3 without host sync
        local = {0: ([0, 1, 2], [1.0, 2.0, 3.0]), 1: ([3, 0], [4.0, 5.0])}[rank]
        s.update_with_local_losses(torch.tensor(local[0]), torch.tensor(local[1]), max_batch=3)
        s.update_with_local_losses(torch.tensor(local[0]), torch.tensor(local[1]) * 2)
        torch.save(s.weights(), f"{out}/w{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_all_gather_keeps_ranks_identical(tmp_path):
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = ReferenceSecondMoment(4, 2, 0.0)
    ref.update([0, 1, 2, 3, 0], [1.0, 2, 3, 4, 5])
    ref.update([0, 1, 2, 3, 0], [2.0, 4, 6, 8, 10])
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
    np.testing.assert_allclose(w0.numpy(), ref.weights(), rtol=1e-12)
