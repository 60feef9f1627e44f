"""Stand-ins that pickle exactly as EDM's and the original release's modules do (torch_utils.persistence,
training.structure), without their code: the tests build EDM-format pickles from vcdm modules with them.
The `fake_modules` and `marker` fixtures (conftest.py) register the stand-ins and a payload marker file."""
from __future__ import annotations

import collections
import pickle

import numpy as np
import torch

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
    return Persistent(type(module).__name__, state, src)


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
