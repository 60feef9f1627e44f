"""EDM's training loop (Karras et al. 2022, NVlabs/edm training_loop.py) with the original release's
structures and embedders, and with resumable, bit-reproducible state.

The loop only orchestrates: `train_step` (step.py) updates a `TrainState` (state.py: networks, EMA,
optimiser, counters, random states); every tick reports (ticks.py) and saves snapshots, training
states and sample grids through one write-failure policy (outputs.py). Dropout uses the (saved)
global RNG; everything else random is seeded by data positions (see step.py), so a run resumed from
a state continues bit for bit as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vcdm import distributed as dist
from vcdm.checkpoints import CheckpointConfig
from vcdm.nets.precond import UNCERTAINTY_HEAD
from vcdm.train import finetune
from vcdm.train.batches import BatchMaker, embedding_table
from vcdm.train.build import (Setup, build, embedding_dim, make_network, make_optimizer, make_structure,
                              open_dataset)
from vcdm.train.ddp import with_net, wrap_ddp
from vcdm.train.ema import EMA, PowerFunctionEMA
from vcdm.train.loggers import RunLogger
from vcdm.train.lr_schedules import LRSchedule
from vcdm.train.options import TEACHER_METHODS, OptionError, TrainOptions
from vcdm.train.outputs import (CONDITIONING_GRID, Outputs, TrainingError, grid_name, remove_stale_temp_files,
                                 write_snapshots, write_state)
from vcdm.train.preview import conditioning, sample_images, save_grid
from vcdm.train.recipe import describe, grad_inf, precision_line, resolve, resolve_precision
from vcdm.train.rundir import RunPlan, decide, lock_holder, plan_run
from vcdm.train.sampler import PositionSampler, ShuffledDataset, mix_seed, running
from vcdm.train.state import StateError, TrainState, load_state
from vcdm.train.step import StepSetup, train_step
from vcdm.train.ticks import TickStats, tick_line

__all__ = ["TrainingError", "train", "dry_run"]
PREVIEW_MAX = 64


def train(opts: TrainOptions) -> Path | None:
    """Train as `opts` say; return the run directory (None for --dry-run)."""
    opts.validate()
    opts = resolve(opts)
    opts.path = os.path.abspath(opts.path)  # recorded in the run's options and checkpoints
    if opts.dry_run:
        return dry_run(opts)
    with dist.session(opts.device or ("cuda" if torch.cuda.is_available() else "cpu")) as device:
        return Trainer(opts, device).run()


def dry_run(opts: TrainOptions) -> None:
    """Print the options and what they imply; write nothing."""
    dataset = open_dataset(opts)
    structure = make_structure(opts, dataset, embedding_dim(opts))
    net_class, net_kwargs = make_network(opts, structure, 9 if opts.augment > 0 else 0)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    print(json.dumps(opts.to_dict(), indent=2))
    print(f"dataset: {dataset!r}")
    print(f"structure: generate {list(structure.latent_names)} ({structure.latent_dim} values), "
          f"condition on {list(structure.observed_names)} ({structure.observed_dim} values)")
    print(f"network: {net_class} {json.dumps(net_kwargs)}")
    print(describe(opts))
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16, why = resolve_precision(opts, device, dataset.resolution if "image" in structure.latent_names else None, None)
    print(precision_line(bf16, why) + (" (a resumed run keeps its own)" if opts.resume and opts.bf16 is None else ""))
    print(f"resume: {describe_plan(opts)}")
    print("Dry run; exiting.")
    return None


def describe_plan(opts: TrainOptions) -> str:
    """What a run with these options would resume (for --dry-run): the state and its kimg, or why none."""
    plan, state, why = decide(opts)
    if plan.resume is None:
        return f"would start a new run in {opts.outdir} ({why})"
    kimg = state["counters"]["nimg"] / 1000
    if plan.finished_nimg is not None:
        return f"would do nothing: {plan.resume} already finished at {kimg:g} kimg (--duration {opts.duration:g} Mimg)"
    moved = f"; its dataset moved from {plan.moved_from}" if plan.moved_from else ""
    holder = lock_holder(plan.run_dir)
    busy = f"; but {plan.run_dir} is in use now by another training process ({holder})" if holder else ""
    return f"would resume {plan.resume} at {kimg:g} kimg ({why}{moved}){busy}"


@dataclass
class Run:
    """One run's pieces, as the loop uses them."""
    setup: Setup
    state: TrainState
    step: StepSetup
    batches: Iterator
    plan: RunPlan
    outputs: Outputs
    config: CheckpointConfig
    logger: RunLogger | None = None
    preview: dict[str, Any] | None = None
    last_state: Path | None = None  # the newest training state written (or resumed from)
    nonfinite_steps: int = 0  # steps with non-finite losses since the last training state


class Trainer:
    def __init__(self, opts: TrainOptions, device: torch.device):
        self.opts, self.device = opts, device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.stop_signal: str | None = None

    def geometry(self) -> tuple[int, int]:
        """(batch per round, accumulation rounds)."""
        o = self.opts
        if o.batch % self.world:
            raise OptionError(f"--batch {o.batch} is not divisible by the {self.world} processes")
        per_rank = o.batch // self.world
        batch_gpu = min(o.batch_gpu or per_rank, per_rank)
        if per_rank % batch_gpu:
            raise OptionError(f"--batch-gpu {batch_gpu} does not divide the per-process batch {per_rank} "
                              f"(--batch {o.batch} over {self.world} processes)")
        return batch_gpu, per_rank // batch_gpu

    def run(self) -> Path:
        with contextlib.ExitStack() as self.cleanup:  # DataLoader workers stop however the run ends
            return self._run()

    def _run(self) -> Path:
        o = self.opts
        batch_gpu, rounds = self.geometry()
        torch.backends.cudnn.benchmark = o.bench
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        if o.fp16 and self.device.type != "cuda":
            raise OptionError("--fp16 needs CUDA (GradScaler); on CPU use --bf16")
        plan, loaded, lock = plan_run(o)
        if lock is not None:
            self.cleanup.callback(lock.release)
        if plan.finished_nimg is not None:
            dist.print0(f"{plan.resume}: already finished at {plan.finished_nimg / 1000:g} kimg (--duration "
                        f"{o.duration:g} Mimg); nothing to do. To train longer, pass a larger --duration")
            return plan.run_dir
        if o.seed is None:
            o.seed = plan.seed  # the resumed run's seed (its data order and noise), else a random one
        elif plan.resume is not None and o.seed != plan.seed:
            dist.print0(f"warning: --seed {o.seed} differs from the resumed run's {plan.seed}; data order and noise change")

        if plan.resume is None:  # before the network and any embedding cache are built (minutes on large data)
            dist.print0(f"Run directory: {plan.run_dir}")
        torch.manual_seed(o.seed)  # network initialisation: the same in every process, whatever their number
        s = build(o, self.device)
        o.bf16, why = resolve_precision(o, self.device, s.dataset.resolution if "image" in s.structure.latent_names
                                        else None, plan.bf16)
        dist.print0(precision_line(o.bf16, why))
        if o.tune in TEACHER_METHODS:  # the checkpoint's own network (or --teacher), also when resuming
            s.loss_fn.teacher = finetune.frozen_teacher(o.teacher or o.init, s.denoiser)
            if o.tune == "dmd":  # its fake denoiser starts as the teacher (a resumed run's is in the state)
                s.loss_fn.guide = finetune.frozen_guide(o.guide, o.teacher or o.init, self.device) if o.guide else None
                s.loss_fn.make_fake(lambda critic: wrap_ddp(critic, self.device))
        state = self.make_state(s, plan, loaded)
        del loaded
        cached = embedding_table(s, self.device, o.xflip) if (o.embed_cache and s.embedder is not None and s.augment_pipe is None
                                             and not o.train_embedder and "embedding" in _used(s.structure)) else None
        maker = BatchMaker(s.structure, self.device, embedder=s.embedder, augment_pipe=s.augment_pipe, cached=cached)
        batches = self.cleanup.enter_context(running(self.loader(s, batch_gpu, state.counters["position"])))
        if not state.restore_rng(self.rank, self.world):
            if plan.resume is not None:
                print(f"warning: {plan.resume} was saved by {len(state.rng)} processes, this run has "
                      f"{self.world}; dropout random streams restart", flush=True)
            torch.manual_seed(mix_seed(o.seed, (1 << 40) + self.rank))

        ddp = wrap_ddp(state.net, self.device)
        step = self.step_setup(s, with_net(s.denoiser, ddp), ddp, maker, rounds, batch_gpu)
        training = dict(o.to_dict(), world_size=self.world, batch_gpu=batch_gpu, network=s.net_class,
                        dataset=plan.dataset)
        outputs = Outputs(plan.run_dir, resumable=plan.resume is not None)
        run = Run(s, state, step, batches, plan, outputs, s.config(training), last_state=plan.resume)
        if self.rank == 0:
            run.logger = self.start_logging(run, training)
            if run.logger is not None:
                self.cleanup.enter_context(run.logger)
        run.outputs.check()
        self.cleanup.enter_context(self.signals())
        self.announce(run, rounds, batch_gpu)
        run.preview = self.preview_setup(run, cached, batch_gpu)
        self.loop(run)
        return plan.run_dir

    def make_state(self, s: Setup, plan: RunPlan, loaded: dict | None) -> TrainState:
        """Networks, EMA and optimiser: initialised (--pretrained_weights, --transfer) or resumed."""
        o = self.opts
        net = s.denoiser.net.train().requires_grad_(True)
        if plan.resume is not None and loaded is None:
            loaded = load_state(plan.resume)  # processes other than 0
        frozen = self.init_weights(net, s.structure) if loaded is None else list(loaded.get("frozen", []))
        for name, p in net.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        ema = PowerFunctionEMA(net, o.ema_std) if o.ema_std else EMA(
            net, halflife_nimg=o.ema * 1e6, rampup=None if o.transfer else o.ema_rampup)
        params = list(net.parameters())
        trained_embedder = s.embedder if s.embedder is not None and o.train_embedder else None
        if trained_embedder is not None:
            trained_embedder.train()
            params += [p for p in trained_embedder.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, o)
        scaler = torch.amp.GradScaler("cuda") if o.fp16 else None
        state = TrainState(net, ema, optimizer, scaler=scaler, embedder=trained_embedder, frozen=frozen,
                           loss=s.loss_fn)
        if loaded is not None:
            try:
                state.load_state_dict(loaded)
            except StateError as e:
                raise OptionError(f"--resume: {plan.resume} does not fit these options ({e})") from None
            state.counters["nonfinite"] = 0  # a resumed run (e.g. with a lower --lr) starts counting afresh
        return state

    def loader(self, s: Setup, batch_gpu: int, position: int) -> torch.utils.data.DataLoader:
        """The endless, position-indexed, rank-sharded stream of samples from `position` on."""
        o = self.opts
        return torch.utils.data.DataLoader(
            ShuffledDataset(s.dataset, o.seed), batch_size=batch_gpu, num_workers=o.workers,
            sampler=PositionSampler(batch=o.batch, rank=self.rank, world_size=self.world, start=position),
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if o.workers else None,
            worker_init_fn=_quiet_worker)

    def step_setup(self, s: Setup, train_denoiser, ddp, maker: BatchMaker, rounds: int, batch_gpu: int) -> StepSetup:
        o, dev = self.opts, self.device.type
        autocast = (lambda: torch.autocast(dev, dtype=torch.float16)) if o.fp16 else (
            (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if o.bf16 else contextlib.nullcontext)
        sizes = [s.structure.numel(n) for n in s.structure.latent_names]
        return StepSetup(train_denoiser, ddp, s.loss_fn, maker, sizes, rounds, batch_gpu * rounds, o.batch, o.seed,
                         LRSchedule.of(o), ls=o.ls, equally_weight=o.equally_weight_tensors,
                         grad_inf=grad_inf(o), train_embedder=o.train_embedder, autocast=autocast)

    def start_logging(self, run: Run, training: dict[str, Any]) -> RunLogger | None:
        """Process 0: make the run directory, remove a killed run's temp files, open the logs.
        None if that failed (recorded in run.outputs; a directory made here is removed again)."""
        o, run_dir = self.opts, run.plan.run_dir
        existed = not run.plan.created
        for p in remove_stale_temp_files(run_dir) if existed else []:
            print(f"removed {p.name}, a temp file left by an interrupted run", flush=True)
        logger = None

        def start() -> None:
            nonlocal logger
            logger = RunLogger(run_dir, resume_nimg=run.state.counters["nimg"] if run.plan.resume else None,
                               tensorboard=o.tensorboard, use_wandb=run.plan.wandb_id is not None)
            logger.write_options(training)  # a resumed run's too: its --duration and dataset path may be new

        if not run.outputs.attempt(run_dir, start):
            if logger is not None:
                logger.close()
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            return None
        return logger

    def announce(self, run: Run, rounds: int, batch_gpu: int) -> None:
        if self.rank != 0:
            return
        o, s, net, counters = self.opts, run.setup, run.state.net, run.state.counters
        if run.plan.resume is not None:
            print(f"Resuming from {run.plan.resume} at {counters['nimg'] / 1000:.1f} kimg")
        n_params = sum(p.numel() for p in net.parameters())
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(f"Network: {s.net_class}, {n_params:,} parameters ({n_train:,} trained); structure: generate "
              f"{list(s.structure.latent_names)}, condition on {list(s.structure.observed_names)}")
        print(f"Batch {o.batch} = {self.world} processes x {rounds} rounds x {batch_gpu}; device {self.device}; "
              f"training for {o.duration:g} Mimg")
        print(describe(o))
        if o.lr_rampup > o.duration * 1000:
            print(f"warning: --lr-rampup {o.lr_rampup:g} kimg is longer than --duration {o.duration * 1000:g} kimg: "
                  f"the learning rate never gets past {run.step.lr_schedule(round(o.duration * 1e6)):.3g} "
                  f"(--lr {o.lr:g}); shorten --lr-rampup", flush=True)

    def init_weights(self, net, structure) -> list[str]:
        """--pretrained_weights / --transfer / --init; returns the names of frozen parameters."""
        o = self.opts
        if o.pretrained_weights:
            # the structure places a class-conditional ADM's class columns (the release's ImageNet fine-tuning)
            finetune.apply_pretrained_weights(o.pretrained_weights, net, freeze=o.freeze_pretrained, structure=structure)
            return [n for n, p in net.named_parameters() if not p.requires_grad]
        if o.transfer:
            finetune.transfer(o.transfer, net)
        if o.init:
            finetune.initialise(o.init, net)
        if o.tune:  # the tuning losses do not use EDM2's uncertainty head: frozen, so DDP expects no gradient for it
            return [n for n, _ in net.named_parameters() if n.startswith(UNCERTAINTY_HEAD)]
        return []

    def preview_setup(self, run: Run, cached, batch_gpu: int) -> dict[str, Any] | None:
        """Fixed conditioning for sample grids (image models only: None otherwise)."""
        s = run.setup
        if s.structure.latent_names != ("image",) or not self.opts.sample:
            return None
        if self.rank != 0:
            return {}  # process 0 draws the grids; the others only join its error check
        n = min(batch_gpu, PREVIEW_MAX)
        maker = BatchMaker(s.structure, self.device, embedder=s.embedder, cached=cached)
        y, reals = conditioning(s.dataset, maker, n)
        path = run.plan.run_dir / CONDITIONING_GRID
        if run.plan.resume is None and y is not None:
            run.outputs.attempt(path, lambda: save_grid(reals, path))
        return {"y": y, "n": n, "denoiser": with_net(s.denoiser, run.state.ema.ema)}

    @contextlib.contextmanager
    def signals(self):
        """SIGINT/SIGTERM: finish the step, save, exit 0. A second SIGINT interrupts at once."""
        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            print(f"\n{self.stop_signal}: finishing the current step, then saving", flush=True)

        try:
            old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            old = {}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    # ---------------------------------------------------------------- training
    def loop(self, run: Run) -> None:
        """Steps until done; at each tick, report and save."""
        o, counters = self.opts, run.state.counters
        total_nimg = max(round(o.duration * 1e6), 1)
        names = run.setup.structure.latent_names
        stats = TickStats(names, run.step.sizes, o.batch, counters["nimg"])
        start_time = time.time() - counters["total_sec"]
        deadline = time.time() + o.time_limit if o.time_limit > 0 else math.inf
        if self.rank == 0:
            print(f"Training from {counters['nimg'] / 1000:.1f} kimg to {total_nimg / 1000:.1f} kimg...", flush=True)
        def want_stop() -> bool:
            if self.stop_signal is None and time.time() >= deadline:
                self.stop_signal = "--time-limit"
            return self.stop_signal is not None

        while True:
            result = train_step(run.state, run.step, run.batches, want_stop)
            stats.add(result.totals, result.finite)
            run.nonfinite_steps += not result.finite
            diverged = o.max_nonfinite > 0 and counters["nonfinite"] >= o.max_nonfinite
            done = counters["nimg"] >= total_nimg or result.stop or diverged
            if not done and counters["tick"] != 0 and counters["nimg"] < stats.start_nimg + o.tick * 1000:
                continue
            tick_end = time.time()
            counters["total_sec"] = tick_end - start_time
            record = stats.record(counters, lr=result.lr, ema_halflife=run.state.ema.halflife(counters["nimg"] - o.batch),
                                  device=self.device)
            if self.rank == 0:
                print(tick_line(record, total_nimg, done), flush=True)
                run.outputs.attempt(run.plan.run_dir / "stats.jsonl", lambda: run.logger.tick(record))
                run.outputs.attempt(run.plan.run_dir / "loss.png", run.logger.plot_loss)
            self.save_tick(run, done, diverged)
            self.finish_tick(run, result.stop, diverged, record["kimg"])
            if done:
                break
            stats.start(counters["nimg"], maintenance=time.time() - tick_end)
        if self.rank == 0:
            print("Exiting...", flush=True)

    def save_tick(self, run: Run, done: bool, diverged: bool) -> None:
        """Snapshot, training state and sample grid as the intervals say (all at the end). A state is
        resumable only if its weights and optimiser moments and every loss since the last state are finite;
        otherwise it is saved as training-state-*-nonfinite.pt, which --resume passes over. A diverged run
        writes no snapshot or grid."""
        o, state, outputs, run_dir = self.opts, run.state, run.outputs, run.plan.run_dir
        tick = state.counters["tick"]
        state.counters["tick"] += 1  # the state records the next tick
        if not diverged and (done or (o.snap and tick % o.snap == 0)):
            write_snapshots(outputs, run_dir, state.ema, run.setup.embedder, run.config, state.counters["nimg"])
        if done or (o.dump and tick % o.dump == 0 and tick != 0):
            poisoned = diverged or run.nonfinite_steps > 0 or not state.finite()
            path = write_state(outputs, run_dir, state, o, run.plan.dataset, resumable=not poisoned)
            if path is not None and not poisoned:
                run.last_state, outputs.resumable = path, True
            run.nonfinite_steps = 0
        if run.preview is not None and o.sample and not diverged and (done or tick % o.sample == 0):
            path = run_dir / grid_name(state.counters["nimg"])
            outputs.attempt(path, lambda: self.write_preview(run.preview, path, state.counters["nimg"], run.logger))
        if self.rank == 0 and run.logger is not None and run.logger.error:
            outputs.fail(run_dir / "log.txt", run.logger.error)
        outputs.check()

    def finish_tick(self, run: Run, stop: bool, diverged: bool, kimg: float) -> None:
        run_dir = run.plan.run_dir
        if diverged:
            last = (f"the last finite training state is {run.last_state}: resume from it with "
                    f"--resume={run.last_state}" if run.last_state else "no finite training state was saved")
            raise TrainingError(f"{self.opts.max_nonfinite} consecutive non-finite losses at {kimg:.1f} kimg; "
                                f"stopped; {last} and a lower --lr, --bf16 instead of --fp16, or checked data")
        if stop and self.rank == 0:
            print(f"Stopped by {self.stop_signal or 'a signal'} at {kimg:.1f} kimg; resume with --resume={run_dir}",
                  flush=True)

    def write_preview(self, preview: dict, path: Path, nimg: int, logger) -> None:
        save_grid(sample_images(preview["denoiser"], preview["y"], preview["n"], self.device), path)
        logger.image("samples", path, nimg)


def _quiet_worker(_: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM, which Ctrl-C and torchrun send to the whole process
    group: the main process finishes its step, saves, and then stops them (sampler.running)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _used(structure) -> set[str]:
    return {n for n, e in zip(structure.names, structure.exist) if e}

