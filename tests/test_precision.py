"""Training precision: the default per CPU path and network (vcdm.perf.training_precision, measured by
benchmarks/precision.py), --bf16 0/1 overriding it, a resumed run keeping its own, the start line and
the record in training_options.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_runs import PRIOR, TINY_UNET, base_args, run, run_dir, write_dataset
from vcdm import perf

pytestmark = pytest.mark.usefixtures("one_thread")

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}
IMAGE = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--duration", "0.000004"]


@pytest.mark.parametrize("flags,env,resolution,bf16", [
    (AVX512_BF16, {}, 64, True), (AMX, {}, 64, True), (AMX, {}, 32, True),
    (AVX512_BF16, {}, 16, False),  # the demo's U-Net: measured no faster in bf16
    (AVX512_BF16, {}, None, False),  # the prior: unmeasured, stays float32
    (AVX2, {}, 64, False), (frozenset(), {}, 64, False),  # no native bf16: emulated, measured slower
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 64, False),  # an AVX2-only CPU, emulated on a better one
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, 64, True),
])
def test_choice_per_cpu_path(flags, env, resolution, bf16):
    chosen, why = perf.training_precision("cpu", resolution, perf.cpu_path(flags, env))
    assert chosen is bf16
    assert perf.cpu_path(flags, env) in why


def test_cuda_keeps_edms_float32_and_says_it_is_unmeasured():
    bf16, why = perf.training_precision("cuda", 64)
    assert bf16 is False and "unmeasured" in why


@pytest.mark.parametrize("env,native", [({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, False),
                                        ({}, None)])
def test_isa_cap_in_a_fresh_process(env, native):
    """ONEDNN_MAX_CPU_ISA set before torch loads, as a user would: AVX2 trains in float32 on any CPU; without
    a cap, bf16 at 64x64 exactly where this CPU multiplies bf16 natively."""
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    code = ("import json; from vcdm import perf; "
            "print(json.dumps([perf.training_precision('cpu', 64)[0], perf.bf16_is_fast('cpu'), perf.cpu_path()]))")
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    bf16, fast, path = json.loads(out.stdout)
    assert bf16 is (fast if native is None else native)
    assert path == ("avx2" if env else perf.cpu_path(env={}))


@pytest.fixture
def cpu(monkeypatch):
    """Set this process's CPU flags (no ISA caps): ``cpu(AVX512_BF16)``."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    return lambda flags: monkeypatch.setattr(perf, "_cpu_flags", lambda: flags)


def recorded_bf16(out) -> bool | None:
    return json.loads((run_dir(out) / "training_options.json").read_text())["bf16"]


def test_run_prints_and_records_the_choice(tmp_path, cpu):
    """A 32x32 image model on an AVX512-BF16 CPU trains in bf16, a prior in float32; both say why."""
    cpu(AVX512_BF16)
    data = write_dataset(tmp_path / "d32.zip", res=32)
    r = run(base_args(data, tmp_path / "image", *IMAGE))
    assert "Precision: bf16 autocast (CPU path avx512_bf16 multiplies bf16 natively: 32x32 U-Net" in r.output
    assert recorded_bf16(tmp_path / "image") is True
    r = run(base_args(data, tmp_path / "prior", *PRIOR, "--duration", "0.000004"))
    assert "Precision: float32 (CPU path avx512_bf16: a model of vectors (the prior)" in r.output
    assert recorded_bf16(tmp_path / "prior") is False


@pytest.mark.parametrize("flag,bf16", [(["--bf16"], True), (["--bf16", "0"], False)])
def test_the_flag_overrides_the_choice(tmp_path, cpu, flag, bf16):
    cpu(AVX2 if bf16 else AVX512_BF16)  # the flag against what the CPU would choose
    data = write_dataset(tmp_path / "d32.zip", res=32)
    r = run(base_args(data, tmp_path / "runs", *IMAGE, *flag))
    assert f"Precision: {'bf16 autocast' if bf16 else 'float32'} (--bf16 {int(bf16)})" in r.output
    assert recorded_bf16(tmp_path / "runs") is bf16


@pytest.mark.parametrize("how", ["dir", "auto"])
def test_resume_keeps_the_runs_precision_on_another_cpu(tmp_path, cpu, how):
    """Started in bf16 on an AVX512-BF16 CPU, resumed on an AVX2 one: still bf16, unless --bf16 says otherwise."""
    cpu(AVX512_BF16)
    data = write_dataset(tmp_path / "d32.zip", res=32)
    out = tmp_path / "runs"
    run(base_args(data, out, *IMAGE))
    cpu(AVX2)
    resume = str(run_dir(out)) if how == "dir" else "auto"
    r = run(base_args(data, out, *IMAGE, "--duration", "0.000008", "--resume", resume))
    assert "Resuming from" in r.output and "Precision: bf16 autocast (the resumed run's precision)" in r.output
    assert recorded_bf16(out) is True
    r = run(base_args(data, out, *IMAGE, "--duration", "0.000012", "--resume", resume, "--bf16", "0"))
    assert "Resuming from" in r.output and "Precision: float32 (--bf16 0)" in r.output
    assert recorded_bf16(out) is False


def test_a_run_that_recorded_no_precision_resumes_in_float32(tmp_path, cpu):
    """Runs of older vcdm trained in float32 unless --bf16 was given, and recorded no choice."""
    cpu(AVX2)
    data = write_dataset(tmp_path / "d32.zip", res=32)
    out = tmp_path / "runs"
    run(base_args(data, out, *IMAGE))
    options = run_dir(out) / "training_options.json"
    options.write_text(json.dumps({k: v for k, v in json.loads(options.read_text()).items() if k != "bf16"}))
    cpu(AMX)
    r = run(base_args(data, out, *IMAGE, "--duration", "0.000008", "--resume", str(run_dir(out))))
    assert "Resuming from" in r.output and "Precision: float32 (the resumed run's precision)" in r.output
