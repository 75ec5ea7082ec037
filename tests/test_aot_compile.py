"""Every Triton kernel, in every launch config and precision, compiled ahead of time for sm_80 and
sm_90 on this machine (no GPU needed): no register spills, shared memory within the device limit,
and dots lowered to tensor-core instructions (wgmma on sm_90 for the 64-row tiles, mma otherwise).

The compilation runs in a subprocess: this test session has TRITON_INTERPRET=1 set, which makes
every kernel a Python function."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from ffc_kernels import aot  # noqa: E402


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "ffc_kernels.aot", "--json"], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    records = [aot.KernelBuild(**{**r, "config": tuple(r["config"])}) for r in json.loads(out.stdout)]
    print("\n" + aot.format_table(records))
    return records


def test_every_variant_and_arch_is_built(builds):
    assert len(builds) == sum(1 for _ in aot.variants()) * len(aot.ARCHS)
    assert {b.kernel for b in builds} == {"_spectral_mix_kernel", "_pointwise_conv_kernel"}
    assert {b.arch for b in builds} == {80, 90}


def test_no_register_spills(builds):
    assert not [(b.kernel, b.variant, b.arch, b.config, b.spill_bytes) for b in builds if b.spill_bytes]
    assert all(0 < b.registers <= 255 for b in builds)


def test_shared_memory_within_device_limit(builds):
    assert not [(b.kernel, b.variant, b.arch, b.shared) for b in builds if b.shared > aot.SHARED_MEMORY_LIMIT[b.arch]]


def test_dots_use_tensor_cores(builds):
    for b in builds:
        if b.arch == 90 and b.config[0] >= 64:
            assert b.mma == "wgmma", (b.kernel, b.variant, b.config)
        else:
            assert b.mma in ("mma", "wgmma"), (b.kernel, b.variant, b.arch, b.config)
