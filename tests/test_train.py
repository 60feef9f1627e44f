"""Training runs end to end: the CLI's plan (--dry-run, the original release's README commands), tiny
runs of a prior and of image models and what they write, overfitting, the embedding cache, DDP equals one
process, fine-tuning (--pretrained_weights, --transfer), the data classes and the loggers.
Resume, stops and failures, and the loop's parts have their own modules (test_train_resume.py,
test_train_failures.py, test_train_units.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from edm_fakes import edm_pickle
from tiny_runs import (PRIOR, REPO, TINY_PRIOR, TINY_UNET, assert_same_weights, base_args, last_state, run, run_dir,
                       write_dataset)
from vcdm.checkpoints import load_checkpoint, load_tensors, read_checkpoint_config
from vcdm.data.structure import Structure
from vcdm.diffusion.loss import EDMLoss
from vcdm.embedders import load_embedder
from vcdm.embedders.base import Embedder, image_batches
from vcdm.nets import build_network
from vcdm.nets.precond import Denoiser
from vcdm.train import build as build_mod
from vcdm.train.options import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _opts(path: Path) -> TrainOptions:
    return TrainOptions(path=str(path), data_class="CLIPDataset", exist=[1, 1], observed=[0, 1])


# ------------------------------------------------------------------------------------------------ the CLI's plan

def test_dry_run_prints_options_and_writes_nothing(data, tmp_path):
    out = tmp_path / "runs"
    r = run(base_args(data, out, "--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--batch_gpu=2",
                      "--fp16=0", "--bf16", "--dry-run"))
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert opts["batch_gpu"] == 2 and opts["bf16"] is True and opts["fp16"] is False and opts["batch"] == 4
    assert "SongUNet" in r.output and "Dry run" in r.output
    assert "Precision: bf16 autocast (--bf16 1)" in r.output  # what the run would train in, not only the flag
    r = run(base_args(data, out, *PRIOR, "--dry-run"))
    assert "Precision: float32 (CPU path" in r.output and "a model of vectors (the prior)" in r.output
    assert not out.exists()


RELEASE_COMMANDS = [  # the original release's README, verbatim but for the paths
    "--path=DATA --data_class CLIPDataset --batch 256 --seed 1 --exist 0,1 --observed 0,0 --arch=dalle2 "
    "--lr=1e-4 --augment=0.15 --pred_x0 1",
    "--path=DATA --data_class CLIPDataset --batch 128 --seed 1 --exist 1,1 --observed 0,1 --arch=ddpmpp "
    "--cres=1,2,2,2 --lr=1e-4 --dropout=0.05 --augment=0.15",
    "--path=DATA --data_class CLIPDataset --batch 128 --seed 1 --exist 1,1 --observed 0,1 --arch=ddpmpp "
    "--cres=1,2,2,2 --lr=1e-4 --dropout=0.05 --augment=0.15 --pretrained_weights pretrained/edm-ffhq-64x64-uncond-vp.pkl",
]


@pytest.mark.parametrize("cmd", RELEASE_COMMANDS)
def test_release_readme_commands_parse_to_their_settings(tmp_path, cmd):
    data = write_dataset(tmp_path / "afhqv2-64x64.zip", n=2, res=64)
    r = run(cmd.replace("DATA", str(data)).split() + ["--outdir", str(tmp_path / "runs"), "--dry-run"])
    opts = json.loads(r.output[:r.output.index("\n}\n") + 2])
    assert opts["lr"] == 1e-4 and opts["seed"] == 1 and opts["embedder"] is None  # CLIP by default
    assert "512 values" in r.output  # the CLIP embedding
    if "dalle2" in cmd:
        assert opts["pred_x0"] == [1] and opts["batch"] == 256 and "DALLE2Prior" in r.output
    else:
        assert '"channel_mult": [1, 2, 2, 2]' in r.output and '"dropout": 0.05' in r.output


def test_warns_when_the_lr_ramp_up_outlasts_the_run(data, tmp_path):
    r = run(base_args(data, tmp_path / "runs", *PRIOR, "--duration", "0.000004", "--lr-rampup", "10"))
    assert "warning: --lr-rampup 10 kimg is longer than --duration 0.004 kimg" in r.output
    assert "never gets past 4e-07" in r.output  # 4 of 10,000 images: lr 1e-3 * 4e-4


# ------------------------------------------------------------------------------------------------ tiny runs end to end

def test_prior_run_writes_logs_stats_snapshot_and_state(data, tmp_path):
    out = tmp_path / "runs"
    run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--pred_x0", "1",
                  "--augment", "0.15", "--duration", "0.000012", "--desc", "prior"))
    d = run_dir(out)
    assert len(d.name) == 8 + len("-prior") and d.name.endswith("-prior")
    for name in ("training_options.json", "log.txt", "stats.jsonl", "loss.png", "network-snapshot-000000.safetensors",
                 "training-state-000000.pt", "training-state-000000.pt.json"):
        assert (d / name).is_file(), name
    assert not list(d.glob("samples-*.png"))  # grids are for image models
    stats = [json.loads(line) for line in (d / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [4, 8, 12] and all(np.isfinite(s["loss"]) for s in stats)
    assert "tick 2" in (d / "log.txt").read_text() and "sec/kimg" in (d / "log.txt").read_text()
    (denoiser, _, tensors), config = load_checkpoint(d / "network-snapshot-000000.safetensors"), \
        read_checkpoint_config(d / "network-snapshot-000000.safetensors")
    assert set(config.to_dict()) >= {"network", "denoiser", "structure", "embedder", "data", "training"}
    assert config.network == type(denoiser.net).__name__ and config.denoiser["pred_x0"] == [1, 1]
    assert config.embedder["name"] == "pixel-pca" and set(tensors["embedder"]) == {"mean", "components", "scale"}
    assert denoiser.structure.latent_names == ("embedding",) and denoiser.net.augment_dim == 9
    state = torch.load(d / "training-state-000000.pt", weights_only=True)
    assert state["counters"]["nimg"] == 12 and set(state) >= {"net", "ema", "optimizer", "rng"}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """A random-weight open_clip ViT-B/32 state dict in a file, loaded by the real --clip-weights path."""
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.create_model("ViT-B-32-quickgelu", pretrained=None,
                                                                device="meta").visual.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {f"visual.{k}": (torch.ones(s) if "ln_" in k and k.endswith("weight")  # LayerNorm gains
                             else torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file(state, path)
    return path


@pytest.mark.slow
def test_image_model_run_records_its_clip_embedder_and_draws_grids(data, tmp_path, clip_weights):
    out = tmp_path / "runs"
    args = base_args(data, out, "--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--duration", "0.000008",
                     "--augment", "0.15", "--workers", "1", "--sample", "1")
    args[args.index("pixel-pca")] = "clip-vit-b32"
    run(args + ["--clip-weights", str(clip_weights)])
    d = run_dir(out)
    assert (d / "samples-000000.png").is_file() and (d / "samples-conditioning.png").is_file()
    grid = PIL.Image.open(d / "samples-000000.png")
    assert grid.size == (16, 16)  # 4 samples of 8x8 in a 2x2 grid
    config = read_checkpoint_config(d / "network-snapshot-000000.safetensors")
    assert config.embedder["name"] == "clip-vit-b32" and config.structure["shapes"][1] == [512]
    assert config.net_kwargs["label_dim"] == 512 and config.net_kwargs["augment_dim"] == 9
    assert config.data["data_class"] == "CLIPDataset" and config.data["resolution"] == 8


def test_overfits_a_fixed_batch(tmp_path):
    """8 images, batch 8: every step sees the same batch; the loss on it (fixed noise) must fall."""
    small = write_dataset(tmp_path / "eight.zip", n=8)
    out = tmp_path / "runs"
    arch = ["--arch", "prior", *TINY_PRIOR[2:]]  # vcdm's prior (the release's dalle2 learns this slower)
    run(base_args(small, out, "--exist", "0,1", "--observed", "0,0", *arch, "--augment", "0", "--pca-dim", "4",
                  "--batch", "8", "--ema", "0", "--duration", "0.0008", "--tick", "1", "--lr", "2e-3"))
    snapshot = run_dir(out) / "network-snapshot-000000.safetensors"
    (denoiser, _, tensors), config = load_checkpoint(snapshot), read_checkpoint_config(snapshot)
    emb = load_embedder(config.embedder, tensors["embedder"])
    x = emb.embed(next(image_batches(build_mod.open_dataset(_opts(small)), batch_size=8)))
    torch.manual_seed(1)
    init = Denoiser(build_network(config.network, config.net_kwargs), Structure.from_dict(config.structure),
                    **config.denoiser).eval()

    def loss_of(den):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return torch.stack([EDMLoss()(den, x, generator=g).mean() for _ in range(64)]).mean().item()

    before, after = loss_of(init), loss_of(denoiser)
    assert after < 0.6 * before, (before, after)


def _embed_one_at_a_time(monkeypatch):
    """Make every embedder embed image by image, so its output rows do not depend on how many images a
    call holds (BLAS kernels may block a matrix product by its row count: Intel AMX does). Returns the
    unpatched `embed`."""
    real = Embedder.embed
    monkeypatch.setattr(Embedder, "embed", lambda self, images: torch.cat([real(self, i[None]) for i in images]))
    return real


@pytest.mark.determinism
def test_embedding_cache_trains_as_the_live_embedder(tmp_path, monkeypatch):
    """The cache embeds the dataset once in batches of 64, training without it embeds each batch of
    --batch-gpu: with an embedder whose rows are independent of the batch, each image's cached row is its
    embedding bit for bit, and the two runs' weights are identical. (With the real kernels the table agrees
    with per-batch embeddings to float32 rounding.)"""
    data = write_dataset(tmp_path / "tiny.zip")  # its own cache folder, beside it
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--duration", "0.000008",
            "--sample", "0"]
    real_embed = _embed_one_at_a_time(monkeypatch)
    run(base_args(data, tmp_path / "a", *args, "--embed-cache", "1"))
    run(base_args(data, tmp_path / "b", *args, "--embed-cache", "0"))
    (cache,) = (tmp_path / "cache" / "tiny").glob("embeddings-pixel-pca-*.safetensors")
    table = load_file(cache)["embeddings"]
    snapshot = run_dir(tmp_path / "a") / "network-snapshot-000000.safetensors"
    emb = load_embedder(read_checkpoint_config(snapshot).embedder, load_tensors(snapshot)["embedder"])
    images = list(image_batches(build_mod.open_dataset(_opts(data)), batch_size=4))
    assert table.shape == (16, 8) and torch.equal(table, torch.cat([emb.embed(b) for b in images]))
    torch.testing.assert_close(table, torch.cat([real_embed(emb, b) for b in images]), rtol=1e-5, atol=1e-5)
    assert_same_weights(last_state(run_dir(tmp_path / "a")), last_state(run_dir(tmp_path / "b")))


@pytest.mark.parametrize("data_class, exist, observed, arch, latent, cond_dim", [
    ("ImageFolderDataset", "1,1", "0,1", TINY_UNET, "image", 2),                  # class-conditional images
    ("LabelledCLIPDataset", "0,1,1", "0,0,1", TINY_PRIOR, "embedding", 2),        # prior given the class
    ("LabelledCLIPDataset", "1,1,1", "0,1,1", TINY_UNET, "image", 8 + 2),         # images given embedding + class
])
def test_each_data_class_sets_the_structure_and_conditioning(data, tmp_path, data_class, exist, observed, arch, latent, cond_dim):
    out = tmp_path / "runs"
    run(base_args(data, out, "--data_class", data_class, "--exist", exist, "--observed", observed, *arch,
                  "--augment", "0.1", "--duration", "0.000004", "--sample", "0"))
    config = read_checkpoint_config(run_dir(out) / "network-snapshot-000000.safetensors")
    assert config.structure["names"] == {"ImageFolderDataset": ["image", "label"]}.get(
        data_class, ["image", "embedding", "label"])
    kwargs = config.net_kwargs
    assert kwargs.get("label_dim", kwargs.get("cond_dim")) == cond_dim and config.data["label_dim"] == 2
    assert (config.embedder is None) == (data_class == "ImageFolderDataset")
    assert Structure.from_dict(config.structure).latent_names == (latent,)


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_logs_are_written(data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_ENTITY", "someone")
    monkeypatch.setenv("WANDB_PROJECT", "vcdm-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "runs"
    run(base_args(data, out, "--exist", "0,1", "--observed", "0,0", *TINY_PRIOR, "--augment", "0",
                  "--duration", "0.000008", "--tensorboard", "--wandb_dir", str(tmp_path / "wandb")))
    d = run_dir(out)
    records = [json.loads(line) for line in (d / "stats.jsonl").read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(d / "tensorboard")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["nimg"], pytest.approx(r["loss"], rel=1e-6)) for r in records]  # every tick's loss, at its nimg
    (offline,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert offline.name.endswith(d.name)  # the run directory is named by wandb's run id
    (log,) = offline.glob("run-*.wandb")  # wandb's record log: each history value is stored as its JSON text
    assert all(json.dumps(r["loss"]).encode() in log.read_bytes() for r in records)


# ------------------------------------------------------------------------------------------------ DDP, fine-tuning

@pytest.mark.slow
def test_torchrun_two_processes_match_one(data, tmp_path):
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0.2", "--dropout", "0",
            "--duration", "0.000004", "--sample", "0"]  # one step of a global batch of 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *base_args(data, tmp_path / "ddp", *args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes x 1 rounds x 2" in proc.stdout
    run(base_args(data, tmp_path / "one", *args, "--batch-gpu", "2"))  # 1 process, 2 accumulation rounds
    ddp, one = last_state(run_dir(tmp_path / "ddp")), last_state(run_dir(tmp_path / "one"))
    torch.manual_seed(1)  # the initial weights, as the runs made them
    opts = dataclasses.replace(_opts(data), cbase=8, cres=[1, 1], arch="ddpmpp", embedder="pixel-pca", pca_dim=8,
                               augment=0.2, dropout=0.0)
    init = build_mod.build(opts, torch.device("cpu")).denoiser.net.state_dict()
    names = [n for n, _ in build_mod.build(opts, torch.device("cpu")).denoiser.net.named_parameters()]
    grad_ddp, grad_one = _one_adam_step(init, ddp, names), _one_adam_step(init, one, names)
    scale = max(g.abs().max() for g in grad_one.values())
    assert scale > 0
    for name, g in grad_one.items():  # the same gradient: a mean over the 4 images, summed in another order
        torch.testing.assert_close(grad_ddp[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)

def _one_adam_step(init: dict, state: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Check that a run's weights are exactly one Adam step (PyTorch's formula, bias-corrected) from `init`
    on the gradient its optimiser recorded, and return that gradient by parameter name. Adam's first step
    is about lr * sign(g) whatever the gradient's scale, so the weights alone cannot tell a gradient off by
    a factor (say, summed instead of averaged over processes); the recorded moments can."""
    (group,) = state["optimizer"]["param_groups"]
    lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
    assert lr == 1e-3  # --lr-rampup 0: the full lr at the first step
    grads = {}
    for i, name in enumerate(names):
        m, v = state["optimizer"]["state"][i]["exp_avg"], state["optimizer"]["state"][i]["exp_avg_sq"]
        grads[name] = g = m / (1 - b1)
        torch.testing.assert_close(v, (1 - b2) * g ** 2, rtol=1e-5, atol=0, msg=name)
        expected = init[name] - lr / (1 - b1) * m / (v.sqrt() / (1 - b2) ** 0.5 + eps)
        torch.testing.assert_close(state["net"][name], expected, rtol=1e-6, atol=1e-9, msg=name)
    return grads


@pytest.fixture
def edm_pickle_file(tmp_path, fake_modules):
    """An EDM-format pickle of an unconditional tiny DDPM++, built with the legacy tests' helper."""
    path = tmp_path / "edm-uncond.pkl"
    net, _ = edm_pickle(path, tmp_path / "PAYLOAD_RAN", model_channels=8, channel_mult=[1, 1], num_blocks=4,
                        attn_resolutions=[16], augment_dim=0)
    return path, net.state_dict(), sorted(n for n, _ in net.named_parameters())


def test_pretrained_weights_zero_map_label_and_freeze(data, tmp_path, edm_pickle_file):
    pkl, source, params = edm_pickle_file
    args = ["--exist", "1,1", "--observed", "0,1", *TINY_UNET, "--augment", "0", "--sample", "0",
            "--pretrained_weights", str(pkl), "--freeze_pretrained", "1"]
    out = tmp_path / "a"
    r = run(base_args(data, out, *args, "--duration", "0.000004", "--lr-rampup", "10000"))  # 1 step at lr 0
    assert "zero-initialised new map_label.bias, map_label.weight" in r.output
    state = last_state(run_dir(out))
    assert sorted(state["frozen"]) == params  # every pretrained parameter; map_label (new) trains
    assert torch.count_nonzero(state["net"]["map_label.weight"]) == 0
    for k, v in source.items():
        assert torch.equal(state["net"][k], v), k

    out = tmp_path / "b"
    run(base_args(data, out, *args, "--duration", "0.000008"))  # 2 steps at full lr: only map_label moves
    state = last_state(run_dir(out))
    assert torch.count_nonzero(state["net"]["map_label.weight"]) > 0
    for k, v in source.items():
        assert torch.equal(state["net"][k], v), k


def test_transfer_copies_matching_tensors(data, tmp_path):
    """--transfer (EDM's): an unconditional model's weights initialise a class-conditional one."""
    common = ["--data_class", "ImageFolderDataset", *TINY_UNET, "--augment", "0", "--sample", "0"]
    run(base_args(data, tmp_path / "src", *common, "--exist", "1,0", "--observed", "0,0", "--duration", "0.000008"))
    src = run_dir(tmp_path / "src") / "network-snapshot-000000.safetensors"
    args = base_args(data, tmp_path / "dst", *common, "--exist", "1,1", "--observed", "0,1",
                     "--duration", "0.000004", "--lr-rampup", "10000", "--transfer", str(src))  # 1 step at lr 0
    r = run(args)  # (the later --data_class wins, as click does for repeated options)
    assert "Transferred" in r.output
    source, state = load_tensors(src)["net"], last_state(run_dir(tmp_path / "dst"))["net"]
    assert "map_label.weight" in state and "map_label.weight" not in source
    for k, v in source.items():
        assert torch.equal(state[k], v), k
