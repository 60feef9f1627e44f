"""Two-stage sampling speed: the default prior (dalle2) + a DDPM++ 64x64 image model, random weights.

    python benchmarks/sample.py [--images 8] [--steps 2] [--device cpu] [--quick] [--json out.json]
    python benchmarks/sample.py --load [--reps 3] [--steps 8]    # whole processes, idle and with a busy core
    python benchmarks/sample.py --load --edm-root EDM --steps 8  # ... against NVlabs/edm's own generate.py

Runs both stages exactly as `vcdm sample` does (per-seed noise, files written) with few Heun steps,
then extrapolates to the original release's 40 steps (79 evaluations per stage) by adding the missing
evaluations, each timed on its own as a bare network call at the same batch size. It does so twice:
with the default inference settings (vcdm.perf.default_settings for each network on this device) and,
as the reference, with both networks in float32 eager (--fp32 --no-channels-last). The fast preset
(``--preset fast``: UniPC, 12 evaluations per stage) is extrapolated the same way and compared with the
release's setting (40 Heun steps with churn = 79 evaluations per stage); its FD against that setting's is
in benchmarks/solvers.py's results.

--load instead times whole processes (benchmarks/wholeprocess.py): `vcdm generate` with its defaults vs
EDM's own generate.py (with --edm-root, a clone of NVlabs/edm; the network is then pickled by EDM's code
and imported with `vcdm import-edm`) or else a plain float32 eager Heun sampler, on an unconditional
DDPM++ 64x64 (EDM's 64x64 config, random weights), the same steps, idle and with a synthetic process
keeping one core busy, --reps interleaved repetitions each, reporting min / median / max and the pixel
difference between the two outputs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import wholeprocess
from common import add_common_args, machine, measure, measure_one, report, row
from vcdm import perf
from vcdm.checkpoints import CheckpointConfig, save_checkpoint
from vcdm.data.structure import Structure
from vcdm.diffusion.settings import PRESETS, evaluations
from vcdm.generate import Conditioning, InferenceChoices, RunOptions, SamplerOptions, generate, load_model
from vcdm.generate.options import inference_settings
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

EMBED_DIM = 512  # CLIP ViT-B/32
RELEASE_NFE = 79  # the release's 40 Heun steps with churn
FAST_NFE = evaluations(PRESETS["fast"]["sampler"], PRESETS["fast"]["num_steps"])  # --preset fast
PATHS = {"default": InferenceChoices(), "fp32": perf.FP32}  # how generate() evaluates; fp32 is the reference


def write_model(path: Path, arch: str, exist: str, observed: str, cbase: int | None = None) -> Path:
    names = {"image": (3, 64, 64), "embedding": (EMBED_DIM,)} if exist != "1" else {"image": (3, 64, 64)}
    structure = Structure.from_flags(names, exist, observed)
    unet = dict(cres=[1, 2, 2, 2], cbase=cbase) if arch == "ddpmpp" else {}  # EDM's 64x64 config
    cls, kwargs = preset(arch, resolution=64, channels=3, embed_dim=EMBED_DIM, label_dim=structure.observed_dim,
                         augment_dim=0, **unet)
    net = build_network(cls, kwargs)
    denoiser = Denoiser(net, structure)
    config = CheckpointConfig(cls, kwargs, denoiser.config(), structure.to_dict())
    save_checkpoint(path, {"net": net.state_dict()}, config)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)  # --quick: the defaults below, which are already small
    p.add_argument("--images", type=int, default=8, help="images to sample (default 8, one batch)")
    p.add_argument("--steps", type=int, default=2, help="Heun steps per stage (default 2; the release uses 40)")
    p.add_argument("--batch", type=int, default=None, help="maximum batch size (default: all images in one batch)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--load", action="store_true", help="whole processes, idle and with one core busy (see above)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case, interleaved (default 3; --quick 2)")
    p.add_argument("--cbase", type=int, default=None, help="--load: U-Net width (default 128, EDM's; --quick 32)")
    p.add_argument("--baseline-omp-wait-policy", default=None, metavar="POLICY",
                   help="--load: OMP_WAIT_POLICY of the baseline's process (default: unset, as EDM's)")
    p.add_argument("--edm-root", default=None, metavar="DIR",
                   help="--load: a clone of NVlabs/edm; its generate.py is then the reference (see benchmarks/edm.py)")
    args = p.parse_args()
    if args.load:
        return load_main(args)
    device = torch.device(args.device)
    opts = SamplerOptions(num_steps=args.steps, S_churn=50, S_noise=1.007)
    seeds = list(range(args.images))
    batch = min(args.batch or args.images, args.images)
    info, start = machine(device), time.perf_counter()

    reps = args.reps or (2 if args.quick else 3)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        files = (write_model(tmp / "prior.safetensors", "dalle2", "0,1", "0,0"),
                 write_model(tmp / "image.safetensors", "ddpmpp", "1,1", "0,1"))
        # A copy of both networks per path: generate() prepares a network for its path (memory format).
        models = {label: [load_model(f, device) for f in files] for label in PATHS}
        fresh = itertools.count()  # every run writes into a new folder (generate skips seeds already there)
        stages = {}
        for label, inference in PATHS.items():
            prior, image = models[label]
            # The image stage reads the embeddings of the warm-up round's prior stage.
            emb = tmp / f"emb-{label}-warm-up"

            def prior_stage(prior=prior, inference=inference, emb=emb) -> None:
                out = emb if not emb.exists() else tmp / f"emb-{next(fresh)}"
                generate(prior, seeds, opts=opts, run=RunOptions(out, batch, progress=False), device=device,
                         inference=inference)

            def image_stage(image=image, inference=inference, emb=emb) -> None:
                generate(image, seeds, opts=opts, cond=Conditioning(load_obs_from=emb),
                         run=RunOptions(tmp / f"img-{next(fresh)}", batch, progress=False), device=device,
                         inference=inference)

            stages[label, "prior"], stages[label, "image"] = prior_stage, image_stage
        times = measure({f"{label} {stage}": fn for (label, stage), fn in stages.items()}, reps=reps, warmup=1,
                        device=device)
        for label, inference in PATHS.items():
            prior, image = models[label]
            settings = {k: inference_settings(inference, device, m.denoiser)
                        for k, m in (("prior", prior), ("image", image))}
            per_eval = {k: evaluate(perf.prepare(m.denoiser, settings[k]), m.structure, batch, device, settings[k])
                        for k, m in (("prior", prior), ("image", image))}
            runs[label] = ({k: times[f"{label} {k}"].median for k in ("prior", "image")}, per_eval, settings)

    batches = -(-args.images // batch)
    params = {k: sum(p.numel() for p in m.denoiser.parameters()) / 1e6 for k, m in (("prior", prior), ("image", image))}
    print(f"device {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.images} images, "
          f"batch {batch}, medians of {reps} interleaved runs per stage; prior (dalle2) {params['prior']:.1f} M params, DDPM++ 64x64 {params['image']:.1f} M params")
    rates, rows = {}, []
    for label, (measured, per_eval, settings) in runs.items():
        # Extrapolation: the per-batch network time scales with the evaluation count, the rest stays.
        missing = evaluations("edm", 40) - evaluations("edm", args.steps)
        at40 = {k: measured[k] + missing * batches * per_eval[k] for k in measured}
        names = f"prior {settings['prior'].name}, image model {settings['image'].name}"
        print(f"\n{label} ({names}): one evaluation at batch {batch}: prior {per_eval['prior']:.3f} s, "
              f"image model {per_eval['image']:.3f} s")
        print(f"{'':<34}{'steps':>6}{'evals':>7}{'prior s':>9}{'image s':>9}{'images/s':>10}{'prior share':>13}")
        for name, steps, sec in (("measured", args.steps, measured), ("extrapolated to the release's 40", 40, at40)):
            total = sec["prior"] + sec["image"]
            print(f"{name:<34}{steps:>6}{evaluations('edm', steps):>7}{sec['prior']:>9.2f}{sec['image']:>9.2f}"
                  f"{args.images / total:>10.4f}{sec['prior'] / total:>13.1%}")
        total = at40["prior"] + at40["image"]
        rates[label] = (args.images / total, args.images / at40["image"], at40["prior"] / total, names)
        if label == "default":
            rows += fast_preset_rows(measured, per_eval, args.steps, batches, args.images, names)
    ref = rates["fp32"]
    for label, (two_stage, image_only, share, names) in rates.items():
        vs = None if label == "fp32" else "two-stage sampling, fp32"
        rows.append(row(f"two-stage sampling, {label}", two_stage, "images/s", reference=vs, reps=reps,
                        ratio=None if vs is None else two_stage / ref[0],
                        note=f"{names}; 40 Heun steps (extrapolated from {args.steps} by median stage and evaluation "
                        f"times), batch {batch}"))
        rows.append(row(f"image-model stage, {label}", image_only, "images/s", reps=reps,
                        reference=None if vs is None else "image-model stage, fp32",
                        ratio=None if vs is None else image_only / ref[1]))
        rows.append(row(f"prior share of two-stage time, {label}", 100 * share, "%"))
    print(f"\ndefault vs fp32 eager: two-stage {rates['default'][0] / ref[0]:.2f}x, "
          f"image-model stage {rates['default'][1] / ref[1]:.2f}x")
    report(args, "sample", rows, info, time.perf_counter() - start)


def fast_preset_rows(measured: dict, per_eval: dict, steps: int, batches: int, images: int, names: str) -> list:
    """Two-stage images/s of --preset fast vs the release's setting, both extrapolated from the measured run."""
    rate = {}
    for nfe in (RELEASE_NFE, FAST_NFE):
        sec = sum(measured[k] + (nfe - evaluations("edm", steps)) * batches * per_eval[k] for k in measured)
        rate[nfe] = images / sec
    ref = f"two-stage sampling, release setting ({RELEASE_NFE} NFE per stage)"
    note = f"{names}; extrapolated from {steps} Heun steps; FD at these settings: benchmarks/solvers.py"
    return [row(ref, rate[RELEASE_NFE], "images/s", note=note),
            row(f"two-stage sampling, --preset fast ({FAST_NFE} NFE per stage)", rate[FAST_NFE], "images/s",
                reference=ref, ratio=rate[FAST_NFE] / rate[RELEASE_NFE], note=note)]


def load_main(args: argparse.Namespace) -> None:
    """--load: whole-process vcdm vs the float32 eager reference (EDM's generate.py with --edm-root), idle and
    with one core busy."""
    reps = args.reps or (2 if args.quick else 3)
    if args.edm_root and args.cbase:
        raise SystemExit("Error: --cbase applies only without --edm-root: EDM's pickle is its 64x64 DDPM++ (cbase 128)")
    cbase = args.cbase or (32 if args.quick and not args.edm_root else None)
    info, start = machine("cpu"), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        edm = None
        if args.edm_root:
            edm = (Path(args.edm_root), tmp / "edm-ddpmpp64.pkl")
            subprocess.run([sys.executable, str(Path(__file__).parent / "edm.py"), "make-pickle", "--edm-root",
                            str(edm[0]), "--out", str(edm[1])], check=True, stdout=subprocess.DEVNULL)
            network = tmp / "ddpmpp64.safetensors"
            subprocess.run([wholeprocess.vcdm_command(), "import-edm", str(edm[1]), str(network)], check=True,
                           stdout=subprocess.DEVNULL)
        else:
            torch.manual_seed(0)
            network = write_model(tmp / "ddpmpp64.safetensors", "ddpmpp", "1", "0", cbase=cbase)
        cases = wholeprocess.commands(network, tmp, args.images, args.steps, args.baseline_omp_wait_policy, edm)
        reference = next(iter(cases))
        print(f"whole-process sampling: {args.images} images, {args.steps} Heun steps, DDPM++ 64x64 "
              f"cbase {cbase or 128}, {reps} repetitions, idle and with one core busy; reference: {reference}",
              flush=True)
        times = wholeprocess.measure_processes(cases, reps)
        pixels = wholeprocess.pixel_difference(cases)
    rows = wholeprocess.summary(times, args.images, args.steps, pixels)
    for condition, timings in times.items():
        ref, ours = timings[reference].median, timings[wholeprocess.VCDM].median
        print(f"{condition}: reference {ref:.1f} s, vcdm {ours:.1f} s (medians) = {ref / ours:.2f}x")
    print(f"pixels, vcdm vs the reference: mean |diff| {pixels[0]:.3f}, max {pixels[1]} levels")
    report(args, "sample-load", rows, info, time.perf_counter() - start,
           baseline_omp_wait_policy=args.baseline_omp_wait_policy or "unset", reference=reference)


def evaluate(denoiser, structure, batch: int, device: torch.device, settings: perf.InferenceSettings) -> float:
    """Median seconds of one bare network evaluation at `batch` (no padding, no sampler, no files)."""
    x = torch.randn(batch, structure.latent_dim, device=device)
    y = torch.randn(batch, structure.observed_dim, device=device) if structure.observed_dim else None
    with torch.no_grad(), perf.autocast(settings, device):
        return measure_one(lambda: denoiser(x, torch.tensor(1.0, device=device), y), reps=3, warmup=1,
                           device=device).median


if __name__ == "__main__":
    main()
