"""load_generator: every checkpoint format LaMa users have, built here from seeded random weights.

The formats are made the way their producers make them (a Lightning-style dict with custom
classes, traced and scripted TorchScript wrappers, plain state dicts), so no download is needed.
A 2-block big-lama keeps the files small; one test uses the 9-block lama-fourier to check the block
count.
"""
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Tuple

import pytest
import torch
import torch.nn as nn
from PIL import Image

from ffc_kernels.reference import build_reference_generator
from lama_fast import checkpoints
from lama_fast.checkpoints import CheckpointError, load_generator


class TrainingConfig:
    """Stands for the omegaconf DictConfig LaMa pickles as ``hyper_parameters``."""

    def __init__(self, **content):
        self.content = content


class RunsOnLoad:
    """A pickle payload: unpickling it calls ``function(argument)``."""

    def __init__(self, function, argument):
        self.function = function
        self.argument = argument

    def __reduce__(self):
        return self.function, (self.argument,)


class Holder(nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.generator = generator


class Wrapper(nn.Module):
    """IOPaint's big-lama.pt layout: the generator at ``model.generator``, masked image in."""

    def __init__(self, generator):
        super().__init__()
        self.model = Holder(generator)

    def forward(self, image, mask):
        return self.model.generator(torch.cat([image * (1 - mask), mask], 1))


def random_generator(name="big-lama", n_blocks=2, seed=0):
    """A generator whose every parameter and buffer, BatchNorm statistics included, is random."""
    torch.manual_seed(seed)
    generator = build_reference_generator(name, n_blocks=n_blocks)
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, ())))
    return generator.eval()


def assert_same_generator(loaded, source):
    assert not loaded.training
    expected = source.state_dict()
    found = loaded.state_dict()
    assert list(found) == list(expected)
    for key, tensor in expected.items():
        assert found[key].device.type == "cpu"
        assert found[key].dtype == tensor.dtype, key
        assert torch.equal(found[key], tensor), key
    torch.manual_seed(1)
    x = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.fixture(scope="module")
def source():
    return random_generator()


@pytest.fixture(scope="module")
def plain_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "generator.pth"
    torch.save(source.state_dict(), path)
    return path


def lightning_checkpoint(generator, **extra):
    """What LaMa's best.ckpt holds: every submodule's weights, config objects, optimizer state."""
    torch.manual_seed(2)
    state_dict = OrderedDict((f"generator.{key}", value) for key, value in generator.state_dict().items())
    state_dict["discriminator.model0.0.weight"] = torch.randn(64, 3, 4, 4)
    state_dict["loss_resnet_pl.impl.conv1.weight"] = torch.randn(64, 3, 7, 7)
    state_dict["val_evaluator.scores.ssim.window"] = torch.randn(1, 1, 11, 11)
    return {
        "epoch": 39,
        "global_step": 1_000_000,
        "pytorch-lightning_version": "1.2.9",
        "state_dict": state_dict,
        "hyper_parameters": TrainingConfig(generator=TrainingConfig(kind="ffc_resnet", n_blocks=2), lr=1e-3),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(8)}}, "param_groups": [{"lr": 1e-3}]}],
        "lr_schedulers": [],
        **extra,
    }


# Zip is torch.save's format since torch 1.6; older Lightning files are in the legacy format.
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_checkpoint(source, tmp_path, zip_format):
    path = tmp_path / "best.ckpt"
    torch.save(lightning_checkpoint(source), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError):  # the custom class is what weights_only refuses
        torch.load(path, weights_only=True)
    assert_same_generator(load_generator(path), source)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_in_a_checkpoint_does_not_run(source, tmp_path, zip_format):
    markers = [tmp_path / "os_system_ran", tmp_path / "exec_ran"]
    payloads = {
        "callbacks": RunsOnLoad(os.system, f'echo ran > "{markers[0]}"'),
        "loops": RunsOnLoad(exec, f"open({str(markers[1])!r}, 'w').close()"),
    }
    path = tmp_path / "best.ckpt"
    torch.save(lightning_checkpoint(source, **payloads), path, _use_new_zipfile_serialization=zip_format)

    assert_same_generator(load_generator(path), source)
    assert not any(marker.exists() for marker in markers)

    # Control: the payloads are live, plain unpickling runs them.
    torch.load(path, weights_only=False)
    assert all(marker.exists() for marker in markers)


def _no_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load runs the archive's code; load_generator must not call it")


def _jit_state_dict(path):
    with warnings.catch_warnings():  # torch.jit's deprecation notice (its class varies by torch version)
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _traced_wrapper(generator):
    image, mask = torch.rand(1, 3, 64, 64), (torch.rand(1, 1, 64, 64) > 0.5).float()
    return torch.jit.trace(Wrapper(generator), (image, mask), check_trace=False)


def _scripted_wrapper(generator):
    # The reference generator's forward is not scriptable; IOPaint-style wrappers around a traced
    # generator are: the wrapper and holder are scripted modules, the generator a traced one.
    traced = torch.jit.trace(generator, torch.rand(1, 4, 64, 64), check_trace=False)
    return torch.jit.script(Wrapper(traced))


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("export", [_traced_wrapper, _scripted_wrapper], ids=["traced", "scripted"])
def test_torchscript_archive(source, tmp_path, monkeypatch, export):
    path = tmp_path / "big-lama.pt"
    export(source).save(str(path))
    expected = _jit_state_dict(path)  # the state dict torch.jit.load would give (a trusted file here)
    assert any(key.startswith("model.generator.model.") for key in expected)

    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    rebuilt = checkpoints._read(str(path))
    assert list(rebuilt) == list(expected)
    for key, tensor in expected.items():
        assert rebuilt[key].dtype == tensor.dtype, key
        assert torch.equal(rebuilt[key], tensor), key
    assert_same_generator(load_generator(path), source)


class ScriptedSetstate(nn.Module):
    """A TorchScript module whose scripted ``__setstate__`` runs when torch.jit.load reads it."""

    def __init__(self):
        super().__init__()
        self.w = torch.zeros(1)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print(">>> code from the file ran")
        self.w = state[0]
        self.training = state[1]


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_code_in_a_torchscript_archive_does_not_run(tmp_path, capfd, monkeypatch):
    path = tmp_path / "best.ckpt"
    torch.jit.save(torch.jit.script(ScriptedSetstate()), str(path))
    capfd.readouterr()

    with monkeypatch.context() as patch:
        patch.setattr(torch.jit, "load", _no_jit_load)
        no_weights = r"no LaMa generator weights in .*best\.ckpt.*found top-level keys: none"
        with pytest.raises(CheckpointError, match=no_weights):
            load_generator(path)
    captured = capfd.readouterr()
    assert "code from the file ran" not in captured.out + captured.err

    # Control: the payload is live, torch.jit.load runs it (TorchScript prints through C++ stdout).
    _jit_state_dict(path)
    assert "code from the file ran" in capfd.readouterr().out


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd},
        lambda sd: {f"module.{key}": value for key, value in sd.items()},
        lambda sd: {"state_dict": {f"model.generator.{key}": value for key, value in sd.items()}},
    ],
    ids=["bare", "under-state_dict", "module-prefix", "model.generator-prefix"],
)
def test_plain_state_dict(source, tmp_path, wrap):
    path = tmp_path / "generator.pth"
    torch.save(wrap(source.state_dict()), path)
    assert_same_generator(load_generator(path), source)


def test_block_count_read_from_keys(plain_file, tmp_path):
    assert sum(key.endswith(".conv1.ffc.convl2l.weight") for key in load_generator(plain_file).state_dict()) == 2
    nine = random_generator("lama-fourier", n_blocks=None, seed=3)
    path = tmp_path / "lama-fourier.pth"
    torch.save(nine.state_dict(), path)
    assert_same_generator(load_generator(path), nine)


def test_cuda_saved_tensors_load_on_cpu(source, tmp_path, monkeypatch):
    path = tmp_path / "from-gpu.pth"
    with monkeypatch.context() as patch:
        # torch.save records each storage's device through location_tag: tag them as a GPU would.
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(source.state_dict(), path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert_same_generator(load_generator(path), source)


def test_device_argument(plain_file):
    assert next(load_generator(plain_file, device="cpu").parameters()).device == torch.device("cpu")
    assert next(load_generator(plain_file, device=torch.device("cpu")).parameters()).device.type == "cpu"


def test_cuda_without_a_gpu_is_a_clear_error(plain_file, monkeypatch):
    if torch.cuda.is_available():  # on a GPU machine, pretend there is none
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", torch.device("cuda:0")):
        with pytest.raises(ValueError, match=r"requested but torch sees no CUDA device; use device='cpu'"):
            load_generator(plain_file, device=device)


def test_cuda_index_beyond_the_gpus_is_a_clear_error(plain_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device cuda:1 requested but torch sees 1 CUDA device"):
        load_generator(plain_file, device="cuda:1")


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


def _bad_files():
    """Each case: write a bad file into a folder, and the error message it must give."""

    def missing(folder, sd):
        return folder / "nope.ckpt"

    def directory(folder, sd):
        return folder

    def text(folder, sd):
        path = folder / "notes.ckpt"
        path.write_text("hello, this is not a checkpoint\n")
        return path

    def png(folder, sd):
        path = folder / "mask.pth"
        Image.new("L", (8, 8)).save(path, format="PNG")
        return path

    def empty(folder, sd):
        path = folder / "empty.pt"
        path.write_bytes(b"")
        return path

    def truncated(folder, sd):
        path = folder / "best.ckpt"
        torch.save({"state_dict": {f"generator.{k}": v for k, v in sd.items()}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    def save(obj, name="generator.pth"):
        def write(folder, sd):
            path = folder / name
            torch.save(obj(sd), path)
            return path

        return write

    extra = torch.zeros(1)
    wrong_shape = torch.zeros(3, 3)
    return [
        ("missing", missing, r"no such file: .*nope\.ckpt"),
        ("directory", directory, r"not a file: "),
        ("text", text, r"notes\.ckpt is not a PyTorch checkpoint \("),
        ("png", png, r"mask\.pth is not a PyTorch checkpoint"),
        ("empty", empty, r"empty\.pt is not a PyTorch checkpoint"),
        ("truncated", truncated, r"best\.ckpt is not a PyTorch checkpoint"),
        (
            "missing-keys",
            save(lambda sd: _without(_without(sd, "model.1.bn_l.running_mean"), "model.5.conv2.bn_g.weight")),
            r"generator\.pth \(generator under prefix '', 2 residual blocks\) does not match LaMa's generator: "
            r"missing keys \(2\): model\.1\.bn_l\.running_mean, model\.5\.conv2\.bn_g\.weight$",
        ),
        (
            "unexpected-keys",
            save(lambda sd: {"state_dict": {**{f"generator.{k}": v for k, v in sd.items()},
                                            "generator.model.1.ffc.extra": extra}}),
            r"prefix 'generator\.', 2 residual blocks\) does not match LaMa's generator: "
            r"unexpected keys \(1\): model\.1\.ffc\.extra$",
        ),
        (
            "missing-and-unexpected",
            save(lambda sd: {**{k.replace("bn_l", "bn_local"): v for k, v in sd.items()}}),
            r"missing keys \(\d+\): model\.1\.bn_l\.weight, .*, \.\.\.; unexpected keys \(\d+\): model\.1\.bn_local\.weight",
        ),
        (
            "shape-mismatch",
            save(lambda sd: {**sd, "model.5.conv1.ffc.convg2g.conv1.0.weight": wrong_shape}),
            r"shape mismatch for model\.5\.conv1\.ffc\.convg2g\.conv1\.0\.weight: "
            r"LaMa's generator has \(192, 384, 1, 1\), the checkpoint has \(3, 3\)",
        ),
        (
            "no-generator",
            save(lambda sd: {"epoch": 1, "state_dict": {"discriminator.model0.0.weight": extra}}, "best.ckpt"),
            r"no LaMa generator weights in .*best\.ckpt: looked for '<prefix>model\.1\.ffc\.convl2l\.weight' "
            r"with a prefix such as '', 'generator\.', 'model\.generator\.', 'module\.', at the top level and "
            r"under 'state_dict'; found top-level keys: epoch, state_dict",
        ),
        ("bare-tensor", save(lambda sd: extra), r"no LaMa generator weights .*found a Tensor"),
        (
            "two-generators",
            save(lambda sd: {**{f"generator.{k}": v for k, v in sd.items()},
                             **{f"generator_average.{k}": v for k, v in sd.items()}}),
            r"holds several generators, under the prefixes 'generator\.', 'generator_average\.'",
        ),
    ]


@pytest.mark.parametrize("write, message", [case[1:] for case in _bad_files()], ids=[case[0] for case in _bad_files()])
def test_bad_files(source, tmp_path, write, message):
    path = write(tmp_path, source.state_dict())
    with pytest.raises(CheckpointError) as error:
        load_generator(path)
    assert re.search(message, str(error.value)), str(error.value)
