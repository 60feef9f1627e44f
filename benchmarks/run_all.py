"""Run every benchmark script and write one table (markdown + JSON) of their numbers, each with the CPU
path it ran on (vcdm.perf.cpu_path: amx / avx512_bf16 / avx2 / baseline) and the torch kernel caps in force.

    python benchmarks/run_all.py                  # full runs (over an hour on 2 CPU cores)
    python benchmarks/run_all.py --quick          # each script's --quick mode (about 15 minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick --kernels avx2   # the same on AVX2 kernels (the AVX2 column on a better CPU)
    python benchmarks/run_all.py --only denoiser,sample --out /tmp/bench
    python benchmarks/run_all.py --script-args "denoiser=--tiny --compile none"
    python benchmarks/run_all.py --solvers /tmp/solvers-run    # where benchmarks/solvers.py wrote its table
    python benchmarks/run_all.py --edm-root ~/edm    # whole-process and training references run NVlabs/edm's own code

Each script runs in its own process with ``--json`` (and ``--quick``); its log and JSON land in the
output folder (default benchmarks/results/run_all-<CPU path>[-quick]/) beside ``results.md`` and ``results.json``. A script that
fails, times out or writes no JSON becomes a FAILED row with the reason; the others still run.
Ratios compare against a reference measured in the same run of the same script (e.g. float32 eager).
The FD-vs-NFE table of benchmarks/solvers.py (hours of sampling and judging) is not re-run: its
table.md in the --solvers folder, if there, is copied into results.md, and so are the tables that the
other hours-long benchmarks (quality, backbones, recipe, guidance, fewstep, precision) left in
benchmarks/results/. A CUDA-only script is skipped without a GPU.

On a machine shared with other jobs, libgomp's default busy-waiting makes multi-threaded runs
erratic (measured here: one DDPM++ evaluation 3x slower on 2 threads than on 1), so the scripts run
with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set or ``--omp-wait-policy default`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import describe, kernel_env, machine, markdown_table, value_cell, write_json
from vcdm import perf
from vcdm.fileio import atomic_write

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # name: (file and fixed arguments, what it measures)
    "dataset_tool": ("dataset_tool.py", "dataset tool: JPEG folder -> 64x64 EDM zip"),
    "denoiser": ("denoiser.py", "one DDPM++ 64x64 denoiser evaluation per inference path; the prior"),
    "train": ("train.py", "training loop vs bare optimizer step"),
    "sample": ("sample.py", "two-stage sampling (prior + DDPM++ 64x64) through vcdm.generate; --preset fast"),
    "sample_load": ("sample.py --load", "whole-process sampling vs EDM's generate.py (or a float32 eager stand-in), "
                    "idle and one core busy"),
    "fid": ("fid.py", "Inception-v3 features for FID"),
    "phema": ("phema.py", "post-hoc EMA: peak memory against the number of snapshots"),
    "tune": ("tune.py", "consistency tuning step vs the training step"),
    "batch_invariance": ("batch_invariance.py", "what one seed -> one image at any batch size costs"),
    "gpu": ("gpu.py", "CUDA: U-Net TFLOP/s and % of peak, sampling, training steps"),
}
CUDA_ONLY = {"gpu"}
KERNELS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}  # --kernels: caps for the scripts
QUOTED = ("quality-digits.md", "backbones-digits.md", "recipe-digits.md", "guidance-digits.md", "fewstep*.md",
          "precision*.md")  # tables in benchmarks/results/ written by the hours-long benchmarks


def run_script(name: str, script: Path, args: list[str], out: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one script; return its JSON result, or a stand-in with ``error`` set."""
    json_path, log_path = out / f"{name}.json", out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), *args, "--json", str(json_path)]
    start = time.perf_counter()
    error = None
    if not script.is_file():
        error, output = f"script {script} not found", ""
    else:
        try:
            proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout)
            output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                last = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "")
                error = f"exit code {proc.returncode}: {last[:200]}"
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            error = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    with atomic_write(log_path, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n{output}")
    if error is None:
        try:
            data = json.loads(json_path.read_text())
            if not isinstance(data.get("rows"), list):
                raise ValueError("no 'rows' list")
            return {**data, "wall_s": round(wall, 1)}
        except (OSError, ValueError) as e:
            error = f"no usable --json output ({e})"
    return {"benchmark": name, "rows": [], "error": error, "wall_s": round(wall, 1)}


def where(res: dict[str, Any]) -> str:
    """The CPU path and kernel caps a script's numbers came from (its own record, else this process's)."""
    info = res.get("machine") or {}
    return f"{info.get('cpu_path') or perf.cpu_path()}, kernels {info.get('kernel_env') or kernel_env()}"


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, res in results.items():
        if res.get("error"):
            rows.append([name, "FAILED", None, "-", "-", "-", res["error"], where(res)])
            continue
        for r in res["rows"]:
            ratio = None if r.get("ratio") is None else f"{r['ratio']:.2f}x"
            rows.append([name, r["metric"], value_cell(r), r["unit"], r.get("reference") or "-", ratio or "-",
                         r.get("note", ""), where(res)])
    return rows


def headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per figure, with the CPU path it ran on."""
    lines = []
    for name, res in results.items():
        for r in res.get("rows", []):
            ratio = "" if r.get("ratio") is None else f", {r['ratio']:.2f}x {r['reference']}"
            lines.append(f"[{where(res)}] {name}: {r['metric']} = {value_cell(r)} {r['unit']}{ratio}")
        if res.get("error"):
            lines.append(f"[{where(res)}] {name}: FAILED ({res['error']})")
    return lines


def solvers_section(folder: Path) -> str:
    """benchmarks/solvers.py's FD-vs-NFE table, quoted from its results folder (it is not re-run here)."""
    table = folder / "table.md"
    head = f"## FD vs network evaluations (benchmarks/solvers.py, from {table})"
    if not table.is_file():
        return f"{head}\n\nnot found: run `python benchmarks/solvers.py --out {folder} ...` first."
    return f"{head}\n\n{table.read_text().strip()}"


def quoted_sections(folder: Path) -> list[str]:
    """The tables the hours-long benchmarks left in ``folder`` (they are not re-run here)."""
    files = [f for pattern in QUOTED for f in sorted(folder.glob(pattern))]
    return [f"## {f.name} (quoted from {f}; not re-run)\n\n{f.read_text().strip()}" for f in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="run every script in its --quick mode")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/run_all-<CPU path>[-quick])")
    p.add_argument("--kernels", choices=sorted(KERNELS), default=None,
                   help="run the scripts on capped torch kernels (avx2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(SCRIPTS)}")
    p.add_argument("--script-args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one script, e.g. 'denoiser=--tiny --compile none' (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script (default 5400; --quick: 1800)")
    p.add_argument("--solvers", type=Path, default=HERE / "results" / "solvers",
                   help="folder of benchmarks/solvers.py's results (its table.md is quoted, not re-run)")
    p.add_argument("--edm-root", default=None, metavar="DIR",
                   help="a clone of NVlabs/edm, passed to sample_load and train: their references then run EDM's own code")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the scripts when the variable is unset; 'default' leaves it unset")
    args = p.parse_args()

    names = list(SCRIPTS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        p.error(f"--only: unknown script(s) {', '.join(unknown)} (known: {', '.join(SCRIPTS)})")
    extra: dict[str, list[str]] = {}
    for item in args.script_args:
        name, sep, rest = item.partition("=")
        if not sep or name not in SCRIPTS:
            p.error(f"--script-args: expected NAME=ARGS with NAME one of {', '.join(SCRIPTS)}, got '{item}'")
        extra[name] = extra.get(name, []) + shlex.split(rest)
    if args.edm_root:
        for name in ("sample_load", "train"):
            extra[name] = ["--edm-root", args.edm_root] + extra.get(name, [])
    timeout = args.timeout or (1800 if args.quick else 5400)
    if args.kernels:
        os.environ.update(KERNELS[args.kernels])  # this process's record and the scripts alike
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env and args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    out = Path(args.out or HERE / "results" / f"run_all-{perf.cpu_path()}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    info = machine("cpu")
    info["omp_wait_policy"] = env.get("OMP_WAIT_POLICY", "unset")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        script_args = (["--quick"] if args.quick else []) + extra.get(name, [])
        if name in CUDA_ONLY and not torch.cuda.is_available():
            print(f"[{name}] skipped: no CUDA device", flush=True)
            continue
        print(f"[{name}] {SCRIPTS[name][1]} ...", flush=True)
        file, *fixed = SCRIPTS[name][0].split()
        results[name] = run_script(name, HERE / file, fixed + script_args, out, timeout, env)
        status = f"FAILED: {results[name]['error']}" if results[name].get("error") else "ok"
        print(f"[{name}] {status} ({results[name]['wall_s']:.0f} s)", flush=True)
    info_end = machine("cpu")
    wall = time.perf_counter() - start

    lines = [f"# vcdm benchmarks{' (--quick)' if args.quick else ''}", "",
             f"Machine: {describe(info)}; load average {info_end['load_avg_1m']} at the end. "
             f"Total wall time {wall / 60:.1f} min. Logs and per-script JSON: {out}/logs, {out}/<name>.json.", "",
             "Values are medians over the repetitions, [min-max] where repeated; ratios compare medians.", "",
             markdown_table(["benchmark", "metric", "value", "unit", "ratio vs", "ratio", "note", "CPU path, kernels"],
                            table_rows(results)), ""]
    for name, res in results.items():
        if not res.get("error") and "load_avg_end" in res:
            lines.append(f"- {name}: load average {res['machine'].get('load_avg_1m')} -> {res['load_avg_end']} "
                         f"during its {res['wall_s']:.0f} s")
    lines += ["", solvers_section(args.solvers), *quoted_sections(HERE / "results")]
    text = "\n".join(lines).rstrip() + "\n"
    with atomic_write(out / "results.md", "w") as f:
        f.write(text)
    write_json(out / "results.json", {"quick": args.quick, "machine": info, "load_avg_end": info_end["load_avg_1m"],
                                      "wall_s": round(wall, 1), "results": results})
    print("\n" + text)
    print("Headline figures, each with the CPU path it ran on:\n" + "\n".join(headlines(results)))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
