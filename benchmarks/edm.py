"""NVlabs/edm's own code as the reference of the speed benchmarks, run from a clone the user points at.

vcdm does not ship EDM's code (its licence is CC BY-NC-SA); these functions import it from ``--edm-root``
(a clone of https://github.com/NVlabs/edm) in the process that needs it, so the reference numbers
come from EDM's ``generate.py`` and its training components, not from a re-implementation:

    python benchmarks/edm.py make-pickle --edm-root EDM --out ddpmpp64.pkl     # EDM's DDPM++ 64x64, random weights
    python benchmarks/edm.py generate --edm-root EDM --network ddpmpp64.pkl --outdir D --seeds 8 --steps 8 --batch 8

``generate`` calls EDM's ``generate.py`` command function itself (its ``edm_sampler``, its per-seed noise,
its PNG writing) with ``device=cpu``; only its process-group start-up is replaced by a single-process
gloo group, since EDM's asks for NCCL and a CUDA device. ``make-pickle`` builds EDMPrecond with EDM's
64x64 DDPM++ configuration (``train.py --arch=ddpmpp --cres=1,2,2,2 --augment`` on FFHQ/AFHQ 64x64), with the
zero-initialised layers given small random weights so every layer shapes the output, and pickles it as
EDM's training loop does (``{'ema': net}``). Such a pickle embeds EDM's source: keep it out of any repository.
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

DDPMPP_64 = dict(img_resolution=64, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                 augment_dim=9, embedding_type="positional", encoder_type="standard", decoder_type="standard",
                 channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[1, 2, 2, 2],
                 dropout=0.05)
AUGMENT = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # EDM's --augment


@contextlib.contextmanager
def edm_on_path(root: str | Path) -> Iterator[Path]:
    """EDM's clone on sys.path (its modules are top-level: dnnlib, torch_utils, training, generate)."""
    root = Path(root).resolve()
    if not (root / "generate.py").is_file() or not (root / "training" / "networks.py").is_file():
        raise SystemExit(f"Error: --edm-root {root}: not a clone of NVlabs/edm (no generate.py, training/networks.py)")
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))


def ddpmpp64(edm_root: str | Path, seed: int = 0) -> torch.nn.Module:
    """EDM's EDMPrecond with its 64x64 DDPM++ config, seeded; zero-initialised weights made small and random."""
    with edm_on_path(edm_root):
        from training.networks import EDMPrecond

        torch.manual_seed(seed)
        net = EDMPrecond(**DDPMPP_64)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return net


def make_pickle(edm_root: str | Path, out: Path, seed: int = 0) -> Path:
    net = ddpmpp64(edm_root, seed).eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with edm_on_path(edm_root), open(tmp, "wb") as f:
            pickle.dump({"ema": net}, f)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(edm_root: str | Path, network: Path, outdir: Path, seeds: int, steps: int, batch: int) -> None:
    """EDM's generate.py on the CPU: Heun's sampler at its defaults (no churn), one PNG per seed."""
    with edm_on_path(edm_root):
        import generate as edm_generate
        from torch_utils import distributed

        def init() -> None:  # EDM's asks for NCCL and sets a CUDA device
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                                 rank=0, world_size=1)

        distributed.init = init
        try:
            edm_generate.main.callback(
                network_pkl=str(network), outdir=str(outdir), subdirs=False, seeds=list(range(seeds)), class_idx=None,
                max_batch_size=batch, device=torch.device("cpu"), num_steps=steps, sigma_min=None, sigma_max=None,
                rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, solver=None, discretization=None,
                schedule=None, scaling=None)
        finally:
            torch.distributed.destroy_process_group()


class TrainingStep:
    """EDM's training step on random tensors: its AugmentPipe and EDMLoss on its EDMPrecond, the loss
    reduced and back-propagated as its training loop does, Adam (its defaults: lr 1e-3, eps 1e-8) and
    the EMA update ``p_ema = lerp(p_net, p_ema, beta)``."""

    def __init__(self, edm_root: str | Path, batch: int, seed: int = 0, ema_beta: float = 0.999):
        with edm_on_path(edm_root):
            from training.augment import AugmentPipe
            from training.loss import EDMLoss

            self.net = ddpmpp64(edm_root, seed).train().requires_grad_(True)
            self.loss_fn, self.augment = EDMLoss(), AugmentPipe(**AUGMENT)
        self.ema = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        self.batch, self.ema_beta = batch, ema_beta
        data = torch.Generator().manual_seed(seed + 1)
        self.images = torch.rand(batch, 3, 64, 64, generator=data) * 2 - 1

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(net=self.net, images=self.images, labels=None, augment_pipe=self.augment)
        loss.sum().mul(1 / self.batch).backward()
        for p in self.net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt.step()
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                self.ema[name].copy_(p.detach().lerp(self.ema[name], self.ema_beta))
        return loss.mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-pickle", help="EDM's DDPM++ 64x64 with random weights, pickled by EDM's code")
    mk.add_argument("--edm-root", required=True)
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--seed", type=int, default=0)
    gen = sub.add_parser("generate", help="EDM's generate.py on the CPU")
    gen.add_argument("--edm-root", required=True)
    gen.add_argument("--network", type=Path, required=True)
    gen.add_argument("--outdir", type=Path, required=True)
    for flag in ("--seeds", "--steps", "--batch"):
        gen.add_argument(flag, type=int, required=True)
    a: Any = p.parse_args(argv)
    if a.cmd == "make-pickle":
        print(make_pickle(a.edm_root, a.out, a.seed))
    else:
        generate(a.edm_root, a.network, a.outdir, a.seeds, a.steps, a.batch)


if __name__ == "__main__":
    main()
