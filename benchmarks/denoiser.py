"""Speed of one denoiser evaluation (DDPM++ 64x64, the original release's conditional image model) per inference path.

    python benchmarks/denoiser.py                  # batch 8 and 32, 3 repetitions, every path (about an hour
                                                   # on 2 busy CPU cores, most of it compiling)
    python benchmarks/denoiser.py --quick          # batch 8, 2 repetitions, compile only channels_last+bf16
    python benchmarks/denoiser.py --heun           # also sample 18-step Heun per path: sampling images/s and
                                                   # how far the samples move from float32's
    python benchmarks/denoiser.py --tiny --quick   # smoke run on a small network (seconds)
    python benchmarks/denoiser.py --edm2-root EDM2 --edm2-only --batch 4 --reps 2
                                                   # EDM2's U-Net 64x64 (--edm2-preset, default edm2-img64-s)
                                                   # per eager path, against EDM2's own code in the same run

The network is the full 61.9 M-parameter DDPM++ (preset ``ddpmpp``, 512-d conditioning embedding, 9
augment labels) inside the EDM Denoiser, with random weights whose zero-initialised output layers are
redrawn at the normal scale, so the network's output is not ~0 and the accuracy check means something.
Each path is an ``InferenceSettings`` of ``vcdm.perf``; the reference is float32 eager in the same run.
Timings are interleaved (every path once, then again, ...), so load from other processes on a shared
machine affects every path alike; the "spread" column says how much repetitions disagreed.
Accuracy: the largest |D_path - D_fp32| over the batch (data units: images in [-1, 1], one 8-bit level
is 0.0078) and the RMS of the network-output difference relative to the RMS of the network output,
at per-sample noise levels spanning sigma = 0.002 ... 80.
Compile columns: the first call's time beyond one evaluation, with this run's fresh inductor cache
("cold"; at batch 32 it already holds batch 8's kernels) and again from that on-disk cache ("warm", what
a later process pays); "pays off after" = cold compile time / time saved per evaluation against the
fastest eager path.
EDM2 (``--edm2-root``, a clone of NVlabs/edm2; vcdm does not ship its code): vcdm's EDM2UNet of the
preset, class-conditional (1000 classes, one-hot labels), in the EDM Denoiser, against EDM2's own
``training/networks_edm2.Precond`` holding the same weights, imported from the clone in this process and
run as EDM2 runs it on a CPU (float32). The weights are EDM2's random initialisation with the gains
(initialised at 0) set to 1, so every block contributes. The reference column is EDM2's code; accuracy is
against its output.
On a machine shared with other jobs set OMP_WAIT_POLICY=PASSIVE (run_all.py does): with libgomp's
default busy-waiting, 2-thread runs there were up to 3x slower than 1-thread runs, and erratic.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from common import add_common_args, describe, first_call, machine, markdown_table, measure, report, row, timing_row
from vcdm.data.structure import Structure
from vcdm.diffusion.rng import StackedRandomGenerator
from vcdm.diffusion import karras_sigmas, sample
from vcdm.nets import build_network
from vcdm.nets.layers import Conv2d
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import ARCHS, preset
from vcdm.perf import FP32, InferenceSettings, autocast, default_settings, prepare

EMBED_DIM = 512
BF16 = torch.bfloat16
EAGER = [FP32, InferenceSettings(channels_last=True), InferenceSettings(autocast_dtype=BF16),
         InferenceSettings(channels_last=True, autocast_dtype=BF16)]
COMPILED = [InferenceSettings(compile=True), InferenceSettings(channels_last=True, autocast_dtype=BF16, compile=True)]


def unzero_init(net: torch.nn.Module) -> torch.nn.Module:
    """Scale the layers EDM initialises at 1e-5 (block outputs, attention projections, output conv) back
    to their normal xavier scale, so every block contributes and the output has unit-order magnitude."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Conv2d) and m.weight is not None and m.weight.abs().max() < 1e-3:
                m.weight.mul_(1e5)
    return net


def image_denoiser(tiny: bool) -> Denoiser:
    res, embed = (16, 32) if tiny else (64, EMBED_DIM)
    structure = Structure.from_flags({"image": (3, res, res), "embedding": (embed,)}, "1,1", "0,1")
    cls, kwargs = preset("ddpmpp", resolution=res, channels=3, embed_dim=embed, label_dim=embed, augment_dim=9,
                         **(dict(cbase=32, cres=[1, 2]) if tiny else {}))
    torch.manual_seed(0)
    return Denoiser(unzero_init(build_network(cls, kwargs)), structure).eval()


def prior_denoiser(tiny: bool) -> Denoiser:
    embed = 32 if tiny else EMBED_DIM
    structure = Structure.from_flags({"embedding": (embed,)}, "1", "0")
    cls, kwargs = preset("dalle2", resolution=0, channels=0, embed_dim=embed, label_dim=0, augment_dim=0)
    if tiny:
        kwargs.update(dim=64, depth=1, heads=2, dim_head=32)
    torch.manual_seed(0)
    return Denoiser(build_network(cls, kwargs), structure).eval()


def inputs(denoiser: Denoiser, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Noisy samples at per-sample sigmas spanning 0.002 ... 80 (EDM's range), and unit-norm conditions."""
    g = torch.Generator().manual_seed(batch)
    sigma = karras_sigmas(batch, 0.002, 80.0).float()
    x = torch.randn(batch, denoiser.structure.latent_dim, generator=g) * (0.5 ** 2 + sigma[:, None] ** 2).sqrt()
    obs = denoiser.structure.observed_dim
    y = torch.nn.functional.normalize(torch.randn(batch, obs, generator=g), dim=1) * math.sqrt(obs) if obs else None
    return x, sigma, y


def evaluator(denoiser: Denoiser, settings: InferenceSettings, x, sigma, y, out: dict):
    def fn():
        with torch.no_grad(), autocast(settings, "cpu"):
            out[settings.name] = denoiser(x, sigma, y)
    return fn


def accuracy(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, d_ref: torch.Tensor, d: torch.Tensor):
    """max |D - D_ref| and RMS(F - F_ref) / RMS(F_ref), with F = (D - c_skip x) / c_out the network output."""
    c_skip, c_out, _, _ = denoiser.coefficients(sigma[:, None])
    f_ref = (d_ref.double() - c_skip * x) / c_out
    df = (d.double() - d_ref.double()) / c_out
    return (d - d_ref).abs().max().item(), (df.square().mean().sqrt() / f_ref.square().mean().sqrt()).item()


def bench_images(args, batch: int, paths: list[InferenceSettings], table: list, rows: list, samples: dict) -> None:
    base = image_denoiser(args.tiny)
    x, sigma, y = inputs(base, batch)
    models, out, cases, compile_s = {}, {}, {}, {}
    for s in paths:
        models[s.name] = prepare(copy.deepcopy(base), s)
        cases[s.name] = evaluator(models[s.name], s, x, sigma, y, out)
    # First call = trace + compile + one evaluation: once with the fresh inductor cache (cold, as a new
    # machine's first run), then, after forgetting the compiled code, again from the on-disk cache (warm).
    for cache in ("cold", "warm"):
        torch._dynamo.reset()  # also keeps batch sizes from sharing (and so generalising) compiled graphs
        for s in (s for s in paths if s.compile):
            models[s.name] = prepare(copy.deepcopy(base), s)
            cases[s.name] = evaluator(models[s.name], s, x, sigma, y, out)
            compile_s[s.name, cache] = first_call(cases[s.name])[1].median
            print(f"  compiled {s.name} at batch {batch} in {compile_s[s.name, cache]:.0f} s ({cache} cache)", flush=True)
    times = measure(cases, reps=args.reps, warmup=1)
    ref = times[FP32.name].median
    best_eager = min(times[s.name].median for s in paths if not s.compile)
    for s in paths:
        sec = times[s.name].median
        max_abs, rel = accuracy(base, x, sigma, out[FP32.name], out[s.name])
        cold = warm = payoff = None
        if s.compile:
            cold, warm = (max(compile_s[s.name, c] - sec, 0.0) for c in ("cold", "warm"))
            payoff = math.ceil(cold / (best_eager - sec)) if sec < best_eager else None
        table.append(["DDPM++ image model", batch, s.name, sec * 1e3, batch / sec, ref / sec, f"{times[s.name].spread:.0%}",
                      cold, warm, payoff, max_abs, rel])
        is_ref = s == FP32
        pays = f"pays off after {payoff} evals" if payoff else "never pays off at this batch size"
        rows.append(timing_row(f"denoiser b{batch} {s.name}", times[s.name], count=batch, unit="images/s",
                        reference=None if is_ref else f"denoiser b{batch} fp32", ratio=None if is_ref else ref / sec,
                        note="reference" if is_ref else f"max|dD| {max_abs:.2g}, rel rms dF {rel:.2g}" +
                        (f", compile {cold:.0f} s cold / {warm:.0f} s warm cache, {pays}" if s.compile else "")))
    if args.heun and batch == args.batch[0]:
        heun(args, base, models, paths, batch, table_rows=samples)


def heun(args, base: Denoiser, models: dict, paths: list[InferenceSettings], batch: int, table_rows: dict) -> None:
    """Deterministic Heun from the same seeds per path: sampling speed and how far the samples move."""
    latents = StackedRandomGenerator("cpu", range(batch)).randn([batch, base.structure.latent_dim])
    _, _, y = inputs(base, batch)
    results = {}
    for s in paths:
        with torch.no_grad(), autocast(s, "cpu"):
            out, timing = first_call(lambda: sample(models[s.name], latents, y, num_steps=args.heun_steps))
        results[s.name] = out, timing.median
        print(f"  heun {s.name}: {timing.median:.1f} s", flush=True)
    u8 = lambda v: ((v + 1) * 127.5).round().clip(0, 255)
    ref, ref_sec = results[FP32.name]
    for s in paths:
        out, sec = results[s.name]
        diff = (out - ref).abs()
        table_rows[s.name] = [batch, args.heun_steps, sec, batch / sec, ref_sec / sec, diff.max().item(),
                              diff.square().mean().sqrt().item(), (u8(out) != u8(ref)).double().mean().item(),
                              (u8(out) - u8(ref)).abs().max().item()]


def bench_prior(args, batch: int, table: list, rows: list) -> None:
    base = prior_denoiser(args.tiny)
    x, sigma, y = inputs(base, batch)
    paths = [FP32, InferenceSettings(autocast_dtype=BF16)]
    out = {}
    cases = {s.name: evaluator(base, s, x, sigma, None, out) for s in paths}
    times = measure(cases, reps=max(args.reps, 5), warmup=2)
    ref = times[FP32.name].median
    for s in paths:
        sec = times[s.name].median
        max_abs, rel = accuracy(base, x, sigma, out[FP32.name], out[s.name])
        table.append(["prior (dalle2)", batch, s.name, sec * 1e3, batch / sec, ref / sec, f"{times[s.name].spread:.0%}",
                      None, None, None, max_abs, rel])
        is_ref = s == FP32
        rows.append(timing_row(f"prior b{batch} {s.name}", times[s.name], count=1, unit="evaluations/s",
                        reference=None if is_ref else f"prior b{batch} fp32", ratio=None if is_ref else ref / sec,
                        note=f"{batch / sec:.0f} samples/s" + ("" if is_ref else f", max|dD| {max_abs:.2g}")))


@contextlib.contextmanager
def edm2_on_path(root: str | Path) -> Iterator[None]:
    """EDM2's clone on sys.path (its modules are top-level: dnnlib, torch_utils, training)."""
    root = Path(root).resolve()
    if not (root / "training" / "networks_edm2.py").is_file():
        raise SystemExit(f"Error: --edm2-root {root}: not a clone of NVlabs/edm2 (no training/networks_edm2.py)")
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def edm2_denoisers(root: str, arch: str, tiny: bool) -> tuple[Denoiser, torch.nn.Module]:
    """vcdm's EDM2 image model of preset `arch` and EDM2's own Precond with the same weights."""
    res, labels = (16, 10) if tiny else (64, 1000)
    structure = Structure.from_flags({"image": (3, res, res), "label": (labels,)}, "1,1", "0,1")
    cls, kwargs = preset(arch, resolution=res, channels=3, embed_dim=0, label_dim=labels, augment_dim=0,
                         **(dict(cbase=32, cres=[1, 2]) if tiny else {}))
    torch.manual_seed(0)
    net = build_network(cls, kwargs)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:  # out_gain and each block's emb_gain
                p.fill_(1.0)
    with edm2_on_path(root):
        from training.networks_edm2 import Precond

        ref = Precond(img_resolution=res, img_channels=3, label_dim=labels, use_fp16=False,
                      model_channels=kwargs["model_channels"], channel_mult=kwargs["channel_mult"])
    missing = ref.load_state_dict({f"unet.{k}": v for k, v in net.state_dict().items()}, strict=False).missing_keys
    if any(not k.startswith("logvar_") for k in missing):
        raise SystemExit(f"Error: --edm2-root: EDM2's network has parameters vcdm's lacks: {missing[:3]}")
    return Denoiser(net, structure).eval(), ref.eval()


def bench_edm2(args, batch: int, table: list, rows: list) -> tuple[int, str]:
    """vcdm's eager paths on EDM2's U-Net against EDM2's own code (float32); returns the parameter count
    and the name of vcdm's default inference settings for it."""
    base, ref = edm2_denoisers(args.edm2_root, args.edm2_preset, args.tiny)
    x, sigma, _ = inputs(base, batch)
    y = torch.nn.functional.one_hot(torch.arange(batch) * 37 % base.net.label_dim, base.net.label_dim).float()
    res = base.net.img_resolution
    out, cases = {}, {}

    def reference():
        with torch.no_grad():
            out["EDM2's code"] = ref(x.reshape(batch, 3, res, res), sigma, y).reshape(batch, -1)

    cases["EDM2's code"] = reference
    for s in EAGER:
        cases[s.name] = evaluator(prepare(copy.deepcopy(base), s), s, x, sigma, y, out)
    times = measure(cases, reps=args.reps, warmup=1)
    ref_sec = times["EDM2's code"].median
    name = f"EDM2 {args.edm2_preset.removeprefix('edm2-')}"
    for path in cases:
        sec = times[path].median
        max_abs, rel = accuracy(base, x, sigma, out["EDM2's code"], out[path])
        table.append([name, batch, path, sec * 1e3, batch / sec, ref_sec / sec, f"{times[path].spread:.0%}", max_abs, rel])
        is_ref = path == "EDM2's code"
        rows.append(timing_row(f"edm2 b{batch} {path}", times[path], count=batch, unit="images/s",
                        reference=None if is_ref else f"edm2 b{batch} EDM2's code", ratio=None if is_ref else ref_sec / sec,
                        note="reference: NVlabs/edm2's networks_edm2.Precond, float32" if is_ref
                        else f"max|dD| {max_abs:.2g}, rel rms dF {rel:.2g} vs EDM2's code"))
    return sum(p.numel() for p in base.net.parameters()), default_settings("cpu", base).name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=None,
                   help="batch sizes, comma-separated (default 8,32; --quick: 8)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per path (default 3; --quick: 2)")
    p.add_argument("--compile", choices=["all", "fast", "none"], default=None,
                   help="which compiled paths: all (fp32 and channels_last+bf16; default), fast (channels_last+bf16; "
                        "--quick's default), none")
    p.add_argument("--heun", action="store_true", help="also time 18-step Heun sampling per path at the first batch size")
    p.add_argument("--heun-steps", type=int, default=18, help="Heun steps for --heun (default 18)")
    p.add_argument("--tiny", action="store_true", help="small networks (16x16 DDPM++, 1-layer prior): a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--edm2-root", default=None, metavar="DIR",
                   help="a clone of NVlabs/edm2: also time EDM2's U-Net against EDM2's own code")
    p.add_argument("--edm2-preset", default="edm2-img64-s", choices=[a for a in ARCHS if a.startswith("edm2-")],
                   help="the EDM2 network to time (default edm2-img64-s)")
    p.add_argument("--edm2-only", action="store_true", help="time only the EDM2 networks (needs --edm2-root)")
    args = p.parse_args()
    if args.edm2_only and not args.edm2_root:
        p.error("--edm2-only needs --edm2-root")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or ([8] if args.quick else [8, 32])
    cache_dir = tempfile.TemporaryDirectory(prefix="vcdm-inductor-")  # a cold inductor cache for this run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir.name
    args.reps = args.reps or (2 if args.quick else 3)
    compiled = {"all": COMPILED, "fast": COMPILED[1:], "none": []}[args.compile or ("fast" if args.quick else "all")]
    paths = EAGER + compiled

    start = time.perf_counter()
    info = machine("cpu")
    print(f"machine: {describe(info)}", flush=True)
    params = sum(p.numel() for p in image_denoiser(args.tiny).parameters())
    table, rows, samples, edm2_table, edm2_params, edm2_default = [], [], {}, [], None, None
    for batch in args.batch:
        if not args.edm2_only:
            print(f"batch {batch}: {', '.join(s.name for s in paths)}", flush=True)
            bench_images(args, batch, paths, table, rows, samples)
            bench_prior(args, batch, table, rows)
        if args.edm2_root:
            print(f"batch {batch}: {args.edm2_preset}, EDM2's code and {', '.join(s.name for s in EAGER)}", flush=True)
            edm2_params, edm2_default = bench_edm2(args, batch, edm2_table, rows)
    info_end = machine("cpu")

    if edm2_table:
        print(f"\n## EDM2 {args.edm2_preset} ({'tiny: 16x16, cbase 32, 10 classes' if args.tiny else '64x64, 1000 classes'}, "
              f"{edm2_params / 1e6:.1f} M params; reference: EDM2's own code, float32, same run)\n")
        print(markdown_table(["network", "batch", "path", "ms/eval", "images/s", "vs EDM2's code", "spread",
                              "max abs dD", "rel RMS dF"], edm2_table))
        print(f"\ndefault settings here (vcdm.perf.default_settings) for this EDM2 network: {edm2_default}")
    if table:
        print(f"\n## Denoiser evaluation ({'tiny test networks' if args.tiny else f'DDPM++ 64x64, {params / 1e6:.1f} M params'}; "
              f"reference: fp32 eager, same run)\n")
        print(markdown_table(["network", "batch", "path", "ms/eval", "images/s", "vs fp32", "spread", "compile s (cold)",
                              "compile s (warm)", "pays off after (evals, cold, vs best eager)", "max abs dD", "rel RMS dF"],
                             table))
    if samples:
        print(f"\n## {args.heun_steps}-step Heun sampling, batch {args.batch[0]} (seeds 0-{args.batch[0] - 1}), "
              "compared with fp32 eager (one run per path, in sequence: for speed under changing load trust the "
              "interleaved table above; this table is for how far the samples move)\n")
        print(markdown_table(["path", "batch", "steps", "seconds", "images/s", "vs fp32", "max abs dx", "rms dx",
                              "8-bit values changed", "max 8-bit change"],
                             [[name, *r[:7], f"{r[7]:.1%}", r[8]] for name, r in samples.items()]))
        for name, r in samples.items():
            is_ref = name == FP32.name
            rows.append(row(f"heun{args.heun_steps} b{r[0]} {name}", r[3], "images/s", reps=1,
                            reference=None if is_ref else f"heun{args.heun_steps} b{r[0]} fp32",
                            ratio=None if is_ref else r[4],
                            note=f"max|dx| {r[5]:.2g}, {r[7]:.1%} of 8-bit values changed"))
    if table:
        print(f"\ndefault settings here (vcdm.perf.default_settings): image model "
              f"{default_settings('cpu', image_denoiser(args.tiny)).name}, prior {default_settings('cpu', prior_denoiser(args.tiny)).name}")
    print(f"load average: {info['load_avg_1m']} at start, {info_end['load_avg_1m']} at end, on {info['cpus']} CPUs "
          f"(other processes share them; compare ratios, not absolute numbers)")
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")
    report(args, "denoiser", rows, info, wall, params=params, table=table, heun=samples, edm2_table=edm2_table,
           edm2_params=edm2_params)


if __name__ == "__main__":
    main()
