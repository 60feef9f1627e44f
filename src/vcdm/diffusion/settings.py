"""Sampler settings, in one typed place: the sampler names and the options each takes, the defaults of
the original release and of EDM, the named presets, and every check. ``SamplerOptions`` is what the
command line, the Python API and ``vcdm.diffusion.sample`` build; the samplers trust it.

Errors name settings by their field names (``num_steps``); a command line maps them to its flags
(``--steps``) with ``SamplerOptionError.named``. No torch here, so that the commands' --help stays instant.
"""
from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

SCHEDULE_OPTIONS = frozenset({"num_steps", "sigma_min", "sigma_max", "rho"})
CHURN_OPTIONS = ("S_churn", "S_min", "S_max", "S_noise")
ABLATION_OPTIONS = ("solver", "discretization", "schedule", "scaling")  # given without a sampler: the ablation sampler
TAKES: dict[str, frozenset[str]] = {  # sampler name → the options it takes (beyond guidance)
    "edm": SCHEDULE_OPTIONS | {*CHURN_OPTIONS, "solver"},
    "ablation": SCHEDULE_OPTIONS | {*CHURN_OPTIONS, *ABLATION_OPTIONS, "epsilon_s", "C_1", "C_2", "M", "alpha"},
    "dpm2m": SCHEDULE_OPTIONS,
    "euler_a": SCHEDULE_OPTIONS | {"eta"},
    "dpm2m_sde": SCHEDULE_OPTIONS | {"eta"},
    "dpm3m_sde": SCHEDULE_OPTIONS | {"eta"},
    "unipc": SCHEDULE_OPTIONS | {"order"},
    "consistency": SCHEDULE_OPTIONS | {"levels"},
}
SAMPLERS = tuple(TAKES)
CHURN_SAMPLERS = tuple(name for name, takes in TAKES.items() if "S_churn" in takes)
DETERMINISTIC = ("dpm2m", "unipc")  # no noise after the start ("has no churn" for the other samplers without churn)
SOLVERS = ("euler", "heun")
DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")  # EDM's Table 1 (vcdm.diffusion.schedules)
SCHEDULES, SCALINGS = ("vp", "ve", "linear"), ("vp", "none")  # sigma(t) and s(t) of EDM's ablation sampler
MAX_STEPS = 10_000  # sampling steps: the noise levels and the work grow with them (1e9 would allocate 8 GB)
DEFAULT_STEPS = 18  # EDM's
CONSISTENCY_STEPS = (1, 4)  # the consistency sampler's range of steps (a tuned model's; vcdm tune)
CONSISTENCY_DEFAULT_STEPS = 2
DEFAULT_RHO = 7.0  # EDM's Karras exponent
# The consistency sampler's Karras exponent where rho is left at EDM's 7: two steps re-noise at 0.80 (EDM's
# range), near ECT's two-step level of 0.821, not 2.52. Demo digits, tuned image model: FD 13.9 -> 10.4 at
# 2 steps and 11.4 -> 9.2 at 4 (benchmarks/results/fewstep-digits.md).
CONSISTENCY_RHO = 20.0
# The second of the two levels DMD trains a network that predicts x0 (the prior) at, as a fraction of sigma_data
# (vcdm.diffusion.dmd.sampler_levels; the first is the top level): the second step re-noises the first's sample a
# little and denoises it once more, mending what one step gets wrong in the small. Demo digits, one-step DMD+GAN prior
# given a second evaluation it was not trained for (2000 images, seed 0): FD 4.66 in one step; 3.09 / 3.06 / 3.12 /
# 3.39 / 4.13 / 5.03 with it at 0.05 / 0.11 / 0.24 / 0.46 / 0.64 / 0.80 (sigma_data 0.5); the release's 79
# evaluations: 3.21. Trained at 80 and 0.15 rather than given the untrained second step (6000 images per training
# seed): 4.01 / 3.69 / 5.71 against 3.86 / 3.93 / 6.98 on seeds 0 / 1 / 2; the third seed's one-step network had
# drifted at the low level (benchmarks/results/fewstep-digits.md).
DMD_REFINE_LEVEL = 0.3
NO_CHURN = {"S_churn": 0.0, "S_noise": 1.0}

# The original release's sampling recipe (its README): `vcdm sample`'s and `vcdm variations`' defaults.
RELEASE_DEFAULTS: dict[str, Any] = {"num_steps": 40, "S_churn": 50.0, "S_noise": 1.007}

# Named sampler settings for every stage (`vcdm generate/sample --preset`). "fast": UniPC with 12
# evaluations per stage, within the release setting's seed-to-seed FD noise on the digits models
# (benchmarks/solvers.py; the measurements: benchmarks/results/solvers-table.md). A preset whose sampler
# has no churn also sets the churn to none.
PRESETS: dict[str, dict[str, Any]] = {"fast": dict(sampler="unipc", num_steps=12)}

FLOATS = ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "guidance", "alpha", "epsilon_s",
          "C_1", "C_2", "eta")
POSITIVE = ("sigma_min", "sigma_max", "rho", "guidance", "alpha", "epsilon_s", "C_1", "C_2")
EXTRA_OPTIONS = ("alpha", "epsilon_s", "C_1", "C_2", "M", "eta", "order")  # vcdm.diffusion.sample's only
CHOICES = {"solver": SOLVERS, "discretization": DISCRETIZATIONS, "schedule": SCHEDULES, "scaling": SCALINGS}


class SamplerOptionError(ValueError):
    """A sampler setting that cannot work. Its template names settings as ``{field}``: ``str()`` gives the
    field names, ``named(name)`` the names a command line or an API uses."""
    usage_error = True  # a bad flag value: exit status 2 on the command line

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.named(str))

    def named(self, name: Callable[[str], str]) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: name(m.group(1)), self.template)


class SamplerOptionTypeError(SamplerOptionError, TypeError):
    """A setting of the wrong type (a string for a number, a float for a step count)."""


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise SamplerOptionTypeError(f"{{{key}}}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(value: object, key: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise SamplerOptionTypeError(f"{{{key}}}: expected integers, got {type(value).__name__} {value!r}") from None


@dataclass(frozen=True)
class SamplerOptions:
    """One stage's sampler settings: the original release's arguments (EDM's names), the sampler, guidance,
    and the options only the Python API sets (``alpha``, ``epsilon_s``, ``C_1``, ``C_2``, ``M`` of the ablation
    sampler, ``eta`` of the SDE samplers, UniPC's ``order``; None: the sampler's default).

    ``sampler=None`` picks EDM's rule: the ablation sampler when any of solver / discretization /
    schedule / scaling is given, else the EDM Heun sampler with churn. ``num_steps=None``: EDM's 18, or the
    consistency sampler's own 2. Guidance (vcdm.diffusion.guidance): ``guidance`` w, ``gnet`` the guiding
    network's checkpoint path (None: classifier-free guidance, the null condition) and ``guidance_interval``
    (lo, hi], the noise levels guided (None: all). With w = 1 the guide and the interval are dropped: those
    are the unguided samples. ``levels``: the consistency sampler's noise levels, one evaluation at each (None:
    Karras's, vcdm.diffusion.sampling.consistency_levels).
    """
    num_steps: int | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = DEFAULT_RHO
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    solver: str | None = None
    discretization: str | None = None
    schedule: str | None = None
    scaling: str | None = None
    sampler: str | None = None
    guidance: float = 1.0
    gnet: str | None = None
    guidance_interval: tuple[float, float] | None = None
    alpha: float | None = None
    epsilon_s: float | None = None
    C_1: float | None = None
    C_2: float | None = None
    M: int | None = None
    eta: float | None = None
    order: int | None = None
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Floats print as the original release's click-parsed floats did ("50.0", not "50"), so folder names match.
        for key in FLOATS:
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _number(getattr(self, key), key))
        for key in ("M", "order"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _integer(getattr(self, key), key))
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SamplerOptionError(f"{{sampler}}: expected one of {', '.join(SAMPLERS)}, got '{self.sampler}'")
        levels = self._levels()
        default = CONSISTENCY_DEFAULT_STEPS if self.sampler == "consistency" else DEFAULT_STEPS
        default = default if levels is None else len(levels)
        steps = default if self.num_steps is None else _integer(self.num_steps, "num_steps")
        object.__setattr__(self, "num_steps", steps)
        if not 1 <= steps <= MAX_STEPS:
            raise SamplerOptionError(f"{{num_steps}}: expected 1..{MAX_STEPS} steps, got {steps}")
        if levels is not None and steps != len(levels):
            raise SamplerOptionError(f"{{levels}}: {len(levels)} noise levels for {steps} {{num_steps}}; give one "
                                     "level per step (or leave the steps out)")
        self._check_ranges()
        self._check_guide()
        lo, hi = CONSISTENCY_STEPS
        if self.sampler == "consistency" and not lo <= steps <= hi:
            raise SamplerOptionError(f"{{num_steps}}: the consistency sampler takes {lo}..{hi} steps, got {steps}")
        self._check_taken()

    def _levels(self) -> tuple[float, ...] | None:
        """``levels`` as floats, checked: the consistency sampler's 1..4 noise levels, one evaluation at each, falling
        (the sampler ends at 0)."""
        if self.levels is None:
            return None
        if isinstance(self.levels, (str, bytes)) or not hasattr(self.levels, "__len__"):
            raise SamplerOptionTypeError(f"{{levels}}: expected a sequence of noise levels, got {self.levels!r}")
        levels = tuple(_number(v, "levels") for v in self.levels)
        lo, hi = CONSISTENCY_STEPS
        if (not lo <= len(levels) <= hi or not all(math.isfinite(v) and v > 0 for v in levels)
                or any(a <= b for a, b in zip(levels, levels[1:]))):
            raise SamplerOptionError(f"{{levels}}: expected {lo}..{hi} finite positive noise levels, falling (e.g. "
                                     f"80,0.15), got {','.join(map(str, levels)) or 'none'}")
        object.__setattr__(self, "levels", levels)
        return levels

    def _check_ranges(self) -> None:
        """Every number finite (S_max may be +inf: churn at all noise levels) and in its range: a NaN or inf
        would run the whole sampler and write black images."""
        for key in FLOATS:
            value = getattr(self, key)
            if value is None or (key == "S_max" and value == math.inf):
                continue
            if not math.isfinite(value) or value < 0 or (key in POSITIVE and value == 0):
                kind = "positive" if key in POSITIVE else "non-negative"
                raise SamplerOptionError(f"{{{key}}}: expected a finite {kind} number, got {value}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise SamplerOptionError(f"{{sigma_min}} {self.sigma_min} must be below {{sigma_max}} {self.sigma_max}")
        limits = {"alpha": (0, 1), "epsilon_s": (0, 1), "M": (1, math.inf), "order": (1, 3)}
        for key, (lo, hi) in limits.items():
            value = getattr(self, key)
            if value is not None and not lo <= value <= hi:
                raise SamplerOptionError(f"{{{key}}}: expected {lo}..{hi}, got {value}")
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in choices:
                raise SamplerOptionError(f"{{{key}}}: expected one of {', '.join(choices)}, got '{value}'")

    def _check_guide(self) -> None:
        """A bad interval is refused even unguided (as the command line always did); with w = 1 the guide
        and the interval are then dropped."""
        interval = self.guidance_interval
        if interval is not None:
            if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
                raise SamplerOptionTypeError(f"{{guidance_interval}}: expected (SIGMA_LO, SIGMA_HI), got {interval!r}")
            lo, hi = (_number(v, "guidance_interval") for v in interval)
            if not 0 <= lo < hi:
                raise SamplerOptionError(f"{{guidance_interval}}: expected SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < "
                                         f"SIGMA_HI, got {lo},{hi}")
            object.__setattr__(self, "guidance_interval", (lo, hi))
        if self.guidance == 1.0:
            object.__setattr__(self, "gnet", None)
            object.__setattr__(self, "guidance_interval", None)
        elif self.gnet is not None:
            object.__setattr__(self, "gnet", os.fspath(self.gnet))

    def _check_taken(self) -> None:
        """Options the sampler does not take must be left at their defaults."""
        name, defaults = self.resolved_sampler, {f.name: f.default for f in fields(SamplerOptions)}
        unused = [k for k in (*CHURN_OPTIONS, *ABLATION_OPTIONS, *EXTRA_OPTIONS, "levels")
                  if k not in TAKES[name] and getattr(self, k) != defaults[k]]
        if not unused:
            return
        if unused[0] in CHURN_OPTIONS:
            kind = "is deterministic" if name in DETERMINISTIC else "has no churn"
            raise SamplerOptionError(f"{{sampler}} {name} {kind}: drop "
                                     + "/".join(f"{{{k}}}" for k in CHURN_OPTIONS))
        names = ", ".join(f"{{{k}}}" for k in unused)
        hint = " (those select the ablation sampler)" if set(unused) <= set(ABLATION_OPTIONS) else ""
        raise SamplerOptionError(f"{{sampler}} {name} does not take {names}{hint}")

    @property
    def resolved_sampler(self) -> str:
        if self.sampler is not None:
            return self.sampler
        return "ablation" if any(getattr(self, k) is not None for k in ABLATION_OPTIONS) else "edm"

    @property
    def karras_rho(self) -> float:
        """The exponent of Karras's levels: ``rho``, or CONSISTENCY_RHO for the consistency sampler where ``rho``
        is left at EDM's 7 (so 7 cannot be asked of that sampler)."""
        return CONSISTENCY_RHO if self.resolved_sampler == "consistency" and self.rho == DEFAULT_RHO else self.rho

    def replace(self, **changes: Any) -> "SamplerOptions":
        return SamplerOptions(**{**asdict(self), **changes})

    @classmethod
    def resolve(cls, given: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, preset: str | None = None,
                recorded: Mapping[str, Any] | None = None) -> "SamplerOptions":
        """The settings of one stage from the options the user gave, over (in rising priority) ``defaults`` (a
        command's own, e.g. RELEASE_DEFAULTS), then ``preset`` (PRESETS) or, without one and unless a sampler
        is given, the checkpoint's ``recorded`` sampler (a consistency-tuned model's). A given consistency
        sampler takes its own default steps; a sampler without churn drops churn defaults it cannot use. Given
        steps drop the recorded levels; given levels set the steps."""
        values = dict(defaults or {})
        if preset is not None:
            if preset not in PRESETS:
                raise SamplerOptionError(f"{{preset}}: expected one of {', '.join(PRESETS)}, got '{preset}'")
            values.update(PRESETS[preset])
            if PRESETS[preset].get("sampler") not in (None, *CHURN_SAMPLERS):
                values.update(NO_CHURN)
        elif "sampler" not in given:
            values.update(recorded or {})
        elif given["sampler"] == "consistency":
            values.pop("num_steps", None)
        if given.get("sampler") not in (None, *CHURN_SAMPLERS):
            values.update(NO_CHURN)
        if "num_steps" in given and "levels" not in given:  # recorded levels were for their own number of steps
            values.pop("levels", None)
        elif "levels" in given and "num_steps" not in given:  # the levels give the steps
            values.pop("num_steps", None)
        return cls(**{**values, **given})


def evaluations(sampler: str, num_steps: int, solver: str = "heun") -> int:
    """Network evaluations per sample: Heun takes two per step but one on the last (to sigma = 0); the
    other samplers take one per step."""
    return 2 * num_steps - 1 if sampler in CHURN_SAMPLERS and solver == "heun" else num_steps
