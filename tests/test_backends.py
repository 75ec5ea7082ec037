"""One place decides the backend: defaults, the environment override, and the reasons it gives."""
import pytest
import torch

from ffc_kernels import backend_info, backends


def test_cpu_tensors_take_the_torch_path(monkeypatch):
    monkeypatch.delenv("FFC_KERNELS_BACKEND", raising=False)
    assert backends.select(torch.device("cpu")) == "torch"
    info = backend_info("cpu")
    assert info.selected == "torch" and info.reasons["torch"] is None
    assert "CUDA tensors" in info.reasons["cuda"] or "not built" in info.reasons["cuda"]


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "torch")
    assert backends.select(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "TRITON")
    if backends.triton_interpret():
        assert backends.select(torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backends.select(torch.device("cpu"))


def test_forcing_the_missing_extension_says_why(monkeypatch):
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FFC_KERNELS_BACKEND=cuda cannot run"):
        backends.select(torch.device("cpu"))
    info = backend_info("cpu")
    assert info.forced == "cuda" and info.selected.startswith("none")


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "opencl")
    with pytest.raises(ValueError, match="cuda, triton, torch"):
        backends.select(torch.device("cpu"))


def test_default_precision_follows_cudnn_tf32_like_the_convolutions_replaced():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        for matmul in ("highest", "medium"):  # torch's matmul setting governs matmuls, not convolutions
            torch.set_float32_matmul_precision(matmul)
            for allow_tf32, expected in ((True, "tf32"), (False, "fp32")):
                torch.backends.cudnn.allow_tf32 = allow_tf32
                assert backends.matmul_precision() == expected
                assert f"precision on fp32 data: {expected} " in str(backends.backend_info("cpu"))
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_precision_names_are_checked():
    assert backends.check_precision(None) is None
    for name in ("fp32", "tf32", "bf16"):
        assert backends.check_precision(name) == name
    with pytest.raises(ValueError, match="fp32, tf32, bf16"):
        backends.check_precision("tf32x3")


def test_report_is_readable(monkeypatch):
    monkeypatch.delenv("FFC_KERNELS_BACKEND", raising=False)
    text = str(backend_info("cpu"))
    assert text.splitlines()[0] == "ffc_kernels backend on cpu: torch"
    for name in backends.BACKENDS:
        assert f"  {name}" in text


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.delenv("FFC_KERNELS_BACKEND", raising=False)
    if torch.cuda.is_available():  # on a GPU machine, pretend there is none
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = backend_info("cuda")
    assert info.selected == "none (torch sees no CUDA device)"
    assert info.reasons["triton"] in ("torch sees no CUDA device", backends._TRITON_ERROR)
    assert info.reasons["torch"] == "torch sees no CUDA device"
    assert "available" not in str(info)


def test_cuda_index_beyond_the_gpus_says_so(monkeypatch):
    monkeypatch.delenv("FFC_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    info = backend_info("cuda:2")
    assert info.selected == "none (torch sees 2 CUDA devices, so there is no cuda:2)"
    assert "triton" not in info.selected
