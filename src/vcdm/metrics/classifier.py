"""An independent feature space for small labelled image sets (the demo's digits): a small CNN
trained on the real training images.

Inception features (FID) are made for 299x299 photographs; on 16x16 digits they mostly measure
up-sampling artefacts. A classifier trained on the real digits instead knows what the digits look
like, and neither diffusion model ever sees it. It gives:
- a Fréchet distance between Gaussians fitted to its penultimate-layer features ("classifier FD"),
  computed with `vcdm.metrics.frechet_distance`;
- its accuracy on held-out real images (is the feature space any good?), and on generated images
  whose intended class is known (e.g. images conditioned on a held-out image's embedding);
- the distribution of predicted classes on generated images: its entropy (ln 10 = all ten digits
  equally often), the mean confidence (recognisable samples score high) and the Inception-score
  analogue exp(E[KL(p(y|x) || p(y))]) (at most the number of classes).

Training is deterministic for a seed on a given machine (seeded initialisation, shuffling and ±1-pixel
shifts; the global RNG is left untouched).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from vcdm.metrics.fid import frechet_distance
from vcdm.metrics.stats import FeatureStats, compute_stats

FEATURE_DIM = 32
EPOCHS = 15
SHIFT = 1  # pixels of random translation during training


class DigitClassifier(nn.Module):
    """conv-pool-conv-pool → FEATURE_DIM features (ReLU) → class logits. Input: uint8 (B, C, H, W)."""

    def __init__(self, channels: int = 3, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.dim, self.num_classes = feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, torch.float32) / 127.5 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, dim) of uint8 images."""
        return self.body(self._input(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Class probabilities (B, num_classes) on the CPU."""
        self.eval()
        return torch.cat([self(b).softmax(1).cpu() for b in images.split(batch_size)])


class ClassifierFeatures:
    """The classifier as a `vcdm.metrics.FeatureExtractor` (uint8 images → features, no grad)."""

    def __init__(self, classifier: DigitClassifier):
        self.classifier, self.dim = classifier.eval(), classifier.dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to SHIFT pixels (edge padding), one offset per image."""
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (SHIFT,) * 4, mode="replicate")
    offset = torch.randint((2 * SHIFT + 1) ** 2, [n], generator=generator)
    out = torch.empty(images.shape)
    for k in offset.unique().tolist():
        y, x = divmod(k, 2 * SHIFT + 1)
        out[offset == k] = padded[offset == k, :, y:y + h, x:x + w]
    return out.to(images.dtype)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, epochs: int = EPOCHS,
                     batch_size: int = 64, lr: float = 2e-3, device: str | torch.device = "cpu",
                     progress: bool = True) -> DigitClassifier:
    """Train on uint8 images (N, C, H, W) with int labels (N,); Adam with a cosine learning-rate decay."""
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"classifier: need matching images and labels (got {len(images)} and {len(labels)})")
    labels = labels.long()
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(images.shape[1], num_classes).to(device)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                x = _shift(images[idx], gen)
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classifier.predict(images).argmax(1) == labels.cpu().long()).float().mean())


def feature_stats(classifier: DigitClassifier, images: torch.Tensor) -> FeatureStats:
    """Mean and covariance of the classifier's features of uint8 images (N, C, H, W)."""
    dataset = torch.utils.data.TensorDataset(images.cpu())
    return compute_stats(dataset, ClassifierFeatures(classifier), batch=500, device=classifier.device,
                         progress=False)


def label_statistics(probs: torch.Tensor) -> dict[str, Any]:
    """Summary of predicted class probabilities (N, K) of generated images."""
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(0)
    counts = torch.bincount(p.argmax(1), minlength=p.shape[1])
    return {"class_entropy": float(-(marginal * marginal.log()).sum()),
            "max_class_entropy": math.log(p.shape[1]),
            "mean_confidence": float(p.max(1).values.mean()),
            "classifier_score": float((p * (p.log() - marginal.log())).sum(1).mean().exp()),
            "predicted_class_counts": counts.tolist()}


def evaluate(classifier: DigitClassifier, images: torch.Tensor, ref: FeatureStats, *,
             labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Classifier FD of uint8 `images` against `ref` statistics, label statistics, and accuracy when the
    intended `labels` are known."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a Fréchet distance, got {len(images)}")
    stats = feature_stats(classifier, images)
    probs = classifier.predict(images)
    out: dict[str, Any] = {"num_images": len(images),
                           "fd": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma), **label_statistics(probs)}
    if labels is not None:
        out["accuracy"] = float((probs.argmax(1) == labels.cpu().long()).float().mean())
    return out

