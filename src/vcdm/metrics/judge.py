"""The judge of the digits demo: a small CNN classifier trained on the real training digits, the
held-out digits' feature statistics, and the real-digit floor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vcdm.data import digits
from vcdm.metrics.classifier import accuracy, evaluate, feature_stats, train_classifier

FLOOR_PER_CLASS = 30  # real training digits kept from the classifier to score the floor (see Judge)


@dataclass
class Judge:
    """The classifier and the real digits that everything is measured against.

    The classifier learns from the training split minus `floor_images` (FLOOR_PER_CLASS per digit).
    Those are real training digits it has never seen, so their scores are what a perfect generator
    (one that samples the training distribution) would get with as many images: the floor. Digits the
    classifier was trained on would not do: their features are more extreme than any new image's.
    """
    classifier: Any
    test_accuracy: float
    ref: Any  # FeatureStats of the held-out test digits
    floor_images: torch.Tensor
    floor_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        return evaluate(self.classifier, images, self.ref, labels=labels)

    def real_floor(self, n: int) -> dict[str, Any]:
        if n > len(self.floor_images):
            raise ValueError(f"the real-digit floor has {len(self.floor_images)} images, {n} were asked for")
        return self.evaluate(self.floor_images[:n], self.floor_labels[:n])


def make_judge(resolution: int, *, epochs: int, device: str, progress: bool = True) -> Judge:
    """Train the classifier on the training digits at `resolution` (all but the floor) and fit the
    held-out digits' feature statistics."""
    images, labels = digits.load_split_tensors("train", resolution)
    test_images, test_labels = digits.load_split_tensors("test", resolution)
    floor = torch.from_numpy(digits.stratified_pick(labels.numpy(), FLOOR_PER_CLASS, seed=1))
    floor = floor[torch.randperm(len(floor), generator=torch.Generator().manual_seed(1))]  # any prefix is balanced
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[floor] = False
    clf = train_classifier(images[rest], labels[rest], epochs=epochs, device=device, progress=progress)
    return Judge(clf, accuracy(clf, test_images, test_labels), feature_stats(clf, test_images),
                 images[floor], labels[floor], test_images, test_labels)
