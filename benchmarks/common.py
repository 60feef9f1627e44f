"""Helpers shared by the benchmark scripts: timing that survives a busy machine, a description of the
machine, markdown tables, and the ``--quick`` / ``--json`` convention that ``run_all.py`` relies on.

Run the scripts as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``).

Every script times through ``measure`` (repetitions interleaved round-robin across the cases it
compares, warm-up calls first, min/median/max kept) and reports through ``report``: its ``--json`` file is
``{"benchmark": name, "machine": {...}, "rows": [row, ...], ...}`` where a row is
``{"metric", "value", "unit", "min", "max", "reps", "reference", "ratio", "note"}``. ``value`` is the
median over ``reps`` repetitions and ``min``/``max`` bound it (null for a single figure, such as an FD);
``reference`` names the row of the same run that ``ratio`` (value / reference value) compares against, or
is null. The one-off costs that cannot repeat (a first compile) are single ``measure`` repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from vcdm import perf
from vcdm.fileio import atomic_write


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes: a fast, rougher run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (the format run_all.py reads)")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, including the load average (other processes share the CPUs)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "cpu_path": perf.cpu_path(), "kernel_env": kernel_env(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def kernel_env() -> str:
    """The torch kernel caps in force (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), or 'default'."""
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return " ".join(caps) or "default"


def describe(info: Mapping[str, Any]) -> str:
    return (f"{info['device']} ({info['name']}), CPU path {info.get('cpu_path', '?')}, kernels "
            f"{info.get('kernel_env', '?')}, {info['threads']} threads on {info['cpus']} CPUs, "
            f"OMP_WAIT_POLICY {info['omp_wait_policy']}, torch {info['torch']}, load average {info['load_avg_1m']}")


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one case over its timed repetitions."""
    seconds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def spread(self) -> float:
        return spread(self.seconds)


def measure(cases: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1, warmup_each: int = 0,
            device: torch.device | str = "cpu", alternate: bool = False) -> dict[str, Timing]:
    """Time every case ``reps`` times, round-robin (case A, B, C, A, B, C, …; with ``alternate`` every
    other round in reverse, A, B, B, A, …, so that neither case always follows the other).

    ``warmup`` untimed rounds of every case come first; ``warmup_each`` untimed calls precede each timed
    call of a case (for cases whose caches the other cases evict). On a machine shared with other jobs
    the available CPU drifts over minutes; interleaving makes that drift hit every case alike, so ratios
    between cases stay meaningful even when absolute numbers move.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(reps):
        order = list(cases) if not alternate or rep % 2 == 0 else list(reversed(cases))
        for name in order:
            fn = cases[name]
            for _ in range(warmup_each):
                fn()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(t)) for name, t in times.items()}


def measure_one(fn: Callable[[], Any], reps: int, warmup: int = 1, device: torch.device | str = "cpu") -> Timing:
    return measure({"case": fn}, reps, warmup, device=device)["case"]


def interleaved(cases: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """``measure``'s seconds as plain lists (for scripts that keep their own statistics)."""
    return {name: list(t.seconds) for name, t in measure(cases, reps, warmup, device=device).items()}


def first_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, Timing]:
    """The result and time of one call that cannot be repeated alike (a compile, a first load)."""
    out: list[Any] = []
    timing = measure_one(lambda: out.append(fn()), reps=1, warmup=0, device=device)
    return out[0], timing


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the repetitions of one case disagree."""
    return (max(values) - min(values)) / median(values) if len(values) > 1 else 0.0


def row(metric: str, value: float | None, unit: str, *, reference: str | None = None, ratio: float | None = None,
        note: str = "", low: float | None = None, high: float | None = None, reps: int | None = None) -> dict[str, Any]:
    """One result: a figure (an FD, a ratio) or, from ``timing_row``, the median of timed repetitions."""
    return {"metric": metric, "value": value, "unit": unit, "min": low, "max": high, "reps": reps,
            "reference": reference, "ratio": ratio, "note": note}


def timing_row(metric: str, timing: Timing, *, count: float | None = None, unit: str | None = None,
               scale: float = 1.0, reference: str | None = None, ratio: float | None = None,
               note: str = "") -> dict[str, Any]:
    """A row from a ``Timing``: ``count`` per second (e.g. images/s; the slowest repetition is the min)
    when ``count`` is given, else seconds times ``scale`` (e.g. 1e3 for ms)."""
    if count is not None:
        return row(metric, count / timing.median, unit or "per s", low=count / timing.max, high=count / timing.min,
                   reps=len(timing.seconds), reference=reference, ratio=ratio, note=note)
    return row(metric, timing.median * scale, unit or "s", low=timing.min * scale, high=timing.max * scale,
               reps=len(timing.seconds), reference=reference, ratio=ratio, note=note)


def value_cell(r: Mapping[str, Any]) -> str:
    """A row's value for a table: the median with its [min-max] range where it was repeated."""
    if r.get("min") is None or r.get("max") is None or (r.get("reps") or 0) < 2:
        return fmt(r["value"])
    return f"{fmt(r['value'])} [{fmt(r['min'])}-{fmt(r['max'])}]"


def rows_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The markdown table every script prints of its rows."""
    return markdown_table(["metric", "value [min-max]", "unit", "reps", "ratio vs", "ratio", "note"],
                          [[r["metric"], value_cell(r), r["unit"], r.get("reps"), r.get("reference") or "-",
                            "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x", r.get("note", "")]
                           for r in rows])


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers with `digits` significant digits (no exponent for ordinary magnitudes); '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
        return f"{value:.{max(digits - 1, 1)}e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def result(benchmark: str, rows: list[dict[str, Any]], info: Mapping[str, Any], wall_s: float,
           **extra: Any) -> dict[str, Any]:
    """The --json document: ``info`` is ``machine()`` from the start; the load average at the end is added."""
    return {"benchmark": benchmark, "machine": dict(info), "load_avg_end": round(os.getloadavg()[0], 2),
            "wall_s": round(wall_s, 1), "rows": rows, **extra}


def report(args: argparse.Namespace, benchmark: str, rows: list[dict[str, Any]], info: Mapping[str, Any],
           wall_s: float, **extra: Any) -> None:
    """Print the rows as the common table and, with ``--json``, write the common result document."""
    print(f"\n{benchmark}: {describe(info)}\n\n{rows_table(rows)}")
    if getattr(args, "json", None):
        write_json(args.json, result(benchmark, rows, info, wall_s, **extra))
