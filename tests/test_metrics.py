import math

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from rcdm.metrics import (
    RunningStats,
    chance_mean_rank,
    chance_mrr,
    frechet_distance,
    frechet_distance_from_samples,
    frechet_distance_stats,
    inception_score,
    precision_recall,
    rank_mrr,
)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


# --- Frechet distance


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_frechet_matches_pytorch_fid_on_well_conditioned_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = _stats(a)
    mu2, s2 = _stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours > 1.0


def test_frechet_is_zero_for_identical_sets_even_rank_deficient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 64))  # 20 samples in 64-d: covariance of rank 19
    mu, s = _stats(x)
    assert np.linalg.matrix_rank(s) < 64
    assert 0.0 <= frechet_distance(mu, s, mu, s) < 1e-9


def test_frechet_closed_form_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])  # one zero variance: rank deficient
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert expected == pytest.approx(5.0 + 4.0 + 1.0 + 2.0)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_accepts_torch_and_rejects_bad_input():
    rng = np.random.default_rng(2)
    mu1, s1 = _stats(rng.normal(size=(50, 4)))
    mu2, s2 = _stats(rng.normal(size=(50, 4)) + 1)
    as_t = [torch.from_numpy(v).float() for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*as_t) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-5)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])
    s_nan = s2.copy()
    s_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu1, s1, mu2, s_nan)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_frechet_from_samples_equals_full_computation_low_rank_and_full_rank():
    rng = np.random.default_rng(9)
    for n1, n2 in ((12, 30), (80, 200)):  # 12 rows in 40-d: rank-deficient; 80 rows: full rank
        x1 = rng.normal(size=(n1, 40)) @ rng.normal(size=(40, 40)) * 0.3 + 0.2
        x2 = rng.normal(size=(n2, 40))
        mu1, s1 = _stats(x1)
        mu2, s2 = _stats(x2)
        full = frechet_distance(mu1, s1, mu2, s2)
        assert frechet_distance_from_samples(x1, mu2, s2) == pytest.approx(full, rel=1e-10)
        assert frechet_distance_from_samples(torch.from_numpy(x1), mu2, s2) == pytest.approx(full, rel=1e-10)
        rs = RunningStats(40)
        for lo in range(0, n1, 7):
            rs.update(x1[lo : lo + 7])
        assert (rs.rows() is None) == (n1 > 40)
        assert frechet_distance_stats(rs, mu2, s2) == pytest.approx(full, rel=1e-9)
        assert frechet_distance_stats(rs, mu2, s2, rows2=x2) == pytest.approx(full, rel=1e-9)
        if n1 > 40:
            assert full == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-8)
    # closed form: the fit of two points +-1 on axis 0 is N(0, diag(2, 0, ...)); vs N(0, I): (sqrt2 - 1)^2 + 2
    x = np.zeros((2, 3))
    x[:, 0] = [1.0, -1.0]
    expected = (np.sqrt(2) - 1) ** 2 + 2
    assert frechet_distance_from_samples(x, np.zeros(3), np.eye(3)) == pytest.approx(expected, rel=1e-12)


def test_running_stats_equal_numpy_and_are_batch_independent():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(257, 8)) * 0.01 + 1000.0  # large mean, small spread: the naive formula cancels
    mu, cov = _stats(x)
    for batches in ([257], [1, 100, 156], [64] * 4 + [1]):
        rs = RunningStats(8)
        start = 0
        for b in batches:
            rs.update(torch.from_numpy(x[start : start + b]))
            start += b
        assert rs.n == 257
        np.testing.assert_allclose(rs.mean(), mu, rtol=1e-12)
        np.testing.assert_allclose(rs.cov(), cov, rtol=1e-7, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        rs.update(np.zeros((3, 7)))


# --- Inception Score


def test_inception_score_hand_computed():
    # Two split halves. Half A: two confident, different classes -> p(y) uniform over 2 of 3 classes: IS = 2.
    # Half B: two identical predictions -> KL = 0: IS = 1.
    big = 1e4
    logits = np.array([[big, 0, 0], [0, big, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(1.5, rel=1e-9)
    assert std == pytest.approx(0.5, rel=1e-9)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(3):
        part = p[i * 10 : (i + 1) * 10]
        py = part.mean(0)
        scores.append(math.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:2], splits=3)


# --- rank / MRR


def test_rank_mrr_hand_made_with_ties():
    cond = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])  # rows 0 and 3 identical: a tie
    samples = np.array(
        [
            [2.0, 0.0],  # true 0: tie with 3 does not count -> rank 1
            [1.0, 0.1],  # true 1: 0 and 3 are closer (cosine) -> rank 3
            [-1.0, -0.2],  # true 2: closest -> rank 1
            [0.0, 1.0],  # true 3: 1 is closer; 0 ties with 3 -> rank 2
        ]
    )
    out = rank_mrr(samples, cond, "cosine", block_size=3, return_ranks=True)
    np.testing.assert_array_equal(out["ranks"], [1, 3, 1, 2])
    assert out["mean_rank"] == pytest.approx(7 / 4)
    assert out["median_rank"] == pytest.approx(1.5)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 2) / 4)
    assert out["top1"] == pytest.approx(0.5)
    assert out["top5"] == pytest.approx(1.0)
    assert out["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_rank_mrr_l2_differs_from_cosine_and_counts_strictly():
    cond = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    samples = np.array([[2.9, 0.0], [2.0, 0.0]])  # sample 1 is at equal L2 distance to cond 0 and 1
    l2 = rank_mrr(samples, cond, "l2", return_ranks=True)
    np.testing.assert_array_equal(l2["ranks"], [2, 1])  # 2.9 is nearer cond 1 than cond 0; tie -> rank 1
    cos = rank_mrr(samples, cond, "cosine", return_ranks=True)
    np.testing.assert_array_equal(cos["ranks"], [1, 1])  # conds 0 and 1 share a direction
    with pytest.raises(ValueError, match="metric"):
        rank_mrr(samples, cond, "dot")


def test_rank_mrr_blocked_equals_bruteforce_and_mapping():
    rng = np.random.default_rng(5)
    cond = rng.normal(size=(37, 6))
    mapping = np.repeat(np.arange(37), 3)[:100]
    samples = cond[mapping] + rng.normal(size=(100, 6)) * 0.8
    for metric in ("cosine", "l2"):
        if metric == "cosine":
            sn = samples / np.linalg.norm(samples, axis=1, keepdims=True)
            cn = cond / np.linalg.norm(cond, axis=1, keepdims=True)
            d = -(sn @ cn.T)
        else:
            d = ((samples[:, None] - cond[None]) ** 2).sum(-1)
        true = d[np.arange(100), mapping]
        expected = 1 + (d < true[:, None] - 1e-9).sum(1)
        for bs in (1, 7, 4096):
            out = rank_mrr(
                torch.from_numpy(samples).float(),
                cond,
                metric,
                sample_to_cond=mapping,
                block_size=bs,
                return_ranks=True,
            )
            np.testing.assert_array_equal(out["ranks"], expected)
        assert out["mrr"] == pytest.approx(np.mean(1 / expected))
        assert out["median_rank"] == pytest.approx(np.median(expected))
    with pytest.raises(ValueError, match="sample_to_cond"):
        rank_mrr(samples, cond)
    with pytest.raises(ValueError, match="outside"):
        rank_mrr(samples[:2], cond, sample_to_cond=[0, 37])


def test_rank_mrr_perfect_and_nan():
    x = np.eye(5)
    out = rank_mrr(x, x)
    assert out["mrr"] == 1.0 and out["mean_rank"] == 1.0 and out["top1"] == 1.0
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="sample_emb contains NaN"):
        rank_mrr(bad, x)


def test_chance_levels_exact():
    assert chance_mrr(1) == 1.0
    assert chance_mrr(4) == pytest.approx(25 / 48)
    h = math.fsum(1 / k for k in range(1, 2_000_001))
    assert chance_mrr(2_000_000) == pytest.approx(h / 2_000_000, rel=1e-12)
    assert chance_mean_rank(50_000) == 25_000.5
    # uniform random embeddings reach the chance level on average
    rng = np.random.default_rng(6)
    mrrs = [rank_mrr(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))["mrr"] for _ in range(20)]
    assert np.mean(mrrs) == pytest.approx(chance_mrr(200), rel=0.2)


# --- precision / recall


def _pr_bruteforce(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, 1)[:, k - 1]

    d_fr = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))
    precision = np.mean((d_fr <= radii(real)[None]).any(1))
    recall = np.mean((radii(fake)[None] >= d_fr.T).any(1))
    return precision, recall


def test_precision_recall_equals_bruteforce_for_any_block_size():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(45, 3)) * 0.5 + 0.7
    p, r = _pr_bruteforce(real, fake, 3)
    assert 0 < p < 1 and 0 < r < 1
    for bs in (4, 16, 1000):
        out = precision_recall(real, fake, k=3, block_size=bs)
        assert out["precision"] == pytest.approx(p)
        assert out["recall"] == pytest.approx(r)


def test_precision_recall_identical_sets_and_disjoint():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(30, 4))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(x[:3], x)
