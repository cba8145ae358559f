"""Distribution metrics on feature vectors: Frechet distance, KID, Inception Score, k-NN manifolds, top-k.

Every function takes (N, D) feature tensors and works in float64 so that the covariance
algebra of the Frechet distance does not lose the small differences it is meant to measure.
KID, the Inception Score, top-k and the confusion matrix are torchmetrics' (installed with Lightning),
fed our features through an identity "extractor"; the rest has no feature-level library version.
"""
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_stat_scores
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

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

    Ours, not torchmetrics' FrechetInceptionDistance: that one takes eigenvalues of the non-symmetric
    C1 C2, which with per-user covariances of rank < D (n < 512) is 3x further from the exact value
    and 10-25x slower. Tr((C1 C2)^1/2) equals the sum of sqrt-eigenvalues of the symmetric PSD matrix
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

class _Given(torch.nn.Module):
    """The identity as torchmetrics' feature extractor: our features are already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torchmetrics draws its subsets from the global CPU generator: seed it for the call, restore it after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        with warnings.catch_warnings():
            # Its constructors warn that features are buffered: ours are in memory already.
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            # and the std of a single split (Inception Score, splits=1) has no degrees of freedom: we report 0.
            warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")
            yield


def kernel_distance(x: torch.Tensor, y: torch.Tensor, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, averaged over random subsets.

    Unlike FD it is unbiased in the sample size, so small per-user sets can be compared
    with each other. Returns (mean, sample std) or None when either set has fewer than 2 samples.
    """
    x, y = x.double(), y.double()
    m = min(x.shape[0], y.shape[0], max_subset_size)
    if m < 2:
        return None
    # One subset is the whole data when both sets fit: repeating it would only repeat the number.
    if x.shape[0] == y.shape[0] == m:
        num_subsets = 1
    with _seeded(seed):
        kid = KernelInceptionDistance(feature=_Given(x.shape[1]), subsets=num_subsets, subset_size=m)
        kid.update(x, real=True)
        kid.update(y, real=False)
        mean, std = kid.compute()
    # torchmetrics gives the population std over subsets; the report has always given the sample std.
    std = float(std) * (num_subsets / (num_subsets - 1)) ** 0.5 if num_subsets > 1 else 0.0
    return float(mean), std


#################################################################################
#                               Inception Score                                 #
#################################################################################

def inception_score(logits: torch.Tensor, splits: int = 1, seed: int = 0) -> tuple[float, float] | None:
    """exp(E_x KL(p(y|x) || p(y))) of softmax(logits) (N, K): high when each image is confidently one class
    and all classes occur. Its maximum is K. Returns (mean, std over splits of shuffled rows) or None when empty."""
    if logits.shape[0] == 0:
        return None
    with _seeded(seed):     # it shuffles the rows before splitting them
        score = InceptionScore(feature=_Given(logits.shape[1]), splits=min(splits, logits.shape[0]))
        score.update(logits.double())
        mean, std = score.compute()
    return float(mean), float(std) if splits > 1 else 0.0


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
    """Share of rows (N, K) whose label (N,) is among the k highest logits; None when empty."""
    if labels.numel() == 0:
        return None
    if logits.shape[1] == 1:    # torchmetrics refuses one class; its one label is always the top-1
        return 1.0
    # The hit count, divided here: torchmetrics' accuracy itself would round the share to float32.
    hits, _, _, _, total = multiclass_stat_scores(logits, labels, logits.shape[1], top_k=min(k, logits.shape[1]),
                                                  average="micro").tolist()
    return hits / total


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted], (num_classes, num_classes) int64."""
    if num_classes == 1:        # torchmetrics refuses one class
        return torch.tensor([[labels.numel()]])
    return multiclass_confusion_matrix(predictions, labels, num_classes)
