"""What a run writes besides weights: log.txt, stats.jsonl, a loss curve, and optional TensorBoard/wandb.

Only process 0 logs. stats.jsonl and loss.png are rewritten atomically each tick (a resumed run first
drops the records past its state, so the file matches an uninterrupted run); log.txt is a stream,
appended a whole line per write. wandb, TensorBoard and matplotlib are imported where they are used:
optional or slow to import, and most runs use none of them.
"""
from __future__ import annotations

import json
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from vcdm.fileio import atomic_path, atomic_write

ID_ALPHABET = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """8 lowercase letters/digits, as wandb's run ids (not drawn from the seeded generators)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(8))


def wandb_wanted() -> bool:
    return bool(os.environ.get("WANDB_ENTITY") and os.environ.get("WANDB_PROJECT"))


def start_wandb(config: dict[str, Any], *, run_id: str | None, wandb_dir: str) -> str | None:
    """Start wandb if WANDB_ENTITY/WANDB_PROJECT are set and wandb imports; return its run id."""
    if not wandb_wanted():
        return None
    try:
        import wandb
    except ImportError:
        print("WANDB_ENTITY/WANDB_PROJECT are set but wandb is not installed; logging locally only", file=sys.stderr)
        return None
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(entity=os.environ["WANDB_ENTITY"], project=os.environ["WANDB_PROJECT"], config=config,
                     dir=wandb_dir, id=run_id, resume="allow" if run_id else None)
    return run.id


def format_time(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s // 60 % 60:02d}m"
    return f"{s // 86400}d {s // 3600 % 24:02d}h"


def rss_gb() -> float:
    """Resident memory of this process in GiB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _Tee:
    """Writes to `stream` and to log.txt; a failed log.txt write (e.g. a full disk) is recorded on
    `owner.error` and stops the copying, instead of raising from whatever printed."""

    def __init__(self, stream: TextIO, fd: int, owner: "RunLogger"):
        self.stream, self.fd, self.owner = stream, fd, owner

    def write(self, text: str) -> int:
        self.stream.write(text)
        if text and not self.owner.error:
            try:
                os.write(self.fd, text.encode("utf-8", "replace"))
            except OSError as e:
                self.owner.error = e.strerror or str(e)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class RunLogger:
    """Process 0's logs for one run directory. Use as a context manager (restores stdout/stderr)."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_nimg: int | None = None, tensorboard: bool = False,
                 use_wandb: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        stats = self.run_dir / "stats.jsonl"
        if resume_nimg is not None and stats.is_file():
            for line in stats.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("nimg", 0) <= resume_nimg:
                    self.records.append(rec)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.use_wandb = use_wandb
        self.error = ""  # why writing log.txt failed, if it did
        self._fd = os.open(self.run_dir / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = sys.stdout, sys.stderr

    def __enter__(self) -> "RunLogger":
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._fd, self), _Tee(sys.stderr, self._fd, self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is None:
            return
        sys.stdout, sys.stderr = self._saved
        os.close(self._fd)
        self._fd = None
        if self.tb is not None:
            self.tb.close()
        if self.use_wandb:
            import wandb
            wandb.finish()

    def write_options(self, options: dict[str, Any]) -> None:
        with atomic_write(self.run_dir / "training_options.json", "w") as f:
            json.dump(options, f, indent=2)

    def tick(self, record: dict[str, Any]) -> None:
        """Record one tick's statistics: stats.jsonl, TensorBoard, wandb (then call plot_loss)."""
        record = dict(record, timestamp=time.time())
        self.records.append(record)
        with atomic_write(self.run_dir / "stats.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "timestamp"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=record["nimg"])
            self.tb.flush()
        if self.use_wandb:
            import wandb
            wandb.log(scalars, step=record["nimg"])

    def image(self, name: str, path: Path, nimg: int) -> None:
        if self.tb is not None:
            self.tb.add_image(name, np.asarray(Image.open(path)), global_step=nimg, dataformats="HWC")
        if self.use_wandb:
            import wandb
            wandb.log({name: wandb.Image(str(path))}, step=nimg)

    def plot_loss(self) -> None:
        """loss.png: the loss curve so far."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = [(r["kimg"], r["loss"]) for r in self.records if r.get("loss") is not None]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel("kimg")
        ax.set_ylabel("training loss (mean per sample)")
        ax.set_yscale("log" if pts and min(p[1] for p in pts) > 0 else "linear")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.run_dir / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
