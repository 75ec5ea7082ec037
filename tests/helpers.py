"""Test helpers: seeded models with realistic BatchNorm statistics, reference-relative tolerances."""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# (device, backend) pairs that run here: on CPU, "triton" means Triton's interpreter, which
# conftest switches on when there is no GPU.
DEVICE_BACKENDS = [("cpu", "torch")] + ([("cpu", "triton")] if _INTERPRET else []) + (
    [("cuda", "torch"), ("cuda", "triton")] if torch.cuda.is_available() else [])


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
    return module


def max_err(a, b) -> float:
    if not torch.is_tensor(a) or not torch.is_tensor(b):
        assert not torch.is_tensor(a) and not torch.is_tensor(b) and a == b, (a, b)
        return 0.0
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(fast, exact, plain, factor: float = 4.0, floor: float = 1e-6):
    """``fast`` may differ from the fp64 ``exact`` by at most ``factor`` times the error that
    ``plain`` (the reference in the same precision as ``fast``) makes, plus a floor scaled to
    the output's magnitude (for outputs where plain torch happens to be exact)."""
    fast = fast if isinstance(fast, tuple) else (fast,)
    exact = exact if isinstance(exact, tuple) else (exact,)
    plain = plain if isinstance(plain, tuple) else (plain,)
    for f, e, p in zip(fast, exact, plain, strict=True):
        if not torch.is_tensor(e):
            assert f == e and p == e, (f, e, p)
            continue
        scale = e.abs().max().item() if e.numel() else 0.0
        err_fast, err_plain = max_err(f, e), max_err(p, e)
        bound = factor * err_plain + floor * max(scale, 1.0)
        assert err_fast <= bound, f"fused error {err_fast:.3g} > {bound:.3g} (plain torch error {err_plain:.3g})"


def to_device(x, device, dtype=None):
    if isinstance(x, tuple):
        return tuple(to_device(t, device, dtype) for t in x)
    if not torch.is_tensor(x):
        return x
    return x.to(device=device, dtype=dtype or x.dtype)


def triple(module: nn.Module, device: str):
    """(fp64 reference, fp32 reference, fp32 copy) of a module, in eval mode on ``device``."""
    module = module.eval()
    return (copy.deepcopy(module).double().to(device), copy.deepcopy(module).to(device),
            copy.deepcopy(module).to(device))


def backend_env(monkeypatch, backend: str):
    """Force ``backend`` (torch, triton, cuda) for the rest of the test."""
    monkeypatch.setenv("FFC_KERNELS_BACKEND", backend)
