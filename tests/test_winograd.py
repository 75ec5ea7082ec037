"""ffc_kernels.ops.winograd: 3x3 convolutions by F(4x4, 3x3), against fp64 direct convolution."""
import pytest
import torch
import torch.nn.functional as F

from ffc_kernels.ops.winograd import winograd_conv2d, winograd_weight

CL = torch.channels_last


@pytest.mark.parametrize("shape", [(1, 24, 16, 16), (2, 20, 13, 18), (1, 8, 7, 5), (3, 16, 4, 9)], ids=str)
def test_matches_direct_convolution(shape):
    """Two convolutions sharing one input transform (the FFC's local rows over every channel,
    convl2g over the first ones), odd sizes (cropped tiles), batch > 1, bias and ReLU."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(c + h)
    padded = F.pad(torch.randn(shape, generator=g), (1, 1, 1, 1), mode="reflect").contiguous(memory_format=CL)
    w_all, w_head = torch.randn(5, c, 3, 3, generator=g) / c ** 0.5, torch.randn(7, c // 2, 3, 3, generator=g)
    b_all, b_head = torch.randn(5, generator=g), torch.randn(7, generator=g)
    outs = winograd_conv2d(padded, [(winograd_weight(w_all), c, b_all), (winograd_weight(w_head), c // 2, b_head)],
                           relu=[True, False])
    for out, weight, bias, ci, relu in ((outs[0], w_all, b_all, c, True), (outs[1], w_head, b_head, c // 2, False)):
        exact = F.conv2d(padded[:, :ci].double(), weight.double(), bias.double())
        plain = F.conv2d(padded[:, :ci], weight, bias)
        if relu:
            exact, plain = exact.relu(), plain.relu()
        assert out.shape == (n, weight.shape[0], h, w) and out.is_contiguous(memory_format=CL)
        err, plain_err = (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
        # F(4x4, 3x3) loses a few bits in its transforms: within 32x direct fp32's error.
        assert err <= 32 * plain_err + 1e-6 * exact.abs().max().item(), (err, plain_err)


def test_rejects_what_it_does_not_do():
    with pytest.raises(ValueError, match=r"\(Co, Ci, 3, 3\)"):
        winograd_weight(torch.randn(4, 4, 5, 5))
    u = winograd_weight(torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match="runs fp32"):
        winograd_conv2d(torch.randn(1, 4, 10, 10, dtype=torch.bfloat16), [(u, 4, None)])


@pytest.mark.parametrize("shape", [(1, 10, 8, 8), (2, 7, 9, 6), (1, 20, 13, 11)], ids=str)
def test_input_grad_is_the_convolutions_adjoint(shape):
    """Winograd's algorithm transposed (the same U, tiles added back where they overlap): the
    gradient of the padded input of two convolutions sharing it (one on a channel prefix, as the
    FFC's convl2g), against autograd of F.conv2d in fp64, with an fp32-Winograd tolerance."""
    from ffc_kernels.ops.winograd import winograd_conv2d_input_grad

    n, c, h, w = shape
    g = torch.Generator().manual_seed(5)
    w_all = torch.randn(6, c, 3, 3, generator=g, dtype=torch.float64)
    w_prefix = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(n, c, h + 2, w + 2, generator=g, dtype=torch.float64, requires_grad=True)
    g_all = torch.randn(n, 6, h, w, generator=g, dtype=torch.float64)
    g_prefix = torch.randn(n, 4, h, w, generator=g, dtype=torch.float64)
    ((F.conv2d(x, w_all) * g_all).sum() + (F.conv2d(x[:, :3], w_prefix) * g_prefix).sum()).backward()
    got = winograd_conv2d_input_grad(
        [g_prefix.float(), g_all.float().contiguous(memory_format=torch.channels_last)],
        [(winograd_weight(w_prefix), 3), (winograd_weight(w_all), c)], (h, w))
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got.double() - x.grad).abs().max() <= 2e-6 * x.grad.abs().max() * c ** 0.5


def test_workspace_reuses_buffers_without_aliasing_outputs():
    """Inside ``workspace()`` the temporaries live in per-thread buffers reused by every call
    (grown for a larger shape): results equal those of calls outside it, an earlier call's
    outputs are not overwritten by later calls, and the buffers are freed when the scope ends."""
    from ffc_kernels.ops import winograd
    from ffc_kernels.ops.winograd import winograd_conv2d_input_grad, workspace

    g = torch.Generator().manual_seed(11)
    cases = []
    for n, c, h, w in ((1, 12, 8, 8), (2, 16, 13, 10), (1, 12, 8, 8)):  # small, larger, small again
        padded = torch.randn(n, c, h + 2, w + 2, generator=g).contiguous(memory_format=CL)
        convs = [(winograd_weight(torch.randn(6, c, 3, 3, generator=g)), c, torch.randn(6, generator=g)),
                 (winograd_weight(torch.randn(5, c // 2, 3, 3, generator=g)), c // 2, None)]
        grads = [torch.randn(n, 6, h, w, generator=g).contiguous(memory_format=CL),
                 torch.randn(n, 5, h, w, generator=g)]
        cases.append((padded, convs, grads, (h, w)))

    def run(case):
        padded, convs, grads, size = case
        return (*winograd_conv2d(padded, convs, relu=[True, False]),
                winograd_conv2d_input_grad(grads, [(u, ci) for u, ci, _ in convs], size))

    plain = [run(case) for case in cases]
    with workspace():
        with workspace():  # nested scopes share the outer one's buffers
            scoped = [run(case) for case in cases]
        assert winograd._local.buffers  # still held by the outer scope
        kept = [[t.clone() for t in outs] for outs in scoped]
        run(cases[1])
    assert winograd._local.buffers == {}
    for outs, reference_outs, copies in zip(scoped, plain, kept):
        for out, ref, copy in zip(outs, reference_outs, copies):
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            assert torch.equal(out, copy)  # not overwritten by the later calls
