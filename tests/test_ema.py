import pytest
import torch
from torch import nn

from rcdm.ema import EMA, rate_tag


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return m


def test_closed_form_after_k_updates_for_several_rates():
    m = _model()
    start = [p.detach().clone() for p in m.parameters()]
    ema = EMA(m, rates=(0.9, 0.5))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(2.0)
    for _ in range(7):
        ema.update(list(m.parameters()))
    for rate, avg in zip((0.9, 0.5), ema.params):
        for a, s in zip(avg, start):
            expected = rate**7 * s + (1 - rate**7) * 2.0
            torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-6)


def test_matches_published_update_rule_step_by_step():
    m = _model()
    ema = EMA(m, rates=(0.9999,))
    ref = [p.detach().clone() for p in m.parameters()]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(list(m.parameters()))
        for r, p in zip(ref, m.parameters()):
            r.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
    for a, r in zip(ema.params[0], ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


def test_export_loads_strictly_and_round_trips_state():
    m = _model()
    ema = EMA(m, rates=(0.99,))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(list(m.parameters()))
    sd = ema.export(m, 0.99)
    assert set(sd) == set(m.state_dict())  # parameters and buffers
    fresh = _model()
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh[0].weight, ema.params[0][0])
    other = EMA(_model(), rates=(0.99,))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.params[0], ema.params[0]))
    with pytest.raises(ValueError, match="rates"):
        EMA(_model(), rates=(0.9,)).load_state_dict(ema.state_dict())


def test_rate_tag_and_validation():
    assert rate_tag(0.9999) == "0.9999"
    assert rate_tag(0.999) == "0.999"
    with pytest.raises(ValueError):
        EMA(_model(), rates=(1.0,))
    with pytest.raises(ValueError):
        EMA(_model(), rates=())
