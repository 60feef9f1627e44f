"""Learning-rate schedules: one function per schedule, chosen by name (--lr-schedule).

Each gives the learning rate of the step that starts after `nimg` training images. Lengths are in
kimg, as the flags give them.

- ``edm``: EDM's (Karras et al. 2022): linear ramp-up over `rampup_kimg`, then constant.
- ``edm2``: EDM2's (Karras et al. 2024, Eq. 16): inverse square-root decay after `ref_kimg`,
  ``lr / sqrt(max(nimg / ref, 1))``, times the same linear ramp-up. EDM2 gives the reference in
  batches (``decay``); in images it is ``decay * batch``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # options.py takes the schedule names from here
    from vcdm.train.options import TrainOptions


def edm(nimg: int, lr: float, rampup_kimg: float, ref_kimg: float = 0.0) -> float:
    """Linear ramp-up over `rampup_kimg` kimg (0: none), then constant; `ref_kimg` is not used."""
    ramp = 1.0 if rampup_kimg <= 0 else min(nimg / max(rampup_kimg * 1000, 1e-8), 1.0)
    return lr * ramp


def edm2(nimg: int, lr: float, rampup_kimg: float, ref_kimg: float = 0.0) -> float:
    """`lr` / sqrt(max(nimg / ref, 1)) with ref = `ref_kimg` kimg (0: no decay), ramped up as `edm`."""
    if ref_kimg > 0:
        lr /= math.sqrt(max(nimg / (ref_kimg * 1000), 1))
    return edm(nimg, lr, rampup_kimg)


LR_SCHEDULES: dict[str, Callable[..., float]] = {"edm": edm, "edm2": edm2}


@dataclass(frozen=True)
class LRSchedule:
    """A schedule by name with its settings; ``schedule(nimg)`` is the learning rate. A run makes one
    (`of`) and every learning rate it uses or reports comes from it."""
    name: str
    lr: float
    rampup_kimg: float = 0.0
    ref_kimg: float = 0.0

    def __post_init__(self):
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, got '{self.name}'")

    @classmethod
    def of(cls, opts: TrainOptions) -> LRSchedule:
        """The schedule of resolved options (vcdm.train.recipe.resolve: none of them None)."""
        return cls(opts.lr_schedule, opts.lr, opts.lr_rampup, opts.lr_ref)

    def __call__(self, nimg: int) -> float:
        return LR_SCHEDULES[self.name](nimg, self.lr, self.rampup_kimg, self.ref_kimg)
