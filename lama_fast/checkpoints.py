"""Loading LaMa generator weights from the files people actually have.

Three formats, told apart by content rather than by file name:

- LaMa's PyTorch-Lightning ``best.ckpt``: ``{"state_dict": {"generator.model...": ...,
  "discriminator....": ..., ...}, "hyper_parameters": <omegaconf config>, "epoch": ..., ...}``.
- The TorchScript ``big-lama.pt`` that IOPaint / lama-cleaner distribute: a traced (or scripted)
  wrapper whose state dict holds the generator under ``model.generator.``.
- A plain generator state dict (keys ``model.<i>....``), bare or under ``"state_dict"``, with or
  without a ``generator.`` / ``model.generator.`` / ``module.`` prefix.

Checkpoint files come from strangers, and a pickle can name any Python callable. Files load with
``torch.load(weights_only=True)`` first. Lightning files pickle their own classes (configs,
callback state) beside the weights, which ``weights_only`` refuses; those load with an unpickler
that resolves only tensor-rebuilding globals and turns every other class or function into an inert
placeholder, so nothing in the file runs.

TorchScript archives are not given to ``torch.jit.load`` (nor to ``torch.load``, which hands them to
it): that would compile the archive's code and run it, a scripted ``__setstate__`` included. Their
``data.pkl`` is unpickled with the same restricted unpickler, its storages read from the archive's
``data/<key>`` records. Each scripted module in it is a placeholder holding the attribute dict the
archive gives it (placeholders keep what they are given, they never act on it); the state dict is
rebuilt by walking those dicts from the root module, naming each tensor by its dotted attribute
path, which gives the parameters and buffers ``state_dict()`` would (BatchNorm statistics and
``num_batches_tracked`` included). A module whose state is not an attribute dict (a custom
``__getstate__``) contributes no tensors.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import types
import zipfile
from collections.abc import Mapping

import torch
import torch.jit._pickle
import torch.nn as nn

from lama_fast.generator import build_generator

__all__ = ["CheckpointError", "load_generator"]


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded as a LaMa generator, and why."""


# The key that marks a LaMa generator: the stem's local 7x7 convolution. Whatever precedes it in a
# file's keys is the prefix the generator was saved under.
_ANCHOR_KEY = "model.1.ffc.convl2l.weight"
_KNOWN_PREFIXES = ("", "generator.", "model.generator.", "module.")
# FFCResnetBlocks are the only generator modules with an FFC inside ``conv1``.
_RESNET_BLOCK_KEY = re.compile(r"model\.(\d+)\.conv1\.ffc\.")
_SHOWN_KEYS = 5


def load_generator(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """LaMa's generator with the weights in ``path``, in eval mode on ``device`` (default cpu).

    ``path`` is a Lightning ``best.ckpt``, a TorchScript ``big-lama.pt`` or a plain generator
    state dict; the number of residual blocks is read from the keys. Raises ``CheckpointError``
    with the reason when the file is missing, is not a checkpoint, holds no generator, or holds
    one whose keys or shapes differ from LaMa's, and ``ValueError`` when ``device`` is not one
    torch can use here (``"cuda"`` without a CUDA device).
    """
    device = _usable_device(device)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"not a file: {path}")

    state_dict, prefix = _find_generator_weights(_read(path), path)
    n_blocks = len({int(match.group(1)) for key in state_dict if (match := _RESNET_BLOCK_KEY.match(key))})
    generator = build_generator("big-lama", n_blocks=n_blocks)
    _check_keys_and_shapes(generator.state_dict(), state_dict, path, prefix, n_blocks)
    generator.load_state_dict(state_dict, strict=True)
    return generator.eval().to(device)


def _usable_device(device) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying why torch cannot put weights there.

    Checked before the file is read, so a missing GPU is reported as such rather than as a driver
    traceback from ``.to()`` after a long load.
    """
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but torch sees no CUDA device; use device='cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} requested but torch sees {count} CUDA device(s)")
    return device


def _read(path):
    """The unpickled contents of ``path`` (a TorchScript archive gives its state dict), on cpu."""
    if _is_torchscript_archive(path):
        try:
            root = torch.serialization._load(
                torch._C.PyTorchFileReader(path), "cpu", _restricted_pickle, pickle_file="data.pkl"
            )
            return _torchscript_state_dict(root)
        except Exception as err:
            raise CheckpointError(
                f"{path} looks like a TorchScript archive but does not load ({type(err).__name__}: {err})"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # classes beyond torch's allowlist (Lightning's), or not a pickle: the load below tells which
    except Exception as err:
        raise _not_a_checkpoint(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as err:
        raise _not_a_checkpoint(path, err) from err


def _is_torchscript_archive(path):
    # torch.jit.save writes ``<archive>/constants.pkl`` and ``<archive>/code/``; torch.save does not.
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.partition("/")[2] == "constants.pkl" for name in names)


def _torchscript_state_dict(root):
    """The tensors under the module placeholder ``root``, keyed by dotted attribute path.

    A TorchScript archive pickles each module as its class (a placeholder here) built with a dict
    of its attributes: parameters, buffers, submodules, flags. Tensors anywhere else (in lists, in
    a custom ``__getstate__``'s tuple) are not part of a state dict and are left out.
    """
    state_dict = collections.OrderedDict()
    seen = set()
    stack = [("", root)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen or not isinstance(module, _Inert) or not isinstance(module.state, Mapping):
            continue
        seen.add(id(module))
        submodules = []
        for name, value in module.state.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                state_dict[prefix + name] = value
            elif isinstance(value, _Inert):
                submodules.append((f"{prefix}{name}.", value))
        stack.extend(reversed(submodules))  # depth first, in attribute order, as state_dict() walks
    return state_dict


def _not_a_checkpoint(path, err):
    return CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})")


def _find_generator_weights(contents, path):
    """The generator's state dict with its prefix stripped, and that prefix."""
    candidates = [contents]
    if isinstance(contents, Mapping) and isinstance(contents.get("state_dict"), Mapping):
        candidates.append(contents["state_dict"])
    for weights in candidates:
        if not isinstance(weights, Mapping):
            continue
        prefixes = sorted(
            {key[: -len(_ANCHOR_KEY)] for key in weights if isinstance(key, str) and key.endswith(_ANCHOR_KEY)}
        )
        prefixes = [prefix for prefix in prefixes if prefix == "" or prefix.endswith(".")]
        if len(prefixes) > 1:
            raise CheckpointError(
                f"{path} holds several generators, under the prefixes {', '.join(map(repr, prefixes))}; "
                "save the one to use as a plain state dict"
            )
        if prefixes:
            prefix = prefixes[0]
            generator = {
                key[len(prefix):]: value
                for key, value in weights.items()
                if isinstance(key, str) and key.startswith(prefix)
            }
            return generator, prefix

    if isinstance(contents, Mapping):
        found = f"top-level keys: {_first_keys(list(contents))}"
    else:
        found = f"a {type(contents).__name__}"
    raise CheckpointError(
        f"no LaMa generator weights in {path}: looked for '<prefix>{_ANCHOR_KEY}' with a prefix such as "
        f"{', '.join(map(repr, _KNOWN_PREFIXES))}, at the top level and under 'state_dict'; found {found}"
    )


def _check_keys_and_shapes(expected, found, path, prefix, n_blocks):
    """Raise a CheckpointError naming the keys or shapes that make ``strict=True`` loading fail."""
    where = f"{path} (generator under prefix {prefix!r}, {n_blocks} residual blocks)"
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_first_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_first_keys(unexpected)}")
        raise CheckpointError(f"{where} does not match LaMa's generator: {'; '.join(problems)}")
    for key, tensor in expected.items():
        value = found[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: {key} should be a tensor, found a {type(value).__name__}")
        if value.shape != tensor.shape:
            raise CheckpointError(
                f"{where}: shape mismatch for {key}: LaMa's generator has {tuple(tensor.shape)}, "
                f"the checkpoint has {tuple(value.shape)}"
            )


def _first_keys(keys):
    if not keys:
        return "none"
    shown = ", ".join(map(str, keys[:_SHOWN_KEYS]))
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


# What a weights-only load needs: tensor and parameter rebuilding, sizes, devices, dtypes and the
# containers that protocol 2 pickles through a global. torch.load resolves ``*Storage`` names itself
# before asking the unpickler.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): torch._utils._rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    # TorchScript's data.pkl tags typed lists and dicts with these; each returns its argument.
    **{
        ("torch.jit._pickle", name): getattr(torch.jit._pickle, name)
        for name in ("restore_type_tag", "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")
    },
}


class _Inert:
    """Stands in for every class or function a checkpoint names outside ``_ALLOWED_GLOBALS``.

    It accepts whatever the pickle hands it and never acts on it: the constructor arguments go to
    ``args``, the state a BUILD gives (a TorchScript module's attribute dict) to ``state``; items
    and appends are dropped.
    """

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args = args
        self.state = None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _ALLOWED_GLOBALS.get((module, name), _Inert)


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load's ``pickle_module``: it subclasses ``Unpickler`` for the pickled objects and calls
# ``load`` for the headers of the legacy (pre-zip) format.
_restricted_pickle = types.SimpleNamespace(
    __name__="lama_fast.checkpoints._restricted_pickle", Unpickler=_RestrictedUnpickler, load=_restricted_load
)
