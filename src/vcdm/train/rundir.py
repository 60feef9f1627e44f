"""Where a run writes and what it resumes: the run directory, the training state to resume, the seed.

Process 0 decides (`plan_run`) and every process follows its plan."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from vcdm import distributed as dist
from vcdm.train.loggers import new_run_id, start_wandb, wandb_wanted
from vcdm.train.options import IDENTITY, OptionError, TrainOptions
from vcdm.train.state import STATE_RE, StateError, load_state, newest_valid_state

RESUME_MATCH = (*IDENTITY, "desc")


@dataclass
class RunPlan:
    run_dir: Path
    resume: Path | None  # the training state to resume from
    seed: int  # the resumed run's seed if it recorded one, else a random one
    wandb_id: str | None = None


def find_resume(opts: TrainOptions) -> tuple[Path, dict] | None:
    """The training state to resume from, loaded and checked (process 0)."""
    if not opts.resume:
        return None
    target = Path(opts.resume)
    if opts.resume != "auto" and target.is_file():
        return target, load_state(target)  # raises StateError naming the problem
    if opts.resume == "auto":
        out = Path(opts.outdir)
        candidates = [out] if opts.nosubdir else (list(out.glob("*")) if out.is_dir() else [])
        dirs = [d for d in candidates if matches(d, opts)]
    elif target.is_dir():
        dirs = [target]
    else:
        raise OptionError(f"--resume: {opts.resume} is neither a training state, a run directory nor 'auto'")
    found = newest_valid_state(dirs)
    if found is None:
        if opts.resume == "auto":
            print("--resume=auto: no valid training state found for these options; starting a new run", flush=True)
            return None
        raise OptionError(f"--resume: no valid training-state-*.pt in {opts.resume}")
    return found


def make_run_dir(opts: TrainOptions, resume: Path | None) -> tuple[Path, str | None]:
    """(run directory, wandb id or None); the directory is not created here."""
    if resume is not None:
        run_dir = resume.parent
        run_id = run_dir.name.split("-")[0]
        wandb_id = start_wandb(opts.to_dict(), run_id=run_id, wandb_dir=opts.wandb_dir) if wandb_wanted() else None
        return run_dir, wandb_id
    wandb_id = start_wandb(opts.to_dict(), run_id=opts.resume_id, wandb_dir=opts.wandb_dir) if wandb_wanted() else None
    run_id = wandb_id or new_run_id()
    if opts.nosubdir:
        return Path(opts.outdir), wandb_id
    run_dir = Path(opts.outdir) / (f"{run_id}-{opts.desc}" if opts.desc else run_id)
    if run_dir.exists():
        raise OptionError(f"--outdir: run directory {run_dir} already exists")
    return run_dir, wandb_id


def plan_run(opts: TrainOptions) -> tuple[RunPlan, dict | None]:
    """Process 0 finds the state to resume and names the run directory; the others receive its plan.
    Returns (plan, the loaded state on process 0, else None)."""
    plan, state = None, None
    if dist.rank() == 0:
        try:
            resume, state = find_resume(opts) or (None, None)
            run_dir, wandb_id = make_run_dir(opts, resume)
            seed = json.loads(state.get("options", "{}")).get("seed") if state is not None else None
            plan = RunPlan(run_dir, resume, seed if seed is not None else secrets.randbelow(1 << 31), wandb_id)
        except (OptionError, StateError) as e:
            plan = str(e)
    plan = dist.broadcast_object(plan)
    if isinstance(plan, str):
        raise OptionError(plan)
    return plan, state


def matches(run_dir: Path, opts: TrainOptions) -> bool:
    """Whether a run directory was made by a run with the same data, structure and model options."""
    try:
        recorded = TrainOptions.from_dict(json.loads((run_dir / "training_options.json").read_text())).to_dict()
    except (OSError, ValueError, TypeError):
        return False
    current = opts.to_dict()
    recorded["path"] = os.path.abspath(recorded["path"])  # older runs recorded it as given
    return all(recorded.get(k) == current.get(k) for k in RESUME_MATCH) and any(
        STATE_RE.fullmatch(p.name) for p in run_dir.glob("training-state-*.pt"))
