"""lama_fast.inpaint follows LaMa's inference convention, for every input type, and rejects bad input."""
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

import lama_fast
from lama_fast.pipeline import pad_to_modulo


class Recorder(nn.Module):
    """A fake generator: records each input and returns ``fn(input)`` (by default a function of the RGB)."""

    def __init__(self, fn=None):
        super().__init__()
        self.inputs = []
        self.fn = fn or (lambda x: (x[:, :3] * 0.5 + x[:, 3:] * 0.3).flip(1))

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.fn(x)


def constant(rgb):
    """A fake generator predicting one colour (values may lie outside [0, 1]) everywhere."""
    value = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return Recorder(lambda x: value.expand(x.shape[0], 3, *x.shape[2:]).clone()).eval()


def scene(rng, height, width):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2 + 1, width // 3 : width - 2] = 255
    mask[rng.random((height, width)) < 0.1] = 255
    return image, mask


# One pixel each: black, pure red (grey 76), pure green at 128, grey 100 on every channel.
RGB_MASK = np.array([[[0, 0, 0], [255, 0, 0], [0, 128, 0], [100, 100, 100]]], np.uint8)


# ---------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (8, 8), (13, 17), (3, 250), (16, 5)])
@pytest.mark.parametrize("modulo", [8, 3])
@pytest.mark.parametrize("channels", [None, 3])
def test_pad_to_modulo_matches_numpy_symmetric(shape, modulo, channels, rng):
    array = rng.random(shape + ((channels,) if channels else ()))
    height, width = shape
    pad = [(0, -height % modulo), (0, -width % modulo)] + [(0, 0)] * (array.ndim - 2)
    padded = pad_to_modulo(array, modulo)
    np.testing.assert_array_equal(padded, np.pad(array, pad, mode="symmetric"))
    assert padded.shape[0] % modulo == 0 and padded.shape[1] % modulo == 0


def test_padding_repeats_the_edge_pixel():
    row = np.arange(5, dtype=np.float32)[None, :].repeat(2, axis=0)
    # symmetric: ... 3 4 | 4 3 2; torch's reflect would give 3 2 1.
    np.testing.assert_array_equal(pad_to_modulo(row, 8)[0], [0, 1, 2, 3, 4, 4, 3, 2])


def test_generator_sees_symmetric_padded_input(rng):
    image, mask = scene(rng, 13, 21)
    generator = Recorder().eval()
    lama_fast.inpaint(image, mask, generator)
    (seen,) = generator.inputs
    assert seen.shape == (1, 4, 16, 24)
    image_f = np.pad(image.astype(np.float32) / 255, [(0, 3), (0, 3), (0, 0)], mode="symmetric")
    mask_f = np.pad((mask > 127).astype(np.float32), [(0, 3), (0, 3)], mode="symmetric")
    np.testing.assert_array_equal(seen[0, 3].numpy(), mask_f)
    np.testing.assert_array_equal(seen[0, :3].permute(1, 2, 0).numpy(), image_f * (1 - mask_f[..., None]))


# ------------------------------------------------------------------------------ generator input


def test_input_layout_rgb_first_mask_last_zeroed_under_mask():
    image = np.empty((8, 16, 3), np.uint8)
    image[...] = (10, 20, 30)
    mask = np.zeros((8, 16), np.uint8)
    mask[:, 8:] = 255
    generator = Recorder().eval()
    lama_fast.inpaint(image, mask, generator)
    (seen,) = generator.inputs
    assert seen.dtype == torch.float32 and seen.device.type == "cpu" and seen.shape == (1, 4, 8, 16)
    for channel, value in enumerate((10, 20, 30)):
        assert torch.all(seen[0, channel, :, :8] == np.float32(value) / np.float32(255))
        assert torch.all(seen[0, channel, :, 8:] == 0)
    assert torch.all(seen[0, 3, :, :8] == 0) and torch.all(seen[0, 3, :, 8:] == 1)


def test_input_follows_generator_dtype():
    generator = Recorder().eval()
    generator.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
    lama_fast.inpaint(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8), generator)
    assert generator.inputs[0].dtype == torch.float64


@pytest.mark.parametrize(
    "mask, expected",
    [
        (np.array([[0, 127, 128, 255]], np.uint8), [0, 0, 1, 1]),
        (np.array([[0.0, 1e-7, 0.5, 1.0]], np.float32), [0, 1, 1, 1]),
        (np.array([[0.0, -0.5, 1e-300, 2.0]], np.float64), [0, 0, 1, 1]),
        (np.array([[False, True, False, True]]), [0, 1, 0, 1]),
        (np.array([[0, 1, 127, 65535]], np.uint16), [0, 1, 1, 1]),
        (PIL.Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)), [0, 0, 1, 1]),
        (torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8), [0, 0, 1, 1]),
        (torch.tensor([[0.0, 1e-7, 0.0, 1.0]]), [0, 1, 0, 1]),
        # Colour masks: set where any colour channel passes the threshold; alpha never counts.
        (RGB_MASK, [0, 1, 1, 0]),
        (np.dstack([RGB_MASK, np.full((1, 4), 255, np.uint8)]), [0, 1, 1, 0]),
        (np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [9, 9, 9, 255], [0, 0, 255, 0]]], np.uint8), [0, 0, 0, 1]),
        ((RGB_MASK > 127).astype(np.float32) * 0.5, [0, 1, 1, 0]),
        (np.array([[[0, 0, 0], [0, 0, 1], [0, 0, 0], [2, 0, 0]]], np.int32), [0, 1, 0, 1]),
        (PIL.Image.fromarray(RGB_MASK), [0, 1, 1, 0]),
        (PIL.Image.fromarray(RGB_MASK).convert("RGBA"), [0, 1, 1, 0]),
        (PIL.Image.fromarray(RGB_MASK).convert("P"), [0, 1, 1, 0]),
        (PIL.Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).convert("LA"), [0, 0, 1, 1]),
        (PIL.Image.fromarray(np.array([[0, 0, 255, 255]], np.uint8)).convert("1"), [0, 0, 1, 1]),
        (torch.from_numpy(RGB_MASK).permute(2, 0, 1), [0, 1, 1, 0]),
        (torch.from_numpy(RGB_MASK).permute(2, 0, 1)[None], [0, 1, 1, 0]),
        (torch.from_numpy(RGB_MASK[..., :1]).permute(2, 0, 1)[None], [0, 1, 0, 0]),
    ],
    ids=["uint8", "float32", "float64", "bool", "uint16", "pil-L", "tensor-uint8", "tensor-float",
         "rgb", "rgba-opaque", "alpha-only", "rgb-float", "rgb-int32", "pil-RGB", "pil-RGBA", "pil-P", "pil-LA",
         "pil-1", "tensor-3xHxW", "tensor-1x3xHxW", "tensor-1x1xHxW"],
)
def test_mask_threshold(mask, expected):
    generator = Recorder().eval()
    lama_fast.inpaint(np.full((1, 4, 3), 200, np.uint8), mask, generator, pad_modulo=1)
    assert generator.inputs[0][0, 3, 0].tolist() == expected


def test_red_on_black_mask_file_is_inpainted(tmp_path, rng):
    # Drawn in red on black and saved as RGB: as grey the stroke would be 76, under 127.
    image, grey = scene(rng, 24, 40)
    red = np.zeros(image.shape, np.uint8)
    red[..., 0] = grey
    PIL.Image.fromarray(red).save(tmp_path / "mask.png")
    generator = constant([0.0, 1.0, 0.0])
    result = lama_fast.inpaint(image, PIL.Image.open(tmp_path / "mask.png"), generator)
    np.testing.assert_array_equal(result, lama_fast.inpaint(image, grey, generator))
    assert np.all(result[grey > 127] == [0, 255, 0])


@pytest.mark.parametrize("kind", ["uint8", "float", "pil", "faint"])
def test_empty_mask_returns_the_image(kind, rng):
    image, _ = scene(rng, 13, 21)
    mask = np.zeros((13, 21), np.uint8)
    expected = image
    if kind == "float":
        image = image.astype(np.float32) / 255
        expected = np.clip(image * 255, 0, 255).astype(np.uint8)
    elif kind == "pil":
        image, mask = PIL.Image.fromarray(image), PIL.Image.fromarray(mask).convert("RGB")
    elif kind == "faint":
        mask[2:9, 3:12] = 127  # under the 8-bit threshold: still nothing to inpaint
    generator = Recorder().eval()
    with pytest.warns(UserWarning, match="sets no pixel.*returned unchanged"):
        result = lama_fast.inpaint(image, mask, generator)
    assert not generator.inputs
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        assert not np.shares_memory(result, image)


# ------------------------------------------------------------------------------------- composite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmasked_pixels_are_bit_identical_for_uint8(dtype, rng):
    image, mask = scene(rng, 37, 53)
    image.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every 8-bit value, some unmasked
    generator = constant([0.3, 0.6, 0.9])
    # A half-precision generator gets a half input, in which x / 255 * 255 often truncates to x - 1.
    generator.anchor = nn.Parameter(torch.zeros((), dtype=dtype))
    result = lama_fast.inpaint(image, mask, generator)
    assert result.dtype == np.uint8 and result.shape == image.shape
    keep = mask <= 127
    np.testing.assert_array_equal(result[keep], image[keep])


def test_masked_pixels_are_clipped_and_truncated(rng):
    image, mask = scene(rng, 20, 30)
    # 100.7 truncates to 100 (not rounded to 101); 1.5 clips to 255; -0.2 clips to 0.
    result = lama_fast.inpaint(image, mask, constant([100.7 / 255, 1.5, -0.2]))
    masked = result[mask > 127]
    assert masked.size and np.all(masked == [100, 255, 0])


def test_float_image_converted_as_lama_does(rng):
    image = rng.random((11, 14, 3)).astype(np.float32)
    mask = np.zeros((11, 14), np.float32)
    mask[3:7, 2:9] = 1
    prediction = constant([0.25, 0.5, 0.75])
    result = lama_fast.inpaint(image, mask, prediction)
    expected = np.clip(image * 255, 0, 255).astype(np.uint8)
    expected[3:7, 2:9] = np.clip(np.float32([0.25, 0.5, 0.75]) * 255, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(result, expected)


def test_input_types_agree(rng):
    image, mask = scene(rng, 19, 26)
    generator = Recorder().eval()
    expected = lama_fast.inpaint(image, mask, generator)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    uint8_variants = [
        (PIL.Image.fromarray(image), PIL.Image.fromarray(mask)),
        (PIL.Image.fromarray(image).convert("RGBA"), PIL.Image.fromarray(mask).convert("RGB")),
        (chw, torch.from_numpy(mask)),
        (chw[None], torch.from_numpy(mask)[None]),
        (image, mask[..., None]),
        (image, torch.from_numpy(mask > 127)[None, None]),
        (image, (mask > 127).astype(np.float32)),
    ]
    for variant_image, variant_mask in uint8_variants:
        np.testing.assert_array_equal(lama_fast.inpaint(variant_image, variant_mask, generator), expected)

    as_float = image.astype(np.float32) / 255
    from_float = lama_fast.inpaint(as_float, mask, generator)
    np.testing.assert_array_equal(lama_fast.inpaint(torch.from_numpy(as_float).permute(2, 0, 1), mask, generator),
                                  from_float)
    np.testing.assert_array_equal(lama_fast.inpaint(as_float.astype(np.float64), mask, generator), from_float)
    # The generator saw the same input, so masked pixels agree; unmasked ones round-trip x / 255 * 255.
    masked = mask > 127
    np.testing.assert_array_equal(from_float[masked], expected[masked])
    assert np.abs(from_float.astype(int) - expected).max() <= 1


def test_real_reference_generator(rng, fp32):
    torch.manual_seed(0)
    generator = lama_fast.build_generator("big-lama", n_blocks=1)
    image, mask = scene(rng, 64, 72)
    result = lama_fast.inpaint(image, mask, generator)

    # LaMa's convention, written out by hand.
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    mask_t = torch.from_numpy(mask > 127)[None, None].float()
    with torch.no_grad():
        prediction = generator(torch.cat([image_t * (1 - mask_t), mask_t], dim=1))
    inpainted = (mask_t * prediction + (1 - mask_t) * image_t)[0].permute(1, 2, 0).numpy()
    expected = np.clip(inpainted * 255, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(result, expected)
    assert not np.array_equal(result[mask > 127], image[mask > 127])


# ------------------------------------------------------------------------------------- rejections

H, W = 12, 16
IMAGE, MASK = np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.uint8)


@pytest.mark.parametrize(
    "image, mask, error, message",
    [
        (IMAGE, np.zeros((H, W + 1), np.uint8), ValueError, "12x16 (HxW), mask is 12x17"),
        (np.zeros((H, W, 4), np.uint8), MASK, ValueError, "RGBA"),
        (np.zeros((H, W), np.uint8), MASK, ValueError, "HxWx3"),
        (np.zeros((H, W, 1), np.uint8), MASK, ValueError, "HxWx3"),
        (IMAGE, np.zeros((H, W, 2), np.uint8), ValueError, "HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"),
        (IMAGE, np.zeros((1, H, W), np.uint8), ValueError, "HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA)"),
        (np.zeros((0, W, 3), np.uint8), np.zeros((0, W), np.uint8), ValueError, "empty"),
        (np.zeros((H, 0, 3), np.float32), np.zeros((H, 0), np.uint8), ValueError, "empty"),
        (np.full((H, W, 3), 255.0, np.float32), MASK, ValueError, "[0, 1]"),
        (np.full((H, W, 3), -0.5, np.float64), MASK, ValueError, "[0, 1]"),
        (np.full((H, W, 3), np.nan, np.float32), MASK, ValueError, "NaN"),
        (IMAGE, np.full((H, W), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((H, W, 3), np.uint16), MASK, TypeError, "uint16"),
        (np.zeros((H, W, 3), bool), MASK, TypeError, "bool"),
        (IMAGE.tolist(), MASK, TypeError, "list"),
        ("photo.png", MASK, TypeError, "str"),
        (IMAGE, None, TypeError, "NoneType"),
        (torch.zeros(H, W, 3), MASK, ValueError, "permute"),
        (torch.zeros(2, 3, H, W), MASK, ValueError, "batch of 2"),
        (torch.zeros(3, H, W, dtype=torch.int32), MASK, TypeError, "int32"),
        (IMAGE, torch.zeros(2, H, W), ValueError, "CxHxW or 1xCxHxW with C = 1, 3 or 4"),
        (IMAGE, torch.zeros(2, 1, H, W), ValueError, "CxHxW or 1xCxHxW"),
        (IMAGE, torch.zeros(H, W, 3), ValueError, "permute"),
        (PIL.Image.new("I;16", (W, H)), MASK, ValueError, "8-bit"),
        (IMAGE, PIL.Image.new("F", (W, H)), ValueError, "8-bit"),
    ],
    ids=lambda v: None if isinstance(v, (np.ndarray, torch.Tensor, list, str, PIL.Image.Image)) else str(v),
)
def test_rejects(image, mask, error, message):
    generator = Recorder().eval()
    with pytest.raises(error) as raised:
        lama_fast.inpaint(image, mask, generator)
    assert message in str(raised.value)
    assert not generator.inputs


@pytest.mark.parametrize(
    "generator, message",
    [
        (Recorder(lambda x: x[:, :3, :-1]).eval(), "expected a tensor of shape (1, 3, 16, 16)"),
        (Recorder(lambda x: (x[:, :3], x[:, 3:])).eval(), "tuple"),
        (Recorder(lambda x: x[:, :3] * float("nan")).eval(), "NaN"),
    ],
    ids=["shape", "tuple", "nan"],
)
def test_rejects_bad_generator_output(generator, message):
    with pytest.raises(ValueError, match=None) as raised:
        lama_fast.inpaint(np.zeros((16, 16, 3), np.uint8), np.full((16, 16), 255, np.uint8), generator)
    assert message in str(raised.value)


def test_rejects_bad_pad_modulo():
    with pytest.raises(ValueError, match="pad_modulo"):
        lama_fast.inpaint(IMAGE, MASK, Recorder().eval(), pad_modulo=0)


def test_warns_about_training_mode():
    with pytest.warns(UserWarning, match="eval"):
        lama_fast.inpaint(IMAGE, np.full((H, W), 255, np.uint8), Recorder())
