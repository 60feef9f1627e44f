"""EDM's training loop (Karras et al. 2022, NVlabs/edm training_loop.py), with the original release's
structures and embedders, and with resumable, bit-reproducible state.

One optimiser step: the global batch (`--batch`) is split over the processes and, within each, into
accumulation rounds of `--batch-gpu` (DDP synchronises only the last round). The loss is the sum of
EDM's per-element weighted loss divided by the per-process batch, times `--ls` (with
--equally_weight_tensors, as the release: each round adds every tensor's mean over that round's batch,
vcdm.diffusion.loss.equally_weighted); non-finite gradients
are zeroed (nan_to_num, as EDM), Adam's learning rate ramps up linearly over `lr_rampup` kimg, and the
EMA half-life ramps up with the images seen (`ema_rampup`). Random draws (augmentation, noise levels,
noise) of a round come from a generator seeded by the global position of its first sample, so a run
is reproducible and independent of the number of processes; dropout uses the (saved) global RNG.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import torch

from vcdm import distributed as dist
from vcdm.diffusion.loss import equally_weighted
from vcdm.train.ddp import with_net, wrap_ddp
from vcdm.train.batches import BatchMaker
from vcdm.train.build import Setup, build
from vcdm.train.loggers import RunLogger, format_time, new_run_id, rss_gb, start_wandb, wandb_wanted
from vcdm.train.options import OptionError, TrainOptions
from vcdm.train.sampler import PositionSampler, ShuffledDataset, mix_seed, running
from vcdm.train.state import STATE_RE, StateError, capture_rng, load_state, newest_valid_state, restore_rng, save_state, state_name

RESUME_MATCH = ("path", "data_class", "exist", "observed", "arch", "precond", "desc")
PREVIEW_MAX = 64


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite losses, a failed write); the message is one line."""


def train(opts: TrainOptions) -> Path | None:
    """Train as `opts` say; return the run directory (None for --dry-run)."""
    opts = dataclasses.replace(opts)
    opts.validate()
    if opts.dry_run:
        return dry_run(opts)
    device = dist.init(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return Trainer(opts, device).run()
    finally:
        dist.shutdown()


def dry_run(opts: TrainOptions) -> None:
    """Print the options and what they imply; write nothing."""
    from vcdm.train.build import embedding_dim, make_network, make_structure, open_dataset

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
    print("Dry run; exiting.")
    return None


class Trainer:
    def __init__(self, opts: TrainOptions, device: torch.device):
        self.opts, self.device = opts, device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.stop_signal: str | None = None

    # ---------------------------------------------------------------- setup
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

    def find_resume(self) -> tuple[Path, dict] | None:
        """The training state to resume from, loaded and checked (process 0)."""
        o = self.opts
        if not o.resume:
            return None
        target = Path(o.resume)
        if o.resume != "auto" and target.is_file():
            return target, load_state(target)  # raises StateError naming the problem
        if o.resume == "auto":
            out = Path(o.outdir)
            candidates = [out] if o.nosubdir else (list(out.glob("*")) if out.is_dir() else [])
            dirs = [d for d in candidates if _matches(d, o)]
        elif target.is_dir():
            dirs = [target]
        else:
            raise OptionError(f"--resume: {o.resume} is neither a training state, a run directory nor 'auto'")
        found = newest_valid_state(dirs)
        if found is None:
            if o.resume == "auto":
                print("--resume=auto: no valid training state found for these options; starting a new run", flush=True)
                return None
            raise OptionError(f"--resume: no valid training-state-*.pt in {o.resume}")
        return found

    def make_run_dir(self, resume: Path | None) -> tuple[Path, str | None]:
        """(run directory, wandb id or None). Process 0 decides."""
        o = self.opts
        if resume is not None:
            run_dir = resume.parent
            run_id = run_dir.name.split("-")[0]
            wandb_id = start_wandb(o.to_dict(), run_id=run_id, wandb_dir=o.wandb_dir) if wandb_wanted() else None
            return run_dir, wandb_id
        wandb_id = start_wandb(o.to_dict(), run_id=o.resume_id, wandb_dir=o.wandb_dir) if wandb_wanted() else None
        run_id = wandb_id or new_run_id()
        if o.nosubdir:
            return Path(o.outdir), wandb_id
        run_dir = Path(o.outdir) / (f"{run_id}-{o.desc}" if o.desc else run_id)
        if run_dir.exists():
            raise OptionError(f"--outdir: run directory {run_dir} already exists")
        return run_dir, wandb_id

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

        # Run directory and resume target (process 0 decides; the others follow).
        plan, state = None, None
        if self.rank == 0:
            try:
                resume, state = self.find_resume() or (None, None)
                run_dir, wandb_id = self.make_run_dir(resume)
                seed = json.loads(state.get("options", "{}")).get("seed") if state is not None else None
                plan = ("ok", str(resume) if resume else None, str(run_dir), wandb_id,
                        seed if seed is not None else secrets.randbelow(1 << 31))
            except (OptionError, StateError) as e:
                plan = ("error", str(e), None, None, None)
        plan = dist.broadcast_object(plan)
        if plan[0] == "error":
            raise OptionError(plan[1])
        resume, run_dir, wandb_id = (Path(plan[1]) if plan[1] else None), Path(plan[2]), plan[3]
        if o.seed is None:
            o.seed = int(plan[4])  # the resumed run's seed (its data order and noise), else a random one
        elif resume is not None and o.seed != plan[4]:
            dist.print0(f"warning: --seed {o.seed} differs from the resumed run's {plan[4]}; data order and noise change")

        torch.manual_seed(o.seed)  # network initialisation: the same in every process, whatever their number
        s = build(o, self.device)
        denoiser, structure, embedder = s.denoiser, s.structure, s.embedder
        net = denoiser.net.train().requires_grad_(True)
        if resume is not None and state is None:
            state = load_state(resume)
        if state is None:
            frozen = self.init_weights(net, structure)
        else:
            frozen = list(state.get("frozen", []))
        for name, p in net.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        params = list(net.parameters())
        if embedder is not None and o.train_embedder:
            embedder.train()
            params += [p for p in embedder.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=o.lr, betas=(0.9, 0.999), eps=1e-8)
        scaler = torch.amp.GradScaler("cuda") if o.fp16 else None
        counters = {"nimg": 0, "tick": 0, "position": 0, "nonfinite": 0, "total_sec": 0.0}
        if state is not None:
            try:
                net.load_state_dict(state["net"])
                ema.load_state_dict(state["ema"])
                optimizer.load_state_dict(state["optimizer"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                if embedder is not None and o.train_embedder and state.get("embedder"):
                    embedder.load_state_dict(state["embedder"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise OptionError(f"--resume: {resume} does not fit these options ({str(e).splitlines()[0]})") from None
            counters.update(state["counters"])

        # Data: position-indexed, rank-sharded, endless.
        augment_pipe = s.augment_pipe
        cached = self.embedding_table(s) if (o.embed_cache and embedder is not None and augment_pipe is None
                                             and not o.train_embedder and "embedding" in _used(structure)) else None
        maker = BatchMaker(structure, self.device, embedder=embedder, augment_pipe=augment_pipe, cached=cached)
        loader = torch.utils.data.DataLoader(
            ShuffledDataset(s.dataset, o.seed), batch_size=batch_gpu, num_workers=o.workers,
            sampler=PositionSampler(batch=o.batch, rank=self.rank, world_size=self.world, start=counters["position"]),
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if o.workers else None,
            worker_init_fn=_quiet_worker)
        batches = self.cleanup.enter_context(running(loader))
        if state is not None and len(state.get("rng", [])) == self.world:
            restore_rng(state["rng"][self.rank])
        else:
            if state is not None:
                print(f"warning: {resume} was saved by {len(state.get('rng', []))} processes, this run has "
                      f"{self.world}; dropout random streams restart", flush=True)
            torch.manual_seed(mix_seed(o.seed, (1 << 40) + self.rank))
        del state

        ddp = wrap_ddp(net, self.device)
        train_denoiser = with_net(denoiser, ddp)
        ema_denoiser = with_net(denoiser, ema)
        training = dict(o.to_dict(), world_size=self.world, batch_gpu=batch_gpu)
        config = s.config(training)

        logger = RunLogger(run_dir, resume_nimg=counters["nimg"] if resume else None, tensorboard=o.tensorboard,
                           use_wandb=wandb_id is not None) if self.rank == 0 else None
        with logger if logger is not None else contextlib.nullcontext(), self.signals():
            if self.rank == 0:
                if resume is None:
                    logger.write_options(training)
                    print(f"Run directory: {run_dir}")
                else:
                    print(f"Resuming from {resume} at {counters['nimg'] / 1000:.1f} kimg")
                n_params = sum(p.numel() for p in net.parameters())
                n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
                print(f"Network: {s.net_class}, {n_params:,} parameters ({n_train:,} trained); "
                      f"structure: generate {list(structure.latent_names)}, condition on {list(structure.observed_names)}")
                print(f"Batch {o.batch} = {self.world} processes x {rounds} rounds x {batch_gpu}; device {self.device}; "
                      f"training for {o.duration:g} Mimg")
            preview = self.preview_setup(s, cached, batch_gpu, run_dir, first=resume is None)
            self.loop(s, ddp, train_denoiser, ema, ema_denoiser, optimizer, scaler, maker, batches, counters,
                      rounds, batch_gpu, frozen, config, run_dir, logger, preview)
        return run_dir

    def init_weights(self, net, structure) -> list[str]:
        """--pretrained_weights / --transfer; returns the names of frozen parameters."""
        from vcdm.train import finetune

        o = self.opts
        if o.pretrained_weights:
            finetune.load_pretrained(o.pretrained_weights, net, freeze=o.freeze_pretrained, structure=structure)
            return [n for n, p in net.named_parameters() if not p.requires_grad]
        if o.transfer:
            finetune.transfer(o.transfer, net)
        return []

    def embedding_table(self, s: Setup) -> torch.Tensor:
        """Embeddings of every dataset image (no augmentation), computed once and cached beside the dataset."""
        from tqdm import tqdm

        from vcdm.embedders.base import cached_fit, image_batches

        emb, key = s.embedder, {"embedder": s.embedder.identity(), "data_key": s.data_key, "xflip": self.opts.xflip}

        def compute() -> dict[str, torch.Tensor]:
            n, bs = len(s.dataset), 64
            with torch.no_grad():
                out = [emb.embed(b.to(self.device)).cpu() for b in tqdm(
                    image_batches(s.dataset, batch_size=bs), total=-(-n // bs), desc="embedding the dataset",
                    disable=self.rank != 0)]
            return {"embeddings": torch.cat(out)}

        if self.rank != 0:
            dist.barrier()
        cache_dir = s.cache_dir if _writable_dir(s.cache_dir) else None
        table = cached_fit(cache_dir, f"embeddings-{emb.name}", key, compute)["embeddings"]
        if self.rank == 0:
            dist.barrier()
        return table.to(self.device)

    def preview_setup(self, s: Setup, cached, batch_gpu: int, run_dir: Path, first: bool) -> dict[str, Any] | None:
        """Fixed conditioning for sample grids (image models only: None otherwise)."""
        from vcdm.train.preview import conditioning, save_grid

        if s.structure.latent_names != ("image",) or not self.opts.sample:
            return None
        if self.rank != 0:
            return {}  # process 0 draws the grids; the others only join its error check
        n = min(batch_gpu, PREVIEW_MAX)
        maker = BatchMaker(s.structure, self.device, embedder=s.embedder, cached=cached)
        y, reals = conditioning(s.dataset, maker, n)
        if first and y is not None:
            save_grid(reals, run_dir / "samples-conditioning.png")
        return {"y": y, "n": n}

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
    def loop(self, s: Setup, ddp, train_denoiser, ema, ema_denoiser, optimizer, scaler, maker, batches, counters,
             rounds, batch_gpu, frozen, config, run_dir, logger, preview) -> None:
        o, device, structure = self.opts, self.device, s.structure
        net = s.denoiser.net
        per_rank = batch_gpu * rounds
        total_nimg = max(round(o.duration * 1e6), 1)
        autocast = (torch.autocast(device.type, dtype=torch.float16) if o.fp16 else
                    torch.autocast(device.type, dtype=torch.bfloat16) if o.bf16 else contextlib.nullcontext())
        names = structure.latent_names
        sizes = [structure.numel(n) for n in names]
        embedder_grads = s.embedder is not None and o.train_embedder and self.world > 1
        start_time = time.time() - counters["total_sec"]
        deadline = time.time() + o.time_limit if o.time_limit > 0 else math.inf
        tick_start_nimg, tick_start_time = counters["nimg"], time.time()
        tick_loss = torch.zeros(len(names) + 1, dtype=torch.float64)
        tick_steps = tick_nonfinite = 0
        maintenance = 0.0
        if self.rank == 0:
            print(f"Training from {counters['nimg'] / 1000:.1f} kimg to {total_nimg / 1000:.1f} kimg...", flush=True)

        while True:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
            for r in range(rounds):
                positions, indices, images, labels = next(batches)
                gen = torch.Generator(device).manual_seed(mix_seed(o.seed, int(positions[0])))
                sync = r == rounds - 1 or ddp is net
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    with torch.set_grad_enabled(o.train_embedder):  # float32, so cached embeddings match
                        batch = maker(indices, images, labels, gen)
                    with autocast:
                        loss = s.loss_fn(train_denoiser, batch.x, batch.y, batch.augment_labels, generator=gen)
                    loss = loss.float()
                    parts = loss.split(sizes, dim=1)
                    if o.equally_weight_tensors:
                        scalar = equally_weighted(loss, sizes) * o.ls
                    else:
                        scalar = loss.sum() * (o.ls / per_rank)
                    (scaler.scale(scalar) if scaler is not None else scalar).backward()
                with torch.no_grad():
                    step_loss[0] += loss.sum(dtype=torch.float64)
                    for i, p in enumerate(parts):
                        step_loss[i + 1] += p.sum(dtype=torch.float64)

            # One collective: loss sums and the stop flag.
            if self.stop_signal is None and time.time() >= deadline:
                self.stop_signal = "--time-limit"
            flags = [float(self.stop_signal is not None)]
            totals = dist.all_sum(step_loss.tolist() + flags, device)
            finite = all(math.isfinite(v) for v in totals[:-1])
            stop = totals[-1] > 0

            # Update weights.
            ramp = 1.0 if o.lr_rampup <= 0 else min(counters["nimg"] / max(o.lr_rampup * 1000, 1e-8), 1.0)
            for g in optimizer.param_groups:
                g["lr"] = o.lr * ramp
            if scaler is not None:
                scaler.unscale_(optimizer)
            if embedder_grads:
                for p in s.embedder.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(self.world)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

            # Update EMA.
            halflife = o.ema * 1e6
            if o.ema_rampup is not None and o.ema_rampup > 0 and not o.transfer:
                halflife = min(halflife, counters["nimg"] * o.ema_rampup)
            beta = 0.5 ** (o.batch / max(halflife, 1e-8))
            with torch.no_grad():
                for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p_net.detach().lerp(p_ema, beta))
                for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                    b_ema.copy_(b_net)

            counters["nimg"] += o.batch
            counters["position"] += o.batch
            tick_steps += 1
            if finite:
                counters["nonfinite"] = 0
                tick_loss += torch.tensor(totals[:-1], dtype=torch.float64)
            else:
                counters["nonfinite"] += 1
                tick_nonfinite += 1
            failed_nonfinite = o.max_nonfinite > 0 and counters["nonfinite"] >= o.max_nonfinite
            done = counters["nimg"] >= total_nimg or stop or failed_nonfinite
            if not done and counters["tick"] != 0 and counters["nimg"] < tick_start_nimg + o.tick * 1000:
                continue

            # Tick: report.
            tick_end_time = time.time()
            counters["total_sec"] = tick_end_time - start_time
            kimg = counters["nimg"] / 1000
            tick_nimg = counters["nimg"] - tick_start_nimg
            sec_per_kimg = (tick_end_time - tick_start_time) / max(tick_nimg, 1) * 1000
            ok_steps = tick_steps - tick_nonfinite
            n_el = max(ok_steps, 1) * o.batch
            record = {"tick": counters["tick"], "kimg": kimg, "nimg": counters["nimg"],
                      "loss": tick_loss[0].item() / (n_el * structure.latent_dim) if ok_steps else None,
                      **{f"loss/{n}": (tick_loss[i + 1].item() / (n_el * sizes[i]) if ok_steps else None)
                         for i, n in enumerate(names)},
                      "nonfinite_steps": tick_nonfinite, "lr": o.lr * ramp, "ema_halflife_kimg": halflife / 1000,
                      "sec_per_tick": tick_end_time - tick_start_time, "sec_per_kimg": sec_per_kimg,
                      "maintenance_sec": maintenance, "total_sec": counters["total_sec"]}
            if device.type == "cuda":
                record["maxmem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            else:
                record["rss_gb"] = rss_gb()
            if self.rank == 0:
                eta = (total_nimg - counters["nimg"]) / 1000 * sec_per_kimg
                mem = f"maxmem {record['maxmem_gb']:.2f}" if "maxmem_gb" in record else f"rss {record['rss_gb']:.2f}"
                loss_txt = f"{record['loss']:.4f}" if record["loss"] is not None else "non-finite"
                print(f"tick {counters['tick']:<5d} kimg {kimg:<9.1f} time {format_time(counters['total_sec']):<10s} "
                      f"sec/tick {record['sec_per_tick']:<7.1f} sec/kimg {sec_per_kimg:<8.2f} "
                      f"eta {format_time(eta) if not done else '-':<9s} {mem} loss {loss_txt}", flush=True)
                logger.tick(record)

            # Tick: save.
            tick = counters["tick"]
            counters["tick"] += 1  # the state records the next tick
            kimg_name = counters["nimg"] // 1000
            if done or (o.snap and tick % o.snap == 0):
                path = run_dir / f"network-snapshot-{kimg_name:06d}.safetensors"
                self.save(path, lambda: self.write_snapshot(path, ema, s, config, counters))
            if done or (o.dump and tick % o.dump == 0 and tick != 0):
                rng = dist.gather_objects(capture_rng(counters["position"]))
                state = {"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else {},
                         "embedder": s.embedder.state_dict() if s.embedder is not None and o.train_embedder else {},
                         "rng": rng, "counters": dict(counters), "frozen": frozen,
                         "options": json.dumps(o.to_dict())}
                self.save(run_dir / state_name(kimg_name), lambda: save_state(run_dir / state_name(kimg_name), state))
                del state
            if preview is not None and o.sample and (done or tick % o.sample == 0):
                path = run_dir / f"samples-{kimg_name:06d}.png"
                self.save(path, lambda: self.write_preview(ema_denoiser, preview, path, counters["nimg"], logger))

            if failed_nonfinite:
                raise TrainingError(f"{counters['nonfinite']} consecutive non-finite losses at {kimg:.1f} kimg; "
                                    f"stopped and saved {run_dir / state_name(kimg_name)} (lower --lr, try --bf16 "
                                    f"instead of --fp16, or check the data)")
            if stop and self.rank == 0:
                print(f"Stopped by {self.stop_signal or 'a signal'} at {kimg:.1f} kimg; resume with --resume={run_dir}",
                      flush=True)
            if done:
                break
            tick_start_nimg, tick_start_time = counters["nimg"], time.time()
            maintenance = tick_start_time - tick_end_time
            tick_loss.zero_()
            tick_steps = tick_nonfinite = 0

        if self.rank == 0:
            print("Exiting...", flush=True)

    def save(self, path: Path, write) -> None:
        """Run `write` on process 0; every process stops with one clear error if it failed."""
        error = ""
        if self.rank == 0:
            try:
                write()
            except OSError as e:
                what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                error = (f"cannot write {path} ({what}); earlier snapshots and training states are intact; "
                         f"free space, then rerun with --resume=auto")
        error = dist.broadcast_object(error)
        if error:
            raise TrainingError(error)

    def write_snapshot(self, path: Path, ema, s: Setup, config: dict, counters: dict) -> None:
        from vcdm.checkpoints import save_checkpoint

        tensors = {"net": ema.state_dict()}
        if s.embedder is not None:
            extra = s.embedder.export_state()
            if extra:
                tensors["embedder"] = extra
        save_checkpoint(path, tensors, dict(config, training=dict(config["training"], nimg=counters["nimg"])))

    def write_preview(self, ema_denoiser, preview: dict, path: Path, nimg: int, logger) -> None:
        from vcdm.train.preview import sample_images, save_grid

        save_grid(sample_images(ema_denoiser, preview["y"], preview["n"], self.device), path)
        logger.image("samples", path, nimg)


def _quiet_worker(_: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM, which Ctrl-C and torchrun send to the whole process
    group: the main process finishes its step, saves, and then stops them (or they notice it is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _used(structure) -> set[str]:
    return {n for n, e in zip(structure.names, structure.exist) if e}


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False


def _matches(run_dir: Path, opts: TrainOptions) -> bool:
    """Whether a run directory was made by a run with the same data, structure and model options."""
    try:
        recorded = json.loads((run_dir / "training_options.json").read_text())
    except (OSError, ValueError):
        return False
    current = opts.to_dict()
    return all(recorded.get(k) == current.get(k) for k in RESUME_MATCH) and any(
        STATE_RE.fullmatch(p.name) for p in run_dir.glob("training-state-*.pt"))
