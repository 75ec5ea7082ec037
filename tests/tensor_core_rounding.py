"""What tensor cores compute, emulated on the CPU, and the tolerance that follows from it.

A tensor-core dot multiplies operands rounded to its input format (TF32: 10 mantissa bits; bf16:
7) and accumulates in fp32. Products of such operands are exact in fp32 and in fp64, so the
only difference between a correct kernel and the fp64 sum of the rounded operands' products is
fp32 accumulation: a band about K * 2^-24 wide relative to sum |a||b|, three orders of magnitude
tighter than the rounding of the operands themselves. A kernel that rounds differently (or not
at all) or is off by a 1% bias falls outside it. ``ffc_kernels.ops._common.mma_dot`` rounds in
the kernel, so Triton's interpreter (which multiplies in fp32 whatever the input precision)
produces exactly these products too.
"""
from __future__ import annotations

import torch

FP32_UNIT = 2.0 ** -24  # unit roundoff of fp32


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 (ties to even) on the bit pattern, NaN kept; fp32 out."""
    bits = x.float().view(torch.int32)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & -8192).view(torch.float32)
    return torch.where(torch.isnan(x), x.float(), rounded)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest bf16 (torch's conversion rounds to nearest even); fp32 out."""
    return x.float().to(torch.bfloat16).float()


def operand_pairs(a: torch.Tensor, b: torch.Tensor, precision: str):
    """The (a_i, b_i) fp64 pairs whose products a dot at ``precision`` sums: one pair, or the four
    of split TF32 ("fp32": each fp32 operand as a TF32 high part plus a TF32 low part)."""
    a, b = a.float(), b.float()
    if precision == "tf32":
        return [(round_tf32(a).double(), round_tf32(b).double())]
    if precision == "bf16":
        return [(round_bf16(a).double(), round_bf16(b).double())]
    assert precision == "fp32", precision
    a_hi, b_hi = round_tf32(a), round_tf32(b)
    a_lo, b_lo = round_tf32(a - a_hi), round_tf32(b - b_hi)
    return [(p.double(), q.double()) for p in (a_hi, a_lo) for q in (b_hi, b_lo)]


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, precision: str):
    """(a @ b as the tensor cores' products summed in fp64, sum of |a_i||b_i|, reduction length)."""
    pairs = operand_pairs(a, b, precision)
    value = sum(p @ q for p, q in pairs)
    magnitude = sum(p.abs() @ q.abs() for p, q in pairs)
    return value, magnitude, a.shape[-1] * len(pairs)


def accumulation_bound(magnitude: torch.Tensor, k: int, extra_roundings: int = 0) -> torch.Tensor:
    """The most fp32 accumulation of k products (and ``extra_roundings`` epilogue operations) can
    move a result whose terms sum to ``magnitude`` in absolute value. Twice the textbook k * u:
    tensor cores may truncate their additions rather than round them."""
    return 2 * (k + extra_roundings) * FP32_UNIT * magnitude
