"""Fixtures shared by the test files. Tests marked ``gpu`` are skipped when torch sees no CUDA device,
tests marked ``weights`` when the real big-lama.pt has not been downloaded into lama-fast's cache.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton decides
that when a kernel is decorated, so the variable is set here, before any test imports
ffc_kernels; CPU tensors still take the torch path unless a test asks for Triton.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from lama_fast.download import MODELS, cache_directory

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_weights = pytest.mark.skip(reason="needs big-lama.pt in the cache: lama-fast download big-lama")
    has_weights = (cache_directory() / MODELS["big-lama"].filename).is_file()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "weights" in item.keywords and not has_weights:
            item.add_marker(skip_weights)


@pytest.fixture
def fp32():
    """IEEE fp32 everywhere (no TF32 in matmuls or cuDNN convolutions) for the test; restored after."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.fixture
def rng():
    """A seeded numpy generator; torch is seeded too."""
    torch.manual_seed(0)
    return np.random.default_rng(0)
