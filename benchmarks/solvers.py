"""Quality per network evaluation: Fréchet distance (the digits demo's judge) against the number of
network evaluations (NFE), for every sampler vcdm has, on trained demo models.

Models (train them with the demo's recipe, e.g. `vcdm demo` for the pair and benchmarks/quality.py's
unconditional one, or any checkpoints of the same kind):
  * two-stage: the prior over pixel-PCA embeddings, then the image model given the embedding; both
    stages use the sampler under test (as `vcdm sample --preset` does);
  * uncond: an unconditional image model.

For each seed s, images s*N .. s*N+N-1 are drawn (the same latents for every sampler: common random
numbers, so differences between samplers are not drowned by sampling noise) and scored against the
held-out digits. The reference is the original release's setting: Heun, 40 steps, S_churn 50,
S_noise 1.007 (79 NFE). Results go to <out>/results.jsonl (one line per run, appended, so a run can be
stopped and resumed), <out>/table.md and <out>/fd-vs-nfe.png.

    python benchmarks/solvers.py --prior P.safetensors --image I.safetensors --uncond U.safetensors \\
        --out solvers-run --seeds 0,1,2 --num 100
    python benchmarks/solvers.py --out solvers-run --report      # table and plot from results.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from common import machine, report, row
from vcdm import perf
from vcdm.checkpoints import load_checkpoint
from vcdm.data.dataset import to_uint8
from vcdm.diffusion import StackedRandomGenerator, sample
from vcdm.diffusion.settings import evaluations
from vcdm.fileio import atomic_write, parse_int_list
from vcdm.metrics.judge import make_judge

REFERENCE = ("reference", "edm", dict(num_steps=40, S_churn=50.0, S_noise=1.007))
SAMPLERS = ("unipc", "dpm2m_sde", "dpm2m", "euler_a", "dpm3m_sde", "heun", "heun_churn")
NFE_GRID = (24, 12, 8)


def settings(nfe_grid: tuple[int, ...] = NFE_GRID, samplers: tuple[str, ...] = SAMPLERS) -> list[tuple[str, str, dict]]:
    """(label, sampler, options): the reference, then each sampler at each NFE of the grid (Heun costs
    2 evaluations per step but one on the last, so n steps = 2n - 1 NFE). `heun_churn` is the reference's
    sampler with fewer steps: S_churn scales with the step count, so each step keeps the reference's
    noise increase (EDM's cap, sqrt(2) - 1, binds for both)."""
    out = [REFERENCE]
    for nfe in nfe_grid:
        for name in samplers:
            steps = (nfe + 1) // 2
            if name == "heun":
                out.append((f"heun-{steps}", "edm", dict(num_steps=steps)))
            elif name == "heun_churn":
                churn = REFERENCE[2]["S_churn"] * steps / REFERENCE[2]["num_steps"]
                out.append((f"heun_churn-{steps}", "edm", dict(REFERENCE[2], num_steps=steps, S_churn=churn)))
            else:
                out.append((f"{name}-{nfe}", name, dict(num_steps=nfe)))
    return out


def nfe(sampler: str, opts: dict) -> int:
    return evaluations(sampler, opts["num_steps"], opts.get("solver", "heun"))


class Models:
    """The loaded checkpoints, evaluated as `vcdm generate` would on this device."""

    def __init__(self, prior: str | None, image: str | None, uncond: str | None, device: torch.device):
        self.device, self.nets, self.settings = device, {}, {}
        for name, path in (("prior", prior), ("image", image), ("uncond", uncond)):
            if path:
                den = load_checkpoint(path, device)[0].eval()
                self.settings[name] = perf.resolve_settings(device, den)
                perf.prepare(den, self.settings[name])
                self.nets[name] = den

    @torch.no_grad()
    def run(self, name: str, seeds: list[int], sampler: str, opts: dict, y: torch.Tensor | None = None) -> torch.Tensor:
        den = self.nets[name]
        rnd = StackedRandomGenerator(self.device, seeds)
        latents = rnd.randn([len(seeds), den.structure.latent_dim])
        with perf.autocast(self.settings[name], self.device):
            return sample(den, latents, y, sampler=sampler, randn_like=rnd.randn_like, **opts)

    def images(self, model: str, seeds: list[int], sampler: str, opts: dict, batch: int = 100) -> torch.Tensor:
        """uint8 (N, C, H, W) images of `model` ('uncond' or 'two_stage')."""
        out = []
        for part in [seeds[i:i + batch] for i in range(0, len(seeds), batch)]:
            y = None
            if model == "two_stage":
                prior, image = self.nets["prior"].structure, self.nets["image"].structure
                emb = prior.unflatten_latent(self.run("prior", part, sampler, opts).float())["embedding"]
                y = image.flatten_observed({"embedding": emb})
            net = "image" if model == "two_stage" else "uncond"
            # Image noise from other generator seeds than the embedding's, as --load_obs_from does (seed + 1).
            x = self.run(net, [s + 1 for s in part] if y is not None else part, sampler, opts, y)
            out.append(to_uint8(self.nets[net].structure.unflatten_latent(x.float())["image"]))
        return torch.cat(out)


def run_grid(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = Models(args.prior, args.image, args.uncond, device)
    kinds = [k for k, need in (("two_stage", ("prior", "image")), ("uncond", ("uncond",)))
             if all(n in models.nets for n in need)]
    judge = make_judge(16, epochs=15, device=args.device, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    done = {(r["label"], r["model"], r["seed"]) for r in read(log)}
    for label, sampler, opts in settings(tuple(args.nfe), tuple(args.samplers)):
        for seed in args.seeds:
            for model in kinds:
                if (label, model, seed) in done:
                    continue
                t = time.perf_counter()
                images = models.images(model, list(range(seed * args.num, (seed + 1) * args.num)), sampler, opts)
                fd = judge.evaluate(images)["fd"]
                row = dict(label=label, sampler=sampler, opts=opts, nfe=nfe(sampler, opts), model=model, seed=seed,
                           num=args.num, fd=fd, seconds=round(time.perf_counter() - t, 1))
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{label:16s} {model:9s} seed {seed}: FD {fd:7.2f}  ({row['seconds']}s)", flush=True)
    if args.num <= len(judge.floor_images):  # the floor needs as many real digits as samples per seed
        with atomic_write(args.out / "floor.json", "w") as f:
            json.dump({"real_floor_fd": judge.real_floor(args.num)["fd"], "num": args.num}, f)
    else:
        print(f"no real-digit floor: --num {args.num} is more than the {len(judge.floor_images)} digits kept for it")


def read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(label, model) → sampler, NFE, FD mean and std over seeds, and the per-seed FDs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["model"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        fds = [r["fd"] for r in sorted(rs, key=lambda r: r["seed"])]
        out[key] = dict(sampler=rs[0]["sampler"], nfe=rs[0]["nfe"], fds=fds, mean=statistics.mean(fds),
                        std=statistics.stdev(fds) if len(fds) > 1 else math.nan)
    return out


def _fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(summary: dict, models: list[str]) -> str:
    """FD mean ± std over seeds, and the paired difference to the reference (same seeds, same latents)."""
    labels = sorted({k[0] for k in summary}, key=lambda lab: (lab != "reference", -summary[(lab, models[0])]["nfe"]
                                                              if (lab, models[0]) in summary else 0, lab))
    head = "| sampler | NFE per stage | " + " | ".join(f"FD {m} | Δ vs reference {m}" for m in models) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(models))]
    for lab in labels:
        cells = []
        for m in models:
            s, ref = summary.get((lab, m)), summary.get(("reference", m))
            if s is None:
                cells += ["-", "-"]
                continue
            n = min(len(s["fds"]), len(ref["fds"])) if ref else 0
            diffs = [a - b for a, b in zip(s["fds"][:n], ref["fds"][:n])]
            cells += [f"{_fmt(s['fds'])} (n={len(s['fds'])})", "-" if lab == "reference" else _fmt(diffs)]
        nfe_ = next(summary[(lab, m)]["nfe"] for m in models if (lab, m) in summary)
        lines.append(f"| {lab} | {nfe_} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, models: list[str], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), dpi=100, squeeze=False)
    for ax, model in zip(axes[0], models):
        by_sampler: dict[str, list] = {}
        for (lab, m), s in summary.items():
            if m == model and lab != "reference":
                by_sampler.setdefault(lab.rsplit("-", 1)[0], []).append((s["nfe"], s["mean"], s["std"]))
        for name, pts in sorted(by_sampler.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                        marker="o", capsize=3, label=name)
        ref = summary.get(("reference", model))
        if ref:
            ax.errorbar([ref["nfe"]], [ref["mean"]], yerr=[0 if math.isnan(ref["std"]) else ref["std"]], marker="*",
                        markersize=12, color="k", capsize=3, label="reference (Heun 40, churn 50)")
            ax.axhline(ref["mean"], color="k", lw=0.5, ls="--")
        ax.set_xscale("log")
        ax.set_xticks([5, 10, 20, 40, 80], labels=["5", "10", "20", "40", "80"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("network evaluations per stage (NFE)")
        ax.set_ylabel("Fréchet distance to held-out digits (lower is better)")
        ax.set_title(model.replace("_", "-"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def summary_rows(summary: dict) -> list[dict]:
    """The common result rows: each setting's FD as the median over seeds with min and max, compared with
    the reference setting's."""
    rows = []
    for (label, model), s in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][0] != "reference", -kv[1]["nfe"])):
        ref = summary.get(("reference", model))
        is_ref = label == "reference"
        rows.append(row(f"FD {model}, {label}", statistics.median(s["fds"]), "FD", low=min(s["fds"]),
                        high=max(s["fds"]), reps=len(s["fds"]),
                        reference=None if is_ref or ref is None else f"FD {model}, reference",
                        ratio=None if is_ref or ref is None else statistics.median(s["fds"]) / statistics.median(ref["fds"]),
                        note=f"{s['nfe']} NFE per stage; over seeds"))
    return rows


def write_table(out: Path) -> tuple[str, list[dict]]:
    """table.md and fd-vs-nfe.png from results.jsonl; returns the table and the common rows."""
    rows = read(out / "results.jsonl")
    if not rows:
        raise SystemExit(f"Error: no results in {out / 'results.jsonl'}")
    models = [m for m in ("two_stage", "uncond") if any(r["model"] == m for r in rows)]
    summary = summarise(rows)
    text = table(summary, models)
    with atomic_write(out / "table.md", "w") as f:
        f.write(text + "\n")
    plot(summary, models, out / "fd-vs-nfe.png")
    return text, summary_rows(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", help="prior checkpoint (two-stage)")
    parser.add_argument("--image", help="image model given embeddings (two-stage)")
    parser.add_argument("--uncond", help="unconditional image model")
    parser.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    parser.add_argument("--seeds", type=lambda s: parse_int_list(s, "--seeds"), default=[0, 1, 2])
    parser.add_argument("--num", type=int, default=100, help="images per seed and setting [100]")
    parser.add_argument("--nfe", type=lambda s: parse_int_list(s, "--nfe"), default=list(NFE_GRID),
                        help="NFE grid, most important first [24,12]")
    parser.add_argument("--samplers", type=lambda s: s.split(","), default=list(SAMPLERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only write the table and plot from results.jsonl")
    parser.add_argument("--json", metavar="PATH", help="also write the common result rows (benchmarks/common.py) as JSON")
    args = parser.parse_args()
    start, info = time.perf_counter(), machine(args.device)
    if not args.report:
        if not (args.uncond or (args.prior and args.image)):
            parser.error("give --prior and --image, or --uncond, or both")
        run_grid(args)
    text, rows = write_table(args.out)
    print(text)
    report(args, "solvers", rows, info, time.perf_counter() - start, out=str(args.out))


if __name__ == "__main__":
    sys.exit(main())
