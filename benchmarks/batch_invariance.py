"""What one seed → one sample costs: whether a seed's denoiser output is bit-identical whatever batch it
is evaluated in, and the time per batch, for each way of evaluating a batch.

Ways (``--batch`` B split into network calls):
  none     one call of B rows (the fastest; rounding may depend on B)
  pad8     one call of B rounded up to a multiple of 8 (vcdm before this measurement)
  chunkC   calls of exactly C rows each, the last one padded by repeating its last row

Cost is the CPU time of the one compute thread (torch at 1 thread, ``time.thread_time``), the cases
interleaved: on a shared machine wall times measure the other jobs (at load 13 on 2 cores a 2-row call
of the prior took 0.1-0.5 s), while the thread's own CPU time does not. Bits are compared at the default
thread count too (``--threads``). Run it under each CPU path:
    python benchmarks/batch_invariance.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/batch_invariance.py
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from common import add_common_args, describe, machine, markdown_table, median, result, row, write_json
from vcdm.data.structure import Structure
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.nets.presets import preset

N = 16  # samples whose bits are compared


def networks() -> dict[str, Denoiser]:
    """The demo's prior and image model (vcdm.demo.budget.Sizes) and a 32x32 DDPM++, random weights."""
    nets = {}
    s = Structure.from_flags({"image": (3, 16, 16), "embedding": (16,)}, "0,1", "0,0")
    cls, kw = preset("dalle2", resolution=16, channels=3, embed_dim=16, label_dim=0, augment_dim=0)
    kw.update(dim=128, depth=2)
    nets["demo prior (DALLE2Prior, dim 128)"] = (s, cls, kw)
    s = Structure.from_flags({"image": (3, 16, 16), "embedding": (16,)}, "1,1", "0,1")
    cls, kw = preset("ddpmpp", resolution=16, channels=3, embed_dim=0, label_dim=16, augment_dim=0, cbase=32,
                     cres=[1, 2], dropout=0.0)
    nets["demo image model (DDPM++ 16x16)"] = (s, cls, kw)
    s = Structure.from_flags({"image": (3, 32, 32), "embedding": (16,)}, "1,1", "0,1")
    cls, kw = preset("ddpmpp", resolution=32, channels=3, embed_dim=0, label_dim=16, augment_dim=0, cbase=32,
                     cres=[1, 2, 2], dropout=0.0)
    nets["DDPM++ 32x32"] = (s, cls, kw)
    out = {}
    for name, (s, cls, kw) in nets.items():
        torch.manual_seed(0)
        den = Denoiser(build_network(cls, kw), s).eval().requires_grad_(False)
        for p in den.parameters():  # away from the initial zeros of the output layers
            p.add_(torch.randn_like(p) * 0.05)
        out[name] = den
    return out


def way(name: str) -> Callable[[int], list[int]]:
    """The row counts of the network calls that evaluate a batch of b samples."""
    if name == "none":
        return lambda b: [b]
    if name == "pad8":
        return lambda b: [-(-b // 8) * 8]
    chunk = int(name.removeprefix("chunk"))
    return lambda b: [chunk] * -(-b // chunk)


def evaluate(den: Denoiser, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None, calls: list[int]) -> torch.Tensor:
    """The denoiser on the rows of x, through calls of the given sizes (rows repeated to fill the last)."""
    n, out, start = len(x), [], 0
    for size in calls:
        idx = [min(i, n - 1) for i in range(start, start + size)]
        out.append(den(x[idx], sigma[idx], None if y is None else y[idx])[:max(0, min(size, n - start))])
        start += size
    return torch.cat(out)[:n]


def invariant(den: Denoiser, calls: Callable[[int], list[int]], check: list[int], g: torch.Generator) -> bool:
    """Whether every sample's output is bit-identical at every --batch in ``check`` (seeds cut into
    near-equal batches, as split_batches does)."""
    s = den.structure
    x = torch.randn(N, s.latent_dim, generator=g) * 3
    y = torch.randn(N, s.observed_dim, generator=g) if s.observed_dim else None
    sigma = torch.exp(torch.randn(N, generator=g))
    outs = []
    with torch.no_grad():
        for b in check:
            parts = torch.arange(N).tensor_split(-(-N // b))
            outs.append(torch.cat([evaluate(den, x[p], sigma[p], None if y is None else y[p], calls(len(p)))
                                   for p in parts]))
    return all(torch.equal(o, outs[0]) for o in outs[1:])


def cpu_times(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """CPU seconds of this thread per call of every case, round-robin after one warm-up round."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", default="none,pad8,chunk1,chunk2,chunk8")
    parser.add_argument("--batches", default="1,2,8,32", help="--batch values timed")
    parser.add_argument("--check", default="1,2,3,5,8,13,16", help="--batch values whose bits are compared")
    parser.add_argument("--nets", default="", help="only the networks whose name contains this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads when comparing bits")
    parser.add_argument("--reps", type=int, default=5)
    add_common_args(parser)
    args = parser.parse_args()
    ways = args.ways.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    check = [int(b) for b in args.check.split(",")]
    reps = 2 if args.quick else args.reps
    info, start = machine(), time.perf_counter()
    print(describe(info), "| CPU path", torch.backends.cpu.get_cpu_capability())
    rows, table = [], []
    for net_name, den in networks().items():
        if args.nets not in net_name:
            continue
        torch.set_num_threads(args.threads)
        same = {w: invariant(den, way(w), check, torch.Generator().manual_seed(1)) for w in ways}
        print(net_name, same, flush=True)
        torch.set_num_threads(1)
        s = den.structure
        for b in batches:
            x, sigma = torch.randn(b, s.latent_dim), torch.full([b], 2.0)
            y = torch.randn(b, s.observed_dim) if s.observed_dim else None
            with torch.no_grad():
                times = cpu_times({w: (lambda w=w: evaluate(den, x, sigma, y, way(w)(b))) for w in ways}, reps)
            base = median(times["none"]) if "none" in times else None
            for w in ways:
                t = median(times[w])
                rows.append(row(f"{net_name} / --batch {b} / {w}", t * 1e3, "CPU ms per batch",
                                reference=f"{net_name} / --batch {b} / none" if base else None,
                                ratio=t / base if base else None, note="bit-identical across --batch" if same[w] else
                                "differs across --batch"))
                table.append((net_name, b, w, "yes" if same[w] else "no", t * 1e3, t / base if base else None))
                print(table[-1], flush=True)
    print(markdown_table(("network", "--batch", "way", f"same bits at --batch {args.check}", "CPU ms per batch (median)",
                          "x none"), table))
    if args.json:
        write_json(args.json, result("batch_invariance", rows, info, time.perf_counter() - start,
                                     cpu_path=torch.backends.cpu.get_cpu_capability(), reps=reps))


if __name__ == "__main__":
    main()
