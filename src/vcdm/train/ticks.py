"""Progress of a run, tick by tick: loss means, timing, memory, and the line printed per tick."""
from __future__ import annotations

import time
from typing import Any

import torch

from vcdm.train.loggers import format_time, rss_gb


class TickStats:
    """Loss sums and step counts since the start of the current tick."""

    def __init__(self, names: tuple[str, ...], sizes: list[int], batch: int, nimg: int):
        self.names, self.sizes, self.batch = names, sizes, batch
        self.loss = torch.zeros(len(names) + 1, dtype=torch.float64)
        self.start(nimg)
        self.maintenance = 0.0

    def start(self, nimg: int, maintenance: float = 0.0) -> None:
        self.start_nimg, self.start_time, self.maintenance = nimg, time.time(), maintenance
        self.loss.zero_()
        self.steps = self.nonfinite = 0

    def add(self, totals: list[float], finite: bool) -> None:
        self.steps += 1
        if finite:
            self.loss += torch.tensor(totals, dtype=torch.float64)
        else:
            self.nonfinite += 1

    def record(self, counters: dict[str, Any], *, lr: float, ema_halflife: float, device: torch.device) -> dict[str, Any]:
        """The tick's statistics (losses are means per generated element of the finite steps)."""
        now = time.time()
        tick_nimg = counters["nimg"] - self.start_nimg
        ok = self.steps - self.nonfinite
        n_el = max(ok, 1) * self.batch
        mean = lambda i, dim: self.loss[i].item() / (n_el * dim) if ok else None  # noqa: E731
        record = {"tick": counters["tick"], "kimg": counters["nimg"] / 1000, "nimg": counters["nimg"],
                  "loss": mean(0, sum(self.sizes)),
                  **{f"loss/{n}": mean(i + 1, self.sizes[i]) for i, n in enumerate(self.names)},
                  "nonfinite_steps": self.nonfinite, "lr": lr, "ema_halflife_kimg": ema_halflife / 1000,
                  "sec_per_tick": now - self.start_time, "sec_per_kimg": (now - self.start_time) / max(tick_nimg, 1) * 1000,
                  "maintenance_sec": self.maintenance, "total_sec": counters["total_sec"]}
        if device.type == "cuda":
            record["maxmem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        else:
            record["rss_gb"] = rss_gb()
        return record


def tick_line(record: dict[str, Any], total_nimg: int, done: bool) -> str:
    eta = (total_nimg - record["nimg"]) / 1000 * record["sec_per_kimg"]
    mem = f"maxmem {record['maxmem_gb']:.2f}" if "maxmem_gb" in record else f"rss {record['rss_gb']:.2f}"
    loss = f"{record['loss']:.4f}" if record["loss"] is not None else "non-finite"
    return (f"tick {record['tick']:<5d} kimg {record['kimg']:<9.1f} time {format_time(record['total_sec']):<10s} "
            f"sec/tick {record['sec_per_tick']:<7.1f} sec/kimg {record['sec_per_kimg']:<8.2f} "
            f"eta {format_time(eta) if not done else '-':<9s} {mem} loss {loss} lr {record['lr']:.3g}")
