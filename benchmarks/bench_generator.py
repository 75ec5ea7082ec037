"""End to end: big-lama's generator (51M parameters, 18 FFC residual blocks) on one image.

The generator is lama_fast's seeded random big-lama (``lama_fast.demo.demo_generator``: trained-
like weight scales and calibrated BatchNorm statistics, so activations stay in range through 18
blocks), fed LaMa's input (masked RGB + mask) built from the demo image and mask. Providers:
eager = the reference generator, torch.compile of it, fused = ``lama_fast.optimize`` of a copy
(``--dtype bf16``: the fused copy in bf16 against the fp32 reference with TF32).
FLOPs: torch's FlopCounterMode (all convolutions) + the FFTs at 5 N log2 N; bytes: every aten op
of one forward counted on the meta device (``common.count_model``): each op reads its inputs and
writes its outputs once, library-internal passes not seen. 4096^2 is not benchmarked by default.

    python benchmarks/bench_generator.py [--sizes 512 1024 2048] [--device cuda] [--dtype fp32 bf16]
    python -m pytest benchmarks/bench_generator.py --benchmark-only
"""
from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import lama_fast  # noqa: E402
from lama_fast.demo import demo_generator, demo_image, demo_mask  # noqa: E402

SIZES = (512, 1024, 2048)


@functools.lru_cache(maxsize=1)
def _generator(seed: int):
    return demo_generator(seed=seed)


@functools.lru_cache(maxsize=None)
def model_counts(size: int, dtype: torch.dtype) -> dict:
    """FLOPs and aten-level bytes of one forward, eager and fused, counted on the meta device."""
    with torch.device("meta"):
        eager = lama_fast.build_generator("big-lama")
        x = torch.randn(1, 4, size, size)
    fused = lama_fast.optimize(copy.deepcopy(eager)).to(dtype)
    e, f = common.count_model(eager, x), common.count_model(fused, x.to(dtype))
    return {"flops": e["flops"], "eager_bytes": e["bytes"], "fused_bytes": f["bytes"]}


def lama_input(size: int, device, dtype=torch.float32) -> torch.Tensor:
    image = torch.from_numpy(demo_image(size)).permute(2, 0, 1)[None].float() / 255
    mask = (torch.from_numpy(demo_mask(size)) > 127)[None, None].float()
    return torch.cat([image * (1 - mask), mask], dim=1).to(device=device, dtype=dtype)


def make_cases(size, mode, device, args):
    reference = copy.deepcopy(_generator(args.seed)).to(device)
    fast = lama_fast.optimize(copy.deepcopy(reference)).to(dtype=mode.dtype)
    x, xf = lama_input(size, device), lama_input(size, device, mode.dtype)
    counts = model_counts(size, mode.dtype)
    default = common.fused_backend(device)
    note = None
    if mode.dtype != torch.float32:
        note = "reference in fp32 with TF32: LaMa's FourierUnit cannot run in bf16"
    checked = []

    def fused():
        out = fast(xf)
        if not checked:  # once: every FFC module must have taken its fused path
            slow = [name for name, m in fast.named_modules() if getattr(m, "last_path", None) == "reference"]
            if slow:
                raise RuntimeError(f"fused generator ran the reference path in {slow[:4]} ({len(slow)} modules)")
            checked.append(True)
        return out

    providers = [
        common.Provider("eager", lambda: reference(x), "torch", counts["eager_bytes"], check=False),
        common.compile_provider(reference, x, enabled=args.compile_here),
        common.Provider("fused", fused, default, counts["fused_bytes"] if default != "torch" else None),
    ]
    yield common.Case(
        op="generator", case="big-lama", size=size, shape={"B": 1, "C": 4, "H": size, "W": size},
        flops=counts["flops"], providers=providers, reference=lambda: reference(x),
        tolerance=common.TOLERANCE[mode.name], mode=mode, note=note)


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_generator(benchmark, provider, bench_device, bench_compile):
    case = common.pytest_single_case(make_cases, common.script_parser(__doc__), bench_device, bench_compile)
    common.pytest_case(case, provider, benchmark, bench_device, rounds=1)


if __name__ == "__main__":
    parser = common.script_parser(__doc__, sizes=SIZES)
    sys.exit(common.run_script(parser, make_cases))
