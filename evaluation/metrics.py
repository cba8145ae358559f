"""Distribution metrics on feature vectors: Frechet distance, KID, Inception Score, k-NN manifolds.

Every function takes (N, D) feature tensors and works in float64 so that the covariance
algebra of the Frechet distance does not lose the small differences it is meant to measure.
"""
import math

import torch

CHUNK = 2048            # rows per block of a distance matrix: bounds memory at ~CHUNK * N doubles


#################################################################################
#                              Frechet distance                                 #
#################################################################################

def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (the FID convention, numpy.cov with ddof=1)."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    return mu, cov


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix; round-off negatives are clamped to zero."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_stats(mu1: torch.Tensor, cov1: torch.Tensor,
                           mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2).

    Tr((C1 C2)^1/2) equals the sum of sqrt-eigenvalues of the symmetric PSD matrix
    C1^1/2 C2 C1^1/2, so two eigh calls replace scipy.linalg.sqrtm and stay real-valued.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean
    return float(value.clamp(min=0))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance_stats(*mean_cov(x), *mean_cov(y))


#################################################################################
#                         Kernel Inception Distance                             #
#################################################################################

def kernel_distance(x: torch.Tensor, y: torch.Tensor, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, averaged over random subsets.

    Unlike FD it is unbiased in the sample size, so small per-user sets can be compared
    with each other. Returns (mean, std) or None when either set has fewer than 2 samples.
    """
    x, y = x.double(), y.double()
    m = min(x.shape[0], y.shape[0], max_subset_size)
    if m < 2:
        return None
    dim = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    # One subset is the whole data when both sets fit: repeating it would only repeat the number.
    if x.shape[0] == y.shape[0] == m:
        num_subsets = 1
    values = []
    for _ in range(num_subsets):
        a = x[torch.randperm(x.shape[0], generator=gen)[:m]]
        b = y[torch.randperm(y.shape[0], generator=gen)[:m]]
        kxx = (a @ a.T / dim + 1) ** 3
        kyy = (b @ b.T / dim + 1) ** 3
        kxy = (a @ b.T / dim + 1) ** 3
        off_diag = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(off_diag - 2 * kxy.mean()))
    values_t = torch.tensor(values, dtype=torch.float64)
    return float(values_t.mean()), float(values_t.std()) if len(values) > 1 else 0.0


#################################################################################
#                               Inception Score                                 #
#################################################################################

def inception_score(probs: torch.Tensor, splits: int = 1) -> tuple[float, float] | None:
    """exp(E_x KL(p(y|x) || p(y))): high when each image is confidently one class and all classes occur.

    Its maximum is the number of classes. Returns (mean, std over splits) or None when empty.
    """
    probs = probs.double().clamp(min=1e-12)
    if probs.shape[0] == 0:
        return None
    scores = []
    for part in torch.tensor_split(probs, min(splits, probs.shape[0])):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.log() - marginal.log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    return float(scores_t.mean()), float(scores_t.std()) if len(scores) > 1 else 0.0


#################################################################################
#                    k-NN manifolds: precision/recall, density/coverage         #
#################################################################################

def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double())


def kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from every row of x to its k-th nearest other row (the point itself excluded)."""
    radii = []
    for block in torch.split(torch.arange(x.shape[0]), CHUNK):
        dist = _cdist(x[block], x)
        # The zero self-distance is the first of the sorted row, so the k-th neighbour is index k.
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor,
                       exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query row's nearest reference row."""
    dists, index = [], []
    for block in torch.split(torch.arange(query.shape[0]), CHUNK):
        dist = _cdist(query[block], reference)
        if exclude_self:
            dist[torch.arange(len(block)), block] = float("inf")
        d, i = dist.min(dim=1)
        dists.append(d)
        index.append(i)
    return torch.cat(dists), torch.cat(index)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Per point: how many balls B(centre_i, radius_i) contain it."""
    counts = []
    for block in torch.split(torch.arange(points.shape[0]), CHUNK):
        counts.append((_cdist(points[block], centres) <= radii[None, :]).sum(1))
    return torch.cat(counts)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float] | None:
    """Kynkaanniemi et al. 2019: precision = share of fake inside the real k-NN manifold, recall = the reverse.

    Precision measures fidelity (no implausible samples), recall measures how much of the
    real variety the samples reach. None when either set has no more than k samples.
    """
    if real.shape[0] <= k or fake.shape[0] <= k:
        return None
    real_radii = kth_neighbour_radius(real, k)
    fake_radii = kth_neighbour_radius(fake, k)
    precision = (_inside_any_ball(fake, real, real_radii) > 0).double().mean()
    recall = (_inside_any_ball(real, fake, fake_radii) > 0).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float] | None:
    """Naeem et al. 2020: density counts real balls around each fake (can exceed 1), coverage is the
    share of real balls holding at least one fake.

    Both use only the real manifold, so unlike precision/recall they are not inflated by a few
    outlying fakes whose own k-NN balls are huge. None when real has no more than k samples.
    """
    if real.shape[0] <= k or fake.shape[0] == 0:
        return None
    real_radii = kth_neighbour_radius(real, k)
    density = _inside_any_ball(fake, real, real_radii).double().sum() / (k * fake.shape[0])
    nearest_fake, _ = nearest_neighbours(real, fake)
    coverage = (nearest_fake <= real_radii).double().mean()
    return {"density": float(density), "coverage": float(coverage)}


#################################################################################
#                                  Diversity                                    #
#################################################################################

def mean_pairwise_distance(x: torch.Tensor) -> float | None:
    """Mean L2 distance over distinct pairs; None with fewer than 2 samples."""
    n = x.shape[0]
    if n < 2:
        return None
    total = 0.0
    for block in torch.split(torch.arange(n), CHUNK):
        total += float(_cdist(x[block], x).sum())
    return total / (n * (n - 1))


#################################################################################
#                                Classification                                 #
#################################################################################

def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float | None:
    """Share of rows whose label is among the k highest logits; None when empty."""
    if labels.numel() == 0:
        return None
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    return float(hits.double().mean())


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
