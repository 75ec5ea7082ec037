"""The real big-lama weights (IOPaint's TorchScript big-lama.pt, fetched by `lama-fast download
big-lama`): the optimized generator against the reference on a photo. Skipped when the file is not
in the cache. LAMA_FAST_TEST_PHOTO / LAMA_FAST_TEST_MASK name a photo and mask to use instead of
the generated demo scene."""
import copy
import math
import os

import numpy as np
import PIL.Image
import pytest

import lama_fast
from lama_fast import pipeline
from lama_fast.demo import demo_image, demo_mask
from lama_fast.download import resolve_checkpoint


def _photo():
    if os.environ.get("LAMA_FAST_TEST_PHOTO"):
        image = PIL.Image.open(os.environ["LAMA_FAST_TEST_PHOTO"]).convert("RGB")
        mask = PIL.Image.open(os.environ["LAMA_FAST_TEST_MASK"])
        return image, mask
    return demo_image(512), demo_mask(512)


@pytest.mark.weights
def test_real_big_lama_optimized_matches_the_reference():
    reference = lama_fast.load_generator(resolve_checkpoint("big-lama"))
    image, mask = _photo()
    expected = pipeline._inpaint(image, mask, reference)[1]
    fast = lama_fast.optimize(copy.deepcopy(reference))
    out = pipeline._inpaint(image, mask, fast)[1]
    assert (out - expected).abs().max().item() <= 1e-4
    bf16 = lama_fast.optimize(copy.deepcopy(reference), precision="bf16")
    out = pipeline._inpaint(image, mask, bf16)[1]
    mse = ((out.double() - expected.double()) ** 2).mean().item()
    assert 10 * math.log10(1 / mse) >= 40 and 10 * math.log10(expected.double().var().item() / mse) >= 30
    result = lama_fast.inpaint(image, mask, fast)
    assert result.shape[2] == 3 and np.asarray(result).std() > 5  # not the flat fill random weights give
