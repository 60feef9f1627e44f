"""Stand-ins that pickle exactly as EDM's and the original release's modules do (torch_utils.persistence,
training.structure), without their code: the tests build EDM-format pickles from vcdm modules with them.
The `fake_modules` and `marker` fixtures (conftest.py) register the stand-ins and a payload marker file."""
from __future__ import annotations

import collections
import contextlib
import pickle
import sys
import types
import zlib

import numpy as np
import torch

from vcdm.nets.edm2 import EDM2UNet, MPConv, MPFourier
from vcdm.nets.songunet import SongUNet

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
            embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
            resample_filter=[1, 1], augment_dim=9)


def reconstruct_stub(meta):  # what the pickle names; the real one would exec meta['module_src']
    raise AssertionError("the file's reconstruct function was called")


def payload_src(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass SongUNet: pass\n"


class Persistent:
    """Stand-in for an EDM persistent object: pickles exactly as torch_utils.persistence makes it."""

    def __init__(self, class_name, state, src):
        self.class_name, self.state, self.src = class_name, state, src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.src, class_name=self.class_name, state=self.state)
        return reconstruct_stub, (meta,)


class SeedStructure:
    """Stand-in for the release's training.structure.Structure (pickled by name with its __dict__)."""


reconstruct_stub.__module__, reconstruct_stub.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
SeedStructure.__module__, SeedStructure.__qualname__ = "training.structure", "Structure"


EDM2_CLASS_NAMES = {"EDM2UNet": "UNet"}  # vcdm class -> the name EDM2's pickles record


def edm_form(module, src, init_kwargs=None):
    """A vcdm module tree in EDM's pickled form: our classes as persistent records, torch containers
    (ModuleDict) pickled by reference, as EDM's are."""
    if type(module).__module__.startswith("torch.nn"):
        clone = type(module)()
        clone.__dict__["_modules"] = collections.OrderedDict((k, edm_form(v, src))
                                                             for k, v in module._modules.items())
        return clone
    state = {k: v for k, v in module.__getstate__().items()
             if isinstance(v, (bool, int, float, str, type(None), dict, set))}
    state["_modules"] = collections.OrderedDict((k, None if v is None else edm_form(v, src))
                                                for k, v in module._modules.items())
    kwargs = dict(init_kwargs or {})
    if type(module).__name__ == "UNetBlock":
        kwargs["skip_scale"] = np.sqrt(0.5)  # EDM records numpy scalars among constructor kwargs
    state["_init_args"], state["_init_kwargs"] = (), kwargs
    name = type(module).__name__
    return Persistent(EDM2_CLASS_NAMES.get(name, name), state, src)


def tiny_net(label_dim=0, seed=0, **over):
    torch.manual_seed(seed)
    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=label_dim, **{**TINY, **over})
    net = SongUNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # make zero-initialised tensors distinguishable too
    return net, kwargs


GEOMETRY = ("img_resolution", "in_channels", "out_channels", "label_dim")  # EDM's preconditioner passes these


def edm_pickle(path, marker, *, precond="VPPrecond", label_dim=0, save="pickle", **over):
    """An EDM network pickle of a tiny SongUNet; returns the vcdm net it was made from."""
    net, kwargs = tiny_net(label_dim, **over)
    model_kwargs = {k: v for k, v in kwargs.items() if k not in GEOMETRY}
    pkw = dict(img_resolution=8, img_channels=3, label_dim=label_dim, use_fp16=False, model_type="SongUNet",
               **model_kwargs)
    attrs = dict(img_resolution=8, img_channels=3, label_dim=label_dim, use_fp16=False)
    if precond == "VPPrecond":
        pkw.update(beta_d=18.0, beta_min=0.2, M=1000, epsilon_t=1e-5)
        attrs.update(beta_d=18.0, beta_min=0.2, M=1000, epsilon_t=1e-5, sigma_min=0.002, sigma_max=80.0)
    elif precond == "VEPrecond":
        attrs.update(sigma_min=0.02, sigma_max=100)
    else:
        attrs.update(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    src = payload_src(marker)
    state = dict(training=False, _parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(),
                 _modules=collections.OrderedDict(model=edm_form(net, src, kwargs)), _init_args=(),
                 _init_kwargs=pkw, **attrs)
    data = dict(ema=Persistent(precond, state, src),
                loss_fn=Persistent("VPLoss", dict(beta_d=18.0, _init_args=(), _init_kwargs={}), src),
                augment_pipe=None, dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                                       path="datasets/tiny.zip", resolution=8, max_size=10))
    with open(path, "wb") as f:
        if save.startswith("pickle"):
            pickle.dump(data, f, protocol=int(save[6:] or pickle.DEFAULT_PROTOCOL))
        else:
            torch.save(data, f, _use_new_zipfile_serialization=(save == "zip"))
    return net, kwargs


# ------------------------------------------------------------------------------------------------ EDM2

EDM2_NET = dict(img_resolution=16, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8])  # tests/data/edm2-generate.json's network
EDM2_LOGVAR = 32


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict, the dict EDM2's training loop pickles."""


EasyDict.__module__ = "dnnlib.util"


@contextlib.contextmanager
def dnnlib_module():
    """Register `dnnlib.util` while pickling, so the pickler can name EasyDict as EDM2's files do."""
    saved = {name: sys.modules.get(name) for name in ("dnnlib", "dnnlib.util")}
    pkg, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict, pkg.util = EasyDict, util
    sys.modules.update({"dnnlib": pkg, "dnnlib.util": util})
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def edm2_weights(name, shape):
    """The seeded weights of tests/data/edm2-generate.json (name: vcdm's, i.e. EDM2's without 'unet.')."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def edm2_modules(label_dim=0, logvar_channels=EDM2_LOGVAR, weight_prefix="", **over):
    """vcdm's EDM2UNet and uncertainty head with the seeded weights (named ``weight_prefix`` + vcdm's name), in
    float16 as EDM2 pickles them."""
    kwargs = dict(EDM2_NET, label_dim=label_dim, **over)
    unet, head = EDM2UNet(**kwargs), {"logvar_fourier": MPFourier(logvar_channels),
                                      "logvar_linear": MPConv(logvar_channels, 1, kernel=[])}
    with torch.no_grad():
        for prefix, module in (("", unet), *((f"{k}.", m) for k, m in head.items())):
            for name, t in module.state_dict().items():
                t.copy_(edm2_weights(weight_prefix + prefix + name, t.shape))
            module.half()
    return unet, head, kwargs


def edm2_state(label_dim=0, **over):
    """The network state dict vcdm should import (vcdm names, float16)."""
    unet, head, _ = edm2_modules(label_dim, **over)
    return {**unet.state_dict(), **{f"{k}.{n}": t for k, m in head.items() for n, t in m.state_dict().items()}}


VAE_ENCODER = dict(vae_name="stabilityai/sd-vae-ft-mse", scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]),
                   batch_size=8, _vae=None)
VAE_ENCODER["bias"] = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * VAE_ENCODER["scale"]


def edm2_pickle(path, marker, *, label_dim=0, encoder="StandardRGBEncoder", snapshot=True, precond_over=None,
                unet_kwargs=None, encoder_over=None, **over):
    """An EDM2 network pickle as EDM2's training loop writes it (snapshot=True: with loss_fn and dataset_kwargs;
    False: only ema and encoder, what generate_images.py reads); returns the vcdm state it should import.
    ``unet_kwargs`` replaces the UNet's recorded constructor arguments, ``precond_over`` the Precond's attributes,
    ``encoder_over`` the encoder's."""
    unet, head, kwargs = edm2_modules(label_dim, **over)
    src = payload_src(marker)
    pkw = dict(kwargs, use_fp16=True, logvar_channels=EDM2_LOGVAR)
    modules = collections.OrderedDict(unet=edm_form(unet, src, unet_kwargs if unet_kwargs is not None else kwargs))
    modules.update((k, edm_form(m, src)) for k, m in head.items())
    state = dict(training=False, _parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(),
                 _modules=modules, img_resolution=kwargs["img_resolution"], img_channels=kwargs["img_channels"],
                 label_dim=label_dim, use_fp16=True, sigma_data=0.5, _init_args=(), _init_kwargs=pkw)
    state.update(precond_over or {})
    enc_state = {**(VAE_ENCODER if encoder == "StabilityVAEEncoder" else {}), **(encoder_over or {})}
    data = EasyDict(encoder=Persistent(encoder, {"_init_args": (), "_init_kwargs": {}, **enc_state}, src))
    if snapshot:
        data.update(dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                                            use_labels=bool(label_dim)),
                    loss_fn=Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(),
                                                        _init_kwargs={}), src))
    data["ema"] = Persistent("Precond", state, src)
    with dnnlib_module(), open(path, "wb") as f:
        pickle.dump(data, f)
    return edm2_state(label_dim, **over)
