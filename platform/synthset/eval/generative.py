"""Generative metrics in a configurable feature space: FID, KID, precision/recall/density/coverage,
and LoFT's recognizability and diversity.

Every metric takes *features* (N, F) — what a feature extractor made of the images — so the feature
space is the caller's choice: the embedded default is a classifier's penultimate layer
(``SmallCNN.embed`` / ``HFResNet.embed`` of the Teacher), production passes Inception-v3 pool3 or
DINOv2 CLS features loaded from a local path. ``extract_features(feature_fn, images)`` runs any
callable images → features in batches. Values are comparable only within one feature space: an FID
in Teacher features is not an Inception FID.

Implemented here in numpy/scipy/torch rather than taken from torchmetrics/torch-fidelity: those tie
FID/KID to their own Inception weights (a download) or to an ``nn.Module`` feature extractor fed
whole image tensors, while the platform streams features from shards and needs them for several
metrics at once; each formula below is a few lines and is tested against closed forms.

* FID (Heusel et al. 2017, Eq. 6): ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}).
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs", Eq. 3 unbiased MMD² with the cubic
  polynomial kernel k(x, y) = (xᵀy / F + 1)³), averaged over random subsets.
* PRDC (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models", Eqs.
  1–4 with k-NN balls B(x, NND_k(x))).
* Recognizability and diversity (LoFT §4.3, after Fan et al. 2023): per class, the F1 score of a
  real-data classifier on generated images, and the standard deviation of the generated images'
  features.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def extract_features(feature_fn: Callable, images, batch_size: int = 512) -> np.ndarray:
    """Run ``feature_fn`` (e.g. ``model.embed``) over ``images`` in batches → float32 (N, F) numpy.

    ``images``: anything sliceable (numpy or torch, the layout ``feature_fn`` expects); torch and
    numpy outputs are both accepted; runs under ``torch.no_grad``.
    """
    from synthset.eval.replication import batched_features

    return batched_features(feature_fn, images, batch_size)


def _features(x, name: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be (N, F), got shape {x.shape}")
    if len(x) < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} feature rows, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features must be finite")
    return x


class FeatureStats:
    """Streaming mean and covariance of feature batches (float64 sums), for FID over 1M images.

    ``s = FeatureStats(); for f in batches: s.update(f)``; then ``s.mean``, ``s.cov`` (unbiased,
    divisor N − 1, as ``np.cov`` and the reference FID code).
    """

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def update(self, features) -> None:
        f = _features(features, "features", min_rows=0)
        if self.sum is None:
            self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        elif f.shape[1] != len(self.sum):
            raise ValueError(f"features: {f.shape[1]} dims, earlier batches had {len(self.sum)}")
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("FeatureStats: need at least 2 feature rows")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        mu = self.mean
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, Eq. 6).

    Tr (Σ1 Σ2)^{1/2} is computed as Σ √λ over the eigenvalues λ of the symmetric PSD matrix
    Σ1^{1/2} Σ2 Σ1^{1/2}, which has the same eigenvalues as Σ1 Σ2: no complex ``sqrtm``, no
    ill-conditioning when Σ1 is singular (fewer samples than dimensions); tiny negative
    eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"mu/sigma: expected ({d},) means and ({d}, {d}) covariances, got "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def fid(real_features, fake_features) -> float:
    """FID between two feature sets (N, F) and (M, F): ``frechet_distance`` of their means/covariances."""
    r, g = _features(real_features, "real_features"), _features(fake_features, "fake_features")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"fake_features: {g.shape[1]} dims, real_features: {r.shape[1]}")
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False).reshape(r.shape[1], -1),
                            g.mean(0), np.cov(g, rowvar=False).reshape(g.shape[1], -1))


def per_class_fid(real_features, real_labels, fake_features, fake_labels, num_classes: int) -> dict[int, float]:
    """FID within each class (LoFT's "alignment", App.); classes with < 2 images on a side are left out."""
    r, g = _features(real_features, "real_features"), _features(fake_features, "fake_features")
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    if real_labels.shape != (len(r),) or fake_labels.shape != (len(g),):
        raise ValueError("real_labels/fake_labels: one label per feature row")
    return {c: fid(r[real_labels == c], g[fake_labels == c]) for c in range(num_classes)
            if (real_labels == c).sum() >= 2 and (fake_labels == c).sum() >= 2}


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> float:
    """Unbiased MMD² with k(a, b) = (γ aᵀb + c)^d (Bińkowski et al. 2018, Eq. 3); γ defaults to 1/F.

    MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_{i,j} k(x_i, y_j)/(mn).
    """
    x, y = _features(x, "x"), _features(y, "y")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k = lambda a, b: (gamma * (a @ b.T) + coef0) ** degree
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real_features, fake_features, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of ``polynomial_mmd2`` over random subsets.

    Each of ``num_subsets`` draws ``min(subset_size, N, M)`` rows without replacement from each set
    (seeded), as in the reference implementation; unbiased, so about 0 (possibly negative) when
    both sets come from one distribution.
    """
    r, g = _features(real_features, "real_features"), _features(fake_features, "fake_features")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"fake_features: {g.shape[1]} dims, real_features: {r.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"num_subsets/subset_size: need >= 1 and >= 2 (got {num_subsets}, {subset_size})")
    size = min(subset_size, len(r), len(g))
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2(r[rng.choice(len(r), size, replace=False)], g[rng.choice(len(g), size, replace=False)],
                            degree=degree, coef0=coef0) for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def _pairwise(a, b, chunk: int):
    """Yield (start, end, d, slack), a's rows in chunks: Euclidean distances d (end − start, len(b))
    and, per row, a bound ``slack`` (end − start, 1) on the error of d².

    ``torch.cdist`` takes ‖x‖² + ‖y‖² − 2xᵀy, whose rounding error is below (F + 2)·2⁻⁵²·2(‖x‖² + ‖y‖²)
    — small, but enough to split a tie: exact copies come out ~1e-7 apart, not 0, and two equal
    distances differ. ``slack`` = 1e-9 (‖x‖² + max ‖y‖²) covers it for F up to ~10⁶; ``_recompute``
    makes the entries within it of a threshold exact.
    """
    import torch

    a, b = np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64)
    bt, b_sq_max = torch.from_numpy(b), np.einsum("ij,ij->i", b, b).max()
    for s in range(0, len(a), chunk):
        e = min(len(a), s + chunk)
        d = torch.cdist(torch.from_numpy(a[s:e]), bt).numpy()
        yield s, e, d, 1e-9 * (np.einsum("ij,ij->i", a[s:e], a[s:e])[:, None] + b_sq_max)


def _recompute(d, a_rows, b, where) -> None:
    """Overwrite ``d[where]`` with ‖x − y‖ taken directly, so equal pairs of rows get bit-equal
    distances (0 for copies); in batches of at most ``d.size`` numbers."""
    i, j = np.nonzero(where)
    step = max(1, d.size // b.shape[1])
    for t in range(0, len(i), step):
        ii, jj = i[t:t + step], j[t:t + step]
        d[ii, jj] = np.linalg.norm(a_rows[ii] - b[jj], axis=1)


def knn_radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest *other* row (NND_k of Naeem et al. 2020).

    As in the reference ``prdc`` package: the (k+1)-th smallest of the row's distances to all of
    ``x``, itself included at 0; a duplicate row is a neighbour at distance 0 like any other, so a
    row with ≥ k copies gets radius 0. Exact up to the direct ‖x − y‖ (see ``_pairwise``).
    """
    if not 1 <= k < len(x):
        raise ValueError(f"k: must lie in [1, {len(x) - 1}] for {len(x)} points (got {k})")
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty(len(x))
    for s, e, d, slack in _pairwise(x, x, chunk):
        # The exact k-th value v has |v² − kth²| <= slack (an order statistic moves no more than its
        # inputs), so every entry that may equal it lies within 2·slack of kth²: make those exact,
        # push the rest surely below / above v out of the way, and take the k-th again.
        kth_sq = np.partition(d, k, axis=1)[:, k:k + 1] ** 2
        d_sq = d * d
        _recompute(d, x[s:e], x, np.abs(d_sq - kth_sq) <= 2 * slack)
        d[d_sq < kth_sq - 2 * slack] = -1.0
        d[d_sq > kth_sq + 2 * slack] = np.inf
        out[s:e] = np.partition(d, k, axis=1)[:, k]
    return out


def prdc(real_features, fake_features, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020, Eqs. 1–4), k-NN balls in feature space.

    With B(x, r) = {y: ‖y − x‖ < r} the *open* ball and NND_k the k-NN radius within the same set
    (``knn_radii``):
      precision = (1/M) Σ_j 1[∃i: Y_j ∈ B(X_i, NND_k(X_i))]   (Kynkäänniemi et al. 2019)
      recall    = (1/N) Σ_i 1[∃j: X_i ∈ B(Y_j, NND_k(Y_j))]
      density   = (1/(kM)) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))]
      coverage  = (1/N) Σ_i 1[∃j: Y_j ∈ B(X_i, NND_k(X_i))]
    for real X (N rows) and fake Y (M rows). The strict ``<`` is the reference ``prdc`` package's
    (Naeem et al.'s code, 0.2): it matters on ties — with repeated rows a radius can be 0, and a ball
    of radius 0 holds nothing, not its copies. O(N·M) distances, computed in row chunks; subsample
    (Naeem et al. use 10k) for large sets.
    """
    r, g = _features(real_features, "real_features"), _features(fake_features, "fake_features")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"fake_features: {g.shape[1]} dims, real_features: {r.shape[1]}")
    real_r, fake_r = knn_radii(r, k, chunk), knn_radii(g, k, chunk)
    in_real_balls = np.zeros(len(g), dtype=np.int64)  # per fake: how many real balls contain it
    covered = np.zeros(len(r), dtype=bool)  # per real: does its ball contain a fake
    recalled = np.zeros(len(r), dtype=bool)  # per real: is it inside some fake ball
    for s, e, d, slack in _pairwise(r, g, chunk):  # d: (real block, M)
        d_sq = d * d  # decide the entries within slack of a radius on exact distances
        _recompute(d, r[s:e], g, (np.abs(d_sq - real_r[s:e, None] ** 2) <= slack)
                   | (np.abs(d_sq - fake_r[None, :] ** 2) <= slack))
        inside = d < real_r[s:e, None]
        in_real_balls += inside.sum(0)
        covered[s:e] = inside.any(1)
        recalled[s:e] = (d < fake_r[None, :]).any(1)
    return {"precision": float((in_real_balls > 0).mean()), "recall": float(recalled.mean()),
            "density": float(in_real_balls.sum() / (k * len(g))), "coverage": float(covered.mean())}


def recognizability(predicted, intended, num_classes: int) -> dict:
    """LoFT's recognizability: per-class F1 of a real-data classifier's predictions on generated images.

    ``predicted``: the classifier's class per generated image (or its probabilities (M, C), argmaxed);
    ``intended``: the class each image was generated for. F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c);
    a class with no intended and no predicted images gets NaN and is left out of ``mean_f1``.
    """
    predicted, intended = np.asarray(predicted), np.asarray(intended)
    if predicted.ndim == 2:
        predicted = predicted.argmax(1)
    if predicted.shape != intended.shape or predicted.ndim != 1:
        raise ValueError(f"predicted/intended: need one class per image (got {predicted.shape} and {intended.shape})")
    for name, a in (("predicted", predicted), ("intended", intended)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name}: classes must lie in [0, {num_classes})")
    f1 = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (intended == c))
        denom = 2 * tp + np.sum((predicted == c) & (intended != c)) + np.sum((predicted != c) & (intended == c))
        f1.append(float(2 * tp / denom) if denom else float("nan"))
    return {"per_class_f1": f1, "mean_f1": float(np.nanmean(f1)) if not np.all(np.isnan(f1)) else float("nan"),
            "accuracy": float((predicted == intended).mean()) if len(intended) else float("nan")}


def diversity(features, labels, num_classes: int) -> dict:
    """LoFT's diversity: per class, the standard deviation of the generated images' features.

    Per class c: the standard deviation (divisor n − 1) of each feature dimension over the class's
    images, averaged over dimensions — a scalar spread in feature units. Classes with < 2 images
    get NaN and are left out of ``mean``.
    """
    f = _features(features, "features", min_rows=0)
    labels = np.asarray(labels)
    if labels.shape != (len(f),):
        raise ValueError(f"labels: need one label per feature row (got {labels.shape} for {len(f)} rows)")
    per = [float(f[labels == c].std(axis=0, ddof=1).mean()) if (labels == c).sum() >= 2 else float("nan")
           for c in range(num_classes)]
    return {"per_class": per, "mean": float(np.nanmean(per)) if not np.all(np.isnan(per)) else float("nan")}


def generative_report(real_features, fake_features, fake_labels=None, fake_predicted=None, num_classes: int | None = None,
                      kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 5, seed: int = 0) -> dict:
    """All metrics at once: FID, KID (mean, std), PRDC; with labels also recognizability and diversity."""
    out = {"fid": fid(real_features, fake_features)}
    out["kid_mean"], out["kid_std"] = kid(real_features, fake_features, kid_subsets, kid_subset_size, seed)
    out.update(prdc(real_features, fake_features, k))
    if fake_labels is not None:
        if num_classes is None:
            raise ValueError("num_classes: required with fake_labels")
        out["diversity"] = diversity(fake_features, fake_labels, num_classes)["mean"]
        if fake_predicted is not None:
            out["recognizability"] = recognizability(fake_predicted, fake_labels, num_classes)["mean_f1"]
    return out
