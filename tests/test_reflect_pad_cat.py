"""The one-pass reflection pad of [x_l | x_g] (``ops.reflect_pad_cat``): equal to torch's pad of the
concatenation element for element, under Triton's interpreter; its sm_90 build moves whole 16-byte
vectors with no spills; the torch copies take what the kernel does not."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ffc_kernels.ops import dense
from ffc_kernels.ops import reflect_pad_cat as op
from helpers import backend_env

pytest.importorskip("triton")


def _channels_last(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,n,h,w,pad", [
    ((5, 12), 2, 6, 7, 1),     # two tensors (x_l, x_g), batch 2, odd width
    ((3,), 1, 5, 9, 2),        # one tensor (dense.prepad), pad 2
    ((130, 7), 1, 4, 5, 3),    # more channels than one channel block, pad = H - 1
    ((4, 0, 2), 1, 3, 3, 1),   # an empty tensor in the list
])
def test_triton_equals_torch(monkeypatch, dtype, channels, n, h, w, pad):
    backend_env(monkeypatch, "triton")
    tensors = [_channels_last(n, c, h, w, dtype=dtype, seed=i) for i, c in enumerate(channels)]
    out = dense.reflect_pad_cat(tensors, pad)
    expected = op.reflect_pad_cat_reference(tensors, pad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_the_kernel_runs_where_it_applies_and_copies_elsewhere(monkeypatch):
    backend_env(monkeypatch, "triton")
    calls = []
    real = op.reflect_pad_cat_triton
    monkeypatch.setattr(op, "reflect_pad_cat_triton", lambda t, p: calls.append(len(t)) or real(t, p))
    x_l, x_g = _channels_last(1, 3, 5, 6), _channels_last(1, 4, 5, 6, seed=1)
    expected = op.reflect_pad_cat_reference((x_l, x_g), 1)
    assert torch.equal(dense.reflect_pad_cat((x_l, x_g), 1), expected) and calls == [2]
    # Inputs that need gradients (the refinement's backward): the differentiable copies.
    x_grad = x_l.clone().requires_grad_()
    out = dense.reflect_pad_cat((x_grad, x_g), 1)
    assert calls == [2] and out.requires_grad and torch.equal(out.detach(), expected)
    # NCHW inputs, or the torch backend forced: the copies.
    assert torch.equal(dense.reflect_pad_cat((x_l.contiguous(), x_g), 1), expected) and calls == [2]
    backend_env(monkeypatch, "torch")
    assert torch.equal(dense.reflect_pad_cat((x_l, x_g), 1), expected) and calls == [2]


def test_sm90_build_moves_16_byte_vectors():
    """Compiled with the JIT's specialisation at big-lama's 2048² bottleneck (x_g: 384 channels of
    256x256 into the 512-channel padded buffer at channel 128), for sm_90 and sm_80: every global
    load and store a 16-byte vector, no register spills."""
    script = textwrap.dedent('''
        import json, re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from ffc_kernels import aot
        from ffc_kernels.ops.reflect_pad_cat import _reflect_pad_kernel as k, _blocks
        out = {}
        for dtype in ("fp32", "bf16"):
            for arch in (80, 90):
                block_p, block_c = _blocks(384)
                signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "pixels": 258 * 258, "H": 256,
                             "W": 256, "C": 384, "C_OUT": 512, "c_offset": 128}
                sig, constexprs, attrs = aot.jit_specialization(k, signature)
                constexprs.update(PAD=1, BLOCK_P=block_p, BLOCK_C=block_c)
                sig.update({name: "constexpr" for name in ("PAD", "BLOCK_P", "BLOCK_C")})
                sig = {name: sig[name] for name in k.arg_names}
                ptx = triton.compile(ASTSource(k, sig, constexprs=constexprs, attrs=attrs),
                                     target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4)).asm["ptx"]
                registers, spills = aot._resource_usage(ptx, arch)
                loads = re.findall(r"ld\\.global(?:\\.\\w+)*?(\\.v\\d)?\\.b(\\d+)", ptx)
                stores = re.findall(r"st\\.global(?:\\.\\w+)*?(\\.v\\d)?\\.b(\\d+)", ptx)
                out[f"{dtype} sm_{arch}"] = dict(registers=registers, spills=spills, loads=loads, stores=stores)
        print(json.dumps(out))
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    for where, build in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert build["spills"] == 0, (where, build)
        for kind in ("loads", "stores"):
            widths = {(vec, bits) for vec, bits in build[kind]}
            assert widths == {(".v4", "32")}, (where, kind, widths)  # 4 x 32 bits = 16 bytes each
