"""Sample-quality and faithfulness metrics: Frechet distance, Inception Score, rank/MRR, precision/recall.

Every function works on numpy arrays or torch tensors (CPU or GPU). Pairwise computations are blocked so
that a 50K x 50K comparison never materialises a full distance matrix, and accumulate in float64 so the
numbers do not depend on the block size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.special
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]

__all__ = [
    "RunningStats",
    "chance_mean_rank",
    "chance_mrr",
    "frechet_distance",
    "frechet_distance_from_samples",
    "frechet_distance_stats",
    "inception_score",
    "precision_recall",
    "rank_mrr",
]


def _as_tensor(x: ArrayLike, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device if device is not None else x.device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


# ------------------------------------------------------------------------------------------------------------
# Frechet distance


def _clip_rounding(evals: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues indistinguishable from float64 rounding (below ``d * eps * max``)."""
    threshold = evals.numel() * torch.finfo(torch.float64).eps * evals.abs().max().clamp_min(1e-300)
    return torch.where(evals > threshold, evals, torch.zeros_like(evals))


def _eigh(m: torch.Tensor, vectors: bool = True):
    """Symmetric eigendecomposition; LAPACK through numpy on CPU (several times faster than torch's there)."""
    m = (m + m.T) / 2
    if m.device.type != "cpu":
        return torch.linalg.eigh(m) if vectors else torch.linalg.eigvalsh(m)
    if vectors:
        evals, evecs = np.linalg.eigh(m.numpy())
        return torch.from_numpy(evals), torch.from_numpy(evecs)
    return torch.from_numpy(np.linalg.eigvalsh(m.numpy()))


def _check_stats(m1, s1, m2, s2) -> None:
    d = m1.numel()
    if m2.numel() != d or s2.shape != (d, d) or (s1 is not None and s1.shape != (d, d)):
        shape1 = None if s1 is None else tuple(s1.shape)
        raise ValueError(
            f"mismatched statistics: mu1 {tuple(m1.shape)}, sigma1 {shape1}, "
            f"mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}"
        )
    for name, t in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if t is not None:
            _check_finite(name, t)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2)`` in float64. With s1 = V L V^T, the
    trace term is that of the symmetric PSD matrix ``B^T s2 B`` (B = V L^1/2 restricted to the non-zero
    eigenvalues), whose eigenvalues are clipped at rounding level: stable also for rank-deficient
    covariances (e.g. 8192-d features from fewer samples), where ``sqrtm(s1 @ s2)`` can return complex or
    NaN values. Runs on the device of ``sigma1`` when given torch tensors.
    """
    device = sigma1.device if isinstance(sigma1, torch.Tensor) else None
    m1, m2 = _as_tensor(mu1, device=device).reshape(-1), _as_tensor(mu2, device=device).reshape(-1)
    s1, s2 = _as_tensor(sigma1, device=device), _as_tensor(sigma2, device=device)
    _check_stats(m1, s1, m2, s2)
    evals, evecs = _eigh(s1)
    evals = _clip_rounding(evals.to(s1.device))
    keep = evals > 0
    b = evecs.to(s1.device)[:, keep] * evals[keep].sqrt()
    inner = b.T @ s2 @ b
    trace_covmean = _clip_rounding(_eigh(inner, vectors=False)).sqrt().sum().to(s1.device)
    diff = m1 - m2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_covmean
    return max(float(value), 0.0)  # a distance: what falls below 0 is rounding of equal statistics


def frechet_distance_from_samples(x1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """:func:`frechet_distance` between the Gaussian fit of the rows of ``x1`` [n, d] and N(mu2, sigma2).

    Exact and cheap when n <= d: with A the centred rows, s1 = A^T A / (n - 1) and the trace term is that of
    the n x n matrix ``A s2 A^T / (n - 1)`` -- no d x d eigendecomposition. (Unbiased covariance, as np.cov.)
    """
    device = x1.device if isinstance(x1, torch.Tensor) else None
    x = _as_tensor(x1, device=device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x1 must be [n >= 2, d], got shape {tuple(x.shape)}")
    m1 = x.mean(0)
    m2, s2 = _as_tensor(mu2, device=x.device).reshape(-1), _as_tensor(sigma2, device=x.device)
    _check_finite("x1", x)
    _check_stats(m1, None, m2, s2)
    a = x - m1
    n = x.shape[0]
    inner = a @ s2 @ a.T / (n - 1)
    trace_covmean = _clip_rounding(_eigh(inner, vectors=False)).sqrt().sum().to(x.device)
    diff = m1 - m2
    value = diff @ diff + (a * a).sum() / (n - 1) + torch.trace(s2) - 2 * trace_covmean
    return float(value)


def frechet_distance_stats(
    stats: RunningStats, mu2: ArrayLike, sigma2: ArrayLike, rows2: ArrayLike | None = None
) -> float:
    """Frechet distance of accumulated statistics to N(mu2, sigma2), by the cheapest exact route.

    Uses the kept rows of ``stats`` (or ``rows2``, the rows behind mu2/sigma2) when there are at most d of
    them (:func:`frechet_distance_from_samples`), else the d x d eigendecomposition.
    """
    rows = stats.rows()
    if rows is not None:
        return frechet_distance_from_samples(rows, mu2, sigma2)
    if rows2 is not None and len(rows2) <= stats.dim:
        return frechet_distance_from_samples(rows2, stats.mean(), stats.cov())
    return frechet_distance(stats.mean(), stats.cov(), mu2, sigma2)


class RunningStats:
    """Streaming mean and covariance of feature batches, accumulated in float64 (bounded memory for any N).

    Data are shifted by the first batch's mean before accumulating outer products, which avoids the
    cancellation of the naive ``E[xx^T] - mu mu^T`` when the mean is large compared with the spread.
    """

    def __init__(
        self, dim: int, device: torch.device | str | None = None, keep_rows: int | None = None
    ) -> None:
        self.dim = dim
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        #: rows are also kept while there are at most this many (default ``dim``: no more memory than the
        #: covariance itself), so low-rank Frechet distances can take the cheap exact route
        self.keep_rows = dim if keep_rows is None else keep_rows
        self._rows: list[torch.Tensor] | None = []
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, x: ArrayLike) -> None:
        """Add a batch ``x`` of shape [n, dim]."""
        device = self.device
        if device is None and isinstance(x, torch.Tensor):
            device = x.device
        x = _as_tensor(x, device=device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a batch of shape [n, {self.dim}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
        if self._rows is not None:
            self._rows.append(x)
            if self.n + x.shape[0] > self.keep_rows:
                self._rows = None
        xc = x - self._shift
        self._sum += xc.sum(0)
        self._outer += xc.T @ xc
        self.n += x.shape[0]

    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no data accumulated")
        return (self._shift + self._sum / self.n).cpu().numpy()

    def rows(self) -> torch.Tensor | None:
        """All rows seen (float64), or None once there are more than ``keep_rows``."""
        if self._rows is None or self.n == 0:
            return None
        return torch.cat(self._rows)

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, like ``np.cov``)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        m = self._sum / self.n
        c = (self._outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return ((c + c.T) / 2).cpu().numpy()


# ------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits [N, C].

    The N rows are cut into ``splits`` consecutive parts (part i = rows ``i*N//splits`` to
    ``(i+1)*N//splits``, as in the original implementation); returns the mean and the (population) standard
    deviation over parts.
    """
    x = _as_tensor(logits)
    if x.ndim != 2:
        raise ValueError(f"logits must be [N, classes], got shape {tuple(x.shape)}")
    _check_finite("logits", x)
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least splits={splits} >= 1 rows, got {n}")
    logp = torch.log_softmax(x, dim=1)
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------------------
# Rank and mean reciprocal rank


def chance_mrr(n: int) -> float:
    """Expected MRR when the true item's rank is uniform on 1..n: ``H_n / n``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n <= 1_000_000:
        return math.fsum(1.0 / k for k in range(1, n + 1)) / n
    return float(scipy.special.digamma(n + 1) + np.euler_gamma) / n


def chance_mean_rank(n: int) -> float:
    """Expected rank when the true item's rank is uniform on 1..n: ``(n + 1) / 2``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return (n + 1) / 2


# Two scores closer than this (relative to their scale) count as a tie: distances are computed in float64 from
# at most float32-precise embeddings, so smaller differences are rounding, not geometry.
_TIE_RTOL = 1e-9


def _scores_setup(sample_emb, cond_emb, metric: str, device):
    s = _as_tensor(sample_emb, device=device)
    c = _as_tensor(cond_emb, device=device)
    if s.ndim != 2 or c.ndim != 2 or s.shape[1] != c.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with equal d, got {tuple(s.shape)} and {tuple(c.shape)}")
    _check_finite("sample_emb", s)
    _check_finite("cond_emb", c)
    if metric == "cosine":
        s = torch.nn.functional.normalize(s, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
        c_sq = None
    elif metric == "l2":
        c_sq = (c * c).sum(1)
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    return s, c, c_sq


def rank_mrr(
    sample_emb: ArrayLike,
    cond_emb: ArrayLike,
    metric: str = "cosine",
    *,
    sample_to_cond: ArrayLike | None = None,
    block_size: int = 4096,
    device: torch.device | str | None = None,
    return_ranks: bool = False,
) -> dict:
    """Rank of each sample's true conditioning among all conditionings, by distance in representation space.

    Row i of ``sample_emb`` was generated from row ``sample_to_cond[i]`` of ``cond_emb`` (default: row i,
    which needs at most as many samples as conditionings; several samples per conditioning are given by the
    mapping). rank = 1 + the number of conditionings strictly closer to the sample than its own (ties do not
    count against it). Returns ``mean_rank``, ``median_rank``, ``mrr`` (mean of 1/rank), ``top1``, ``top5``
    (fractions of rank <= 1 and <= 5), ``n_samples``, ``n_cond``, ``chance_mrr``, ``chance_mean_rank``, and
    ``ranks`` (int64 numpy array) if ``return_ranks``. Computed in float64 over [block_size, block_size]
    tiles on ``device`` (default: the device of ``sample_emb``), so memory stays bounded at 50K x 50K.
    """
    if device is None and isinstance(sample_emb, torch.Tensor):
        device = sample_emb.device
    s, c, c_sq = _scores_setup(sample_emb, cond_emb, metric, device)
    n_s, n_c = s.shape[0], c.shape[0]
    if n_s == 0 or n_c == 0:
        raise ValueError("rank_mrr needs at least one sample and one conditioning")
    if sample_to_cond is None:
        if n_s > n_c:
            raise ValueError(f"{n_s} samples but only {n_c} conditionings: pass sample_to_cond")
        target = torch.arange(n_s, device=s.device)
    else:
        target = torch.as_tensor(np.asarray(sample_to_cond), dtype=torch.long, device=s.device).reshape(-1)
        if target.numel() != n_s:
            raise ValueError(f"sample_to_cond has {target.numel()} entries for {n_s} samples")
        if n_s and (int(target.min()) < 0 or int(target.max()) >= n_c):
            raise ValueError(f"sample_to_cond has indices outside [0, {n_c})")

    # score: larger = closer. cosine: <s, c>; l2: 2<s, c> - |c|^2 (= |s|^2 - |s - c|^2).
    def block_scores(sb: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        dots = sb @ c[c0:c1].T
        return dots if c_sq is None else 2 * dots - c_sq[c0:c1]

    ranks = torch.empty(n_s, dtype=torch.long, device=s.device)
    for r0 in range(0, n_s, block_size):
        sb = s[r0 : r0 + block_size]
        ct = c[target[r0 : r0 + block_size]]
        true = (sb * ct).sum(1)
        if c_sq is None:
            tol = _TIE_RTOL * torch.ones_like(true)
        else:
            true = 2 * true - (ct * ct).sum(1)
            tol = _TIE_RTOL * ((sb * sb).sum(1) + c_sq.max())
        count = torch.zeros(sb.shape[0], dtype=torch.long, device=s.device)
        for c0 in range(0, n_c, block_size):
            count += (block_scores(sb, c0, min(c0 + block_size, n_c)) > (true + tol)[:, None]).sum(1)
        ranks[r0 : r0 + block_size] = count + 1

    rf = ranks.to(torch.float64)
    out = {
        "mean_rank": float(rf.mean()),
        "median_rank": float(np.median(ranks.cpu().numpy())),
        "mrr": float((1.0 / rf).mean()),
        "top1": float((ranks <= 1).to(torch.float64).mean()),
        "top5": float((ranks <= 5).to(torch.float64).mean()),
        "n_samples": n_s,
        "n_cond": n_c,
        "chance_mrr": chance_mrr(n_c),
        "chance_mean_rank": chance_mean_rank(n_c),
    }
    if return_ranks:
        out["ranks"] = ranks.cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al., 2019)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return (a_sq[:, None] + b_sq[None, :] - 2 * (a @ b.T)).clamp_min(0)


def _knn_radii(x: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row (the row itself excluded)."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    x_sq = (x * x).sum(1)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        best = None
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            d = _sq_dists(x[r0:r1], x[c0:c1], x_sq[r0:r1], x_sq[c0:c1])
            if c0 < r1 and r0 < c1:  # the tile holds the diagonal: a point is not its own neighbour
                rows = torch.arange(r0, r1, device=x.device)
                inside = (rows >= c0) & (rows < c1)
                d[inside.nonzero().squeeze(1), rows[inside] - c0] = float("inf")
            cand = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r1] = best[:, k - 1]
    return radii


def _coverage(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block_size: int) -> float:
    """Fraction of query rows inside at least one ball (centre, radius) of the manifold estimate."""
    q_sq, c_sq = (query * query).sum(1), (centres * centres).sum(1)
    inside = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for r0 in range(0, query.shape[0], block_size):
        r1 = min(r0 + block_size, query.shape[0])
        for c0 in range(0, centres.shape[0], block_size):
            c1 = min(c0 + block_size, centres.shape[0])
            d = _sq_dists(query[r0:r1], centres[c0:c1], q_sq[r0:r1], c_sq[c0:c1])
            inside[r0:r1] |= (d <= radii[None, c0:c1]).any(1)
    return float(inside.to(torch.float64).mean())


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    *,
    block_size: int = 4096,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifold estimates.

    precision: fraction of ``fake`` rows inside the real manifold (the union of balls around every real row
    with radius its distance to its k-th nearest real neighbour); recall: the same with the roles swapped.
    Blocked float64 computation on ``device``.
    """
    if device is None and isinstance(real, torch.Tensor):
        device = real.device
    r, f = _as_tensor(real, device=device), _as_tensor(fake, device=device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be [n, d] with equal d, got {tuple(r.shape)} and {tuple(f.shape)}")
    _check_finite("real", r)
    _check_finite("fake", f)
    real_radii = _knn_radii(r, k, block_size)
    fake_radii = _knn_radii(f, k, block_size)
    return {
        "precision": _coverage(f, r, real_radii, block_size),
        "recall": _coverage(r, f, fake_radii, block_size),
    }
