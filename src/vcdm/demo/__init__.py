"""`vcdm demo`: the whole two-stage pipeline on real images, offline, on a CPU, in minutes.

1. data: scikit-learn's UCI handwritten digits as EDM-format zips, with a fixed held-out split
   (vcdm.data.digits);
2. an independent judge: a small CNN trained on the real training digits (vcdm.metrics.classifier);
3. calibration: training and sampling throughput of the two networks on this device (and, on a CPU,
   whether one thread beats several on a busy machine); the time budget is split by it;
4. the auxiliary model (prior): a small DALL-E-2-style transformer over pixel-PCA embeddings of the
   digits, trained with the real training loop (vcdm.train);
5. the image model: a small DDPM++ U-Net conditioned on those embeddings, same loop;
6. two-stage sampling (vcdm.generate): prior → embeddings → image model → images;
7. metrics (classifier Fréchet distance vs held-out digits, predicted-class statistics), figures and
   a summary, all in one run folder.

Modules: budget (time, throughput, threads, training length), training, sampling, figures and run;
the judge is vcdm.metrics.judge. `benchmarks/quality.py` reuses these pieces to compare against an
unconditional model.
"""
from __future__ import annotations

from vcdm.demo.run import DemoError, run_demo

__all__ = ["DemoError", "run_demo"]
