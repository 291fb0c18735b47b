"""Frechet distance on the Fashion-MNIST classifier's penultimate features: "FID with a domain classifier" (not the
Inception FID of the literature: the same formula on features of a CNN trained here), plus class accuracy of
class-conditional samples."""

from __future__ import annotations

import torch


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """[n, 1, s, s] -> [n, feature_dim] float64."""
    return torch.cat(
        [classifier.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets [n, d] (symmetric square roots by
    eigendecomposition: Tr (S_a S_b)^(1/2) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2))."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples in each set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)


def image_quality(classifier, samples: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    """{"fid": Frechet distance of samples vs reference images, "class_accuracy": share of samples classified as
    their label}, both on the domain classifier."""
    from depthprune.diffusion.classifier import accuracy

    fid = frechet_distance(classifier_features(classifier, samples), classifier_features(classifier, reference))
    return {"fid": fid, "class_accuracy": accuracy(classifier, samples, labels), "samples": len(samples)}


__all__ = ["classifier_features", "frechet_distance", "image_quality"]
