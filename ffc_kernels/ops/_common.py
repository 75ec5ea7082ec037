"""Checks and helpers shared by the op launchers."""
from __future__ import annotations

import contextlib

import torch

from ffc_kernels.backends import check_precision, matmul_precision, triton_interpret


def check_tensor(name: str, t: torch.Tensor, *, dtypes=None, ndim=None, device=None) -> None:
    """Raise a ValueError naming the expected value when ``t`` is not what an op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {expected}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the input), got {t.device}")


def torch_allows_tf32(flavour: str) -> bool:
    """Whether an op's torch path may multiply fp32 data in TF32 at a ``triton_dot_precision``
    flavour: where TF32 or bf16 was asked for (bf16 asks for no more than TF32), never for
    fp32-class. The ops set cuDNN's and cuBLAS's switches from it, whatever the process's are."""
    return flavour in ("tf32", "bf16", "bf16_emulated")


def on_device(t: torch.Tensor):
    """The context a Triton launch on ``t`` needs: Triton launches on the current CUDA device, which
    need not be ``t``'s (the second GPU of a split refinement, a model moved to cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


# The mma_dot flavour that runs fp32 data at each precision an op or module accepts.
_DOT_FLAVOUR = {"fp32": "tf32x3", "tf32": "tf32", "bf16": "bf16"}


def triton_dot_precision(precision: str | None, dtype: torch.dtype) -> str:
    """The ``mma_dot`` flavour for a kernel whose data is ``dtype``, at ``precision``.

    ``precision`` is "fp32" (fp32-class: split TF32), "tf32", "bf16", or None for
    ``backends.matmul_precision()`` (cuDNN's TF32 switch, as LaMa's convolutions would run).
    bf16 and fp16 data always multiply in their own dtype with fp32 accumulation.

    Triton's interpreter (3.6 to 3.8) returns garbage from a dot of bf16 or fp16 operands, so
    under TRITON_INTERPRET=1 those dots round their operands to bf16/fp16 and multiply in fp32,
    which gives the same products (exact in fp32) and the same fp32 accumulation.
    """
    precision = check_precision(precision) or matmul_precision()
    if dtype == torch.bfloat16:
        flavour = "bf16"
    elif dtype == torch.float16:
        flavour = "fp16"
    else:
        flavour = _DOT_FLAVOUR[precision]
    if flavour in ("bf16", "fp16") and triton_interpret():
        flavour += "_emulated"
    return flavour


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths still work; backends.py records why
    triton = None

if triton is not None:

    @triton.jit
    def _round_mantissa(x, DROPPED_BITS: tl.constexpr):
        # fp32 -> fp32 with the low DROPPED_BITS mantissa bits cleared, to nearest, ties to even.
        u = x.to(tl.int32, bitcast=True)
        u = (u + ((1 << (DROPPED_BITS - 1)) - 1) + ((u >> DROPPED_BITS) & 1)) & -(1 << DROPPED_BITS)
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # keep NaN a NaN, not an inf

    @triton.jit
    def round_to_tf32(x):
        """fp32 -> the nearest TF32 value (10 mantissa bits, ties to even), still stored as fp32.

        Triton's TF32 dot hands fp32 bits to the tensor cores unrounded (no cvt.rna.tf32 in its
        PTX, sm_80 and sm_90), which then do not use the low 13. Rounding first, on the bit pattern,
        makes products of the operands exact in fp32, so Triton's interpreter computes what the
        GPU computes and TF32 accuracy is testable on a CPU; and nearest is half the error of
        dropping the bits.
        """
        return _round_mantissa(x, 13)

    @triton.jit
    def _split_tf32(x):
        hi = round_to_tf32(x)
        return hi, round_to_tf32(x - hi)

    @triton.jit
    def mma_dot(a, b, acc, PRECISION: tl.constexpr):
        """acc + a @ b on tensor cores with fp32 accumulation; a (M, K) and b (K, N) fp32 tiles.

        PRECISION is the flavour ``triton_dot_precision`` returns:
          "tf32x3"  fp32-class (split TF32): each operand is split into a TF32 high part and a TF32
                    low part, and the four products hi.hi + hi.lo + lo.hi + lo.lo are ONE dot over
                    K-concatenated operands, A = (M, 4K) and B = (4K, N). Triton's own
                    input_precision="tf32x3", and three dots chained into one accumulator, compile
                    to two MMA layouts with accumulator conversions through shared memory between
                    them; one dot keeps one layout. Error ~2^-21 relative per product, fp32-class.
          "tf32"    operands rounded to TF32 (round_to_tf32), one TF32 dot.
          "bf16", "fp16"  operands cast to bf16/fp16, one dot (tiles already in that dtype pass through).
          "bf16_emulated", "fp16_emulated"  the same products computed in fp32 for the interpreter
                    (see triton_dot_precision).
        K must be at least 8 (16 for bf16/fp16) and every dim a power of two, as for tl.dot.
        """
        if PRECISION == "tf32x3":
            a_hi, a_lo = _split_tf32(a)
            b_hi, b_lo = _split_tf32(b)
            M: tl.constexpr = a.shape[0]
            K: tl.constexpr = a.shape[1]
            N: tl.constexpr = b.shape[1]
            # Index 4k + 2s + t pairs a_s (s: hi/lo of a) with b_t (t: hi/lo of b), all four pairs.
            a4 = tl.reshape(tl.join(tl.join(a_hi, a_lo), tl.join(a_hi, a_lo)), (M, 4 * K))
            b4 = tl.join(tl.join(b_hi, b_hi), tl.join(b_lo, b_lo))  # (K, N, s, t) = b_t
            b4 = tl.reshape(tl.permute(b4, (0, 2, 3, 1)), (4 * K, N))
            acc = tl.dot(a4, b4, acc, input_precision="tf32")
        elif PRECISION == "tf32":
            acc = tl.dot(round_to_tf32(a), round_to_tf32(b), acc, input_precision="tf32")
        elif PRECISION == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif PRECISION == "fp16":
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        elif PRECISION == "bf16_emulated":
            # The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
            acc = tl.dot(_round_mantissa(a.to(tl.float32), 16), _round_mantissa(b.to(tl.float32), 16), acc,
                         input_precision="ieee")
        else:
            tl.static_assert(PRECISION == "fp16_emulated", "unknown dot precision")
            acc = tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc, input_precision="ieee")
        return acc
