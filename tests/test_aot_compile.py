"""Every Triton kernel variant, compiled ahead of time with the JIT's specialisation at LaMa's shapes (and
pointwise_conv also at an unaligned photo size) for sm_80, sm_86, sm_89 and sm_90 on this machine (no GPU
needed): no register spills, shared memory within each architecture's limit, tensor-core dots, and on
sm_90 one MMA layout, no accumulator shuffles between layouts and few barriers; the report's modeled
times checked by hand.

The compilation runs once per session in a subprocess: this test session has TRITON_INTERPRET=1 set, which
makes every kernel a Python function."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from ffc_kernels import aot, roofline  # noqa: E402

MAX_SM90_BARRIERS = 12


@pytest.fixture(scope="session")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


@pytest.fixture(scope="session")
def builds(dump_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "ffc_kernels.aot", "--json", "--dump", str(dump_dir)], env=env,
                         capture_output=True, text=True, check=True, timeout=900)
    records = [aot.KernelBuild(**{**r, "config": tuple(r["config"])}) for r in json.loads(out.stdout)]
    print("\n" + aot.format_table(records))
    return records


def _where(b):
    return b.kernel, b.variant, f"sm_{b.arch}", b.config


def test_every_variant_and_arch_is_built(builds):
    assert len(builds) == sum(sum(1 for _ in aot.variants(arch)) for arch in aot.ARCHS)
    assert {b.kernel for b in builds} == {"_spectral_mix_kernel", "_pointwise_conv_kernel"}
    assert {b.arch for b in builds} == {80, 86, 89, 90}
    # pointwise_conv also at a photo's unaligned bottleneck, where the JIT cannot assume sizes divisible by 16
    unaligned = f"@{aot.UNALIGNED.height}x{aot.UNALIGNED.width}"
    assert aot.UNALIGNED.width % 16 and aot.UNALIGNED.pixels % 16
    assert {b.arch for b in builds if b.variant.endswith(unaligned)} == set(aot.ARCHS)


def test_no_register_spills(builds):
    assert not [(*_where(b), b.spill_bytes) for b in builds if b.spill_bytes]
    assert all(0 < b.registers <= 255 for b in builds)


def test_shared_memory_within_each_arch_limit(builds):
    assert not [(*_where(b), b.shared) for b in builds if b.shared > aot.SHARED_MEMORY_LIMIT[b.arch]]


def test_dots_use_tensor_cores(builds):
    assert not [(*_where(b), b.mma) for b in builds if b.mma == "fma"]
    assert not [(*_where(b), b.mma) for b in builds
                if b.kernel == "_pointwise_conv_kernel" and b.arch == 90 and not b.mma.startswith("wgmma")]
    assert not [(*_where(b), b.mma) for b in builds if b.arch != 90 and "wgmma" in b.mma]


@pytest.mark.parametrize("kernel", ["_pointwise_conv_kernel", "_spectral_mix_kernel"])
def test_sm90_one_mma_layout_no_conversion_few_barriers(builds, kernel):
    sm90 = [b for b in builds if b.arch == 90 and b.kernel == kernel]
    assert sm90
    assert not [(*_where(b), b.mma_layouts) for b in sm90 if b.mma_layouts != 1]
    assert not [(*_where(b), b.mma_conversions) for b in sm90 if b.mma_conversions]
    assert not [(*_where(b), b.barriers) for b in sm90 if b.barriers > MAX_SM90_BARRIERS]


def _build(builds, kernel, variant):
    return next(b for b in builds if b.kernel == kernel and b.variant == variant and b.arch == 90)


def test_modeled_time_by_hand(builds):
    # big-lama at 2048²: 256 x 256 = 65536 pixels, 384 global channels, 192 in the FourierUnit.
    # conv2 in fp32 reads x and fu(x) (192 ch) and the residual (384 ch), writes 384 ch, reads the
    # (384, 192) weight and the bias once: memory-bound at 3.35 TB/s.
    conv2 = _build(builds, "_pointwise_conv_kernel", "conv2 fp32 tf32")
    nbytes = 4 * 65536 * (192 + 192 + 384 + 384) + 4 * 384 * 192 + 4 * 384
    assert conv2.gbytes == pytest.approx(nbytes / 1e9)
    assert conv2.modeled_us == pytest.approx(nbytes / 3.35e12 * 1e6)
    assert conv2.modeled_us == pytest.approx(90.235, abs=1e-3)
    assert conv2.target_us == pytest.approx(90.235 / 0.7, abs=1e-2)
    assert conv2.bound == "memory"
    # conv1 in split TF32: four TF32 products per multiply-add on 192 x 384 x 65536 (tiles divide
    # evenly), 38.65 GFLOP at 495 TFLOP/s, which outlasts its 151 MB of traffic (45 us).
    conv1 = _build(builds, "_pointwise_conv_kernel", "conv1 fp32 tf32x3")
    assert 192 % conv1.config[0] == 0 and 65536 % conv1.config[1] == 0 and 384 % conv1.config[2] == 0
    flops = 4 * 2 * 192 * 384 * 65536
    assert conv1.gflops == pytest.approx(flops / 1e9)
    assert conv1.modeled_us == pytest.approx(flops / 495e12 * 1e6)
    assert conv1.modeled_us == pytest.approx(78.09, abs=1e-2)
    assert conv1.bound == "compute"
    assert conv1.gbytes * 1e9 / 3.35e12 * 1e6 == pytest.approx(45.16, abs=1e-2)
    # Off sm_90 the report gives no H100 time.
    assert all(b.modeled_us is None and b.bound is None for b in builds if b.arch != 90)


def test_fourier_unit_model_by_hand():
    """The whole FourierUnit at big-lama's 2048² bottleneck: 192 channels, 65536 pixels, 256 x 129
    spectral points. Two-pass R2C (4CP + 8CN, 16CN), the mix (16CN), two-pass C2R (16CN, 8CN + 4CP):
    8CP + 64CN bytes, about 506 MB, 151 us at 3.35 TB/s; torch's irfft2 clone adds 16CN."""
    c, p, n = 192, 65536, 256 * 129
    no_clone = roofline.fourier_unit(aot.BOTTLENECK, clone=False)
    clone = roofline.fourier_unit(aot.BOTTLENECK, clone=True)
    assert no_clone.bytes == 8 * c * p + 64 * c * n == 506_462_208
    assert clone.bytes - no_clone.bytes == 16 * c * n
    assert no_clone.seconds * 1e6 == pytest.approx(151.18, abs=1e-2) and no_clone.bound == "memory"
    assert no_clone.flops == 8 * c * c * n


def test_bottleneck_is_big_lamas():
    # The geometry the report models, read from the configuration, against the reference model itself.
    import torch

    from ffc_kernels.reference import SpectralTransform, build_reference_generator

    b = roofline.bottleneck("big-lama", 2048)
    assert (b.batch, b.height, b.width, b.global_channels, b.fu_channels) == (1, 256, 256, 384, 192)
    assert b.spectral_points == 256 * 129 and not b.enable_lfu
    st = next(m for m in build_reference_generator("big-lama", n_blocks=1).modules()
              if isinstance(m, SpectralTransform))
    assert tuple(st.conv1[0].weight.shape[:2]) == (b.fu_channels, b.global_channels)
    assert tuple(st.fu.conv_layer.weight.shape[:2]) == (2 * b.fu_channels, 2 * b.fu_channels)
    assert tuple(st.conv2.weight.shape[:2]) == (b.global_channels, b.fu_channels)
    assert st.enable_lfu == b.enable_lfu
    with torch.no_grad():
        assert torch.fft.rfft2(torch.zeros(1, 1, b.height, b.width)).shape[-2:] == (256, 129)


def test_jit_specialization_follows_the_jit():
    kernel = aot.pointwise_conv._pointwise_conv_kernel
    sig, constexprs, attrs = aot.jit_specialization(
        kernel, {"x_ptr": "*bf16", "CI": 192, "CO": 17, "sxb": 3 * 2**31, "sxw": 1})
    index = {name: (kernel.arg_names.index(name),) for name in kernel.arg_names}
    divisible = [["tt.divisibility", 16]]
    assert sig == {"x_ptr": "*bf16", "CI": "i32", "CO": "i32", "sxb": "i64", "sxw": "constexpr"}
    assert constexprs == {"sxw": 1}
    assert attrs == {index["x_ptr"]: divisible, index["CI"]: divisible, index["sxb"]: divisible}
    # Against the JIT's own rule where this Triton exposes it (3.6 to 3.8 do).
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    for value in (0, 1, 16, 17, 192, 33024, 2**31 - 16, 2**31, 3 * 2**31 + 1):
        sig, constexprs, attrs = aot.jit_specialization(kernel, {"CI": value})
        kind, key = jit.native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        assert (sig["CI"], bool(attrs)) == ((kind, "D" in key) if kind != "constexpr" else ("constexpr", False))
        assert constexprs == ({"CI": value} if kind == "constexpr" else {})
    # Integer arguments given as types take their values at LaMa's shapes from _LAMA_VALUES.
    sig, _, attrs = aot.jit_specialization(aot.spectral_mix._spectral_mix_kernel, {"N": "i64"})
    assert sig == {"N": "i32"} and attrs == {(aot.spectral_mix._spectral_mix_kernel.arg_names.index("N"),): divisible}


def test_dump_writes_ttgir_and_ptx(builds, dump_dir):
    stems = [aot.file_stem(b) for b in builds]
    assert len(set(stems)) == len(stems)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+__[A-Za-z0-9._-]+__sm\d\d", stem) for stem in stems)
    assert {p.name for p in dump_dir.iterdir()} == {f"{s}.{ext}" for s in stems for ext in ("ttgir", "ptx")}
    for b, stem in zip(builds, stems):
        ttgir, ptx = (dump_dir / f"{stem}.ttgir").read_text(), (dump_dir / f"{stem}.ptx").read_text()
        assert f".target sm_{b.arch}" in ptx
        assert (len(aot.mma_layouts(ttgir)), aot.mma_conversions(ttgir), aot.barriers(ptx), aot.mma_instructions(ptx)) \
            == (b.mma_layouts, b.mma_conversions, b.barriers, b.mma)


def test_layout_and_barrier_counters_on_known_text():
    ttgir = """#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 8]}>
    %1 = ttg.convert_layout %acc : tensor<64x32xf32, #mma1> -> tensor<64x32xf32, #mma> loc(#loc1)
    %2 = ttg.convert_layout %x : tensor<64x32xf32, #blocked> -> tensor<64x32xf32, #mma> loc(#loc2)
    %3 = ttg.convert_layout %m : tensor<64xi1, #ttg.slice<{dim = 1, parent = #mma1}>> -> tensor<64xi1, #blocked>
"""
    assert aot.mma_layouts(ttgir) == {"mma", "mma1"}
    assert aot.mma_conversions(ttgir) == 1
    ptx = "\tbar.sync \t0;\n\tbarrier.sync.aligned 1, 256;\n\tbar.warp.sync -1;\n// bar.sync in a comment\n"
    assert aot.barriers(ptx) == 2
    assert aot.mma_instructions("wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {...}") == "wgmma m64n128k8 tf32"
    assert aot.mma_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma m16n8k16 bf16"
    assert aot.mma_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"
