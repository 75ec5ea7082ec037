"""Measured backend choices: timed once per op, device and shape class, fastest kept, shared
through the file by every process."""
import json
import multiprocessing
import subprocess
import sys

import pytest
import torch

from ffc_kernels import measured


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FFC_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(measured, "_memory", {})
    measured._prefix.cache_clear()  # tests fake the GPU's name
    yield tmp_path
    measured._prefix.cache_clear()


def fake_timer(ms: dict, calls: list):
    def timer(fn, device):
        fn()
        return ms[calls[-1]]
    return timer


def test_fastest_is_chosen_once_and_written(cache):
    calls = []
    timer = fake_timer({"cuda": 3.0, "triton": 1.0, "torch": 2.0}, calls)
    device = torch.device("cpu")
    shape = ("complex64", "tf32", 192, 192, measured.size_class(256 * 129))
    choice = measured.choose("spectral_mix", device, shape, ["cuda", "triton", "torch"], calls.append, timer)
    assert choice == "triton" and calls == ["cuda", "triton", "torch"]
    # Asked again: no timing.
    assert measured.choose("spectral_mix", device, shape, ["cuda", "triton", "torch"], calls.append, timer) == "triton"
    assert len(calls) == 3
    stored = json.loads((cache / measured.FILE_NAME).read_text())
    (entry,) = stored.values()
    assert entry == {"backend": "triton", "ms": {"cuda": 3.0, "triton": 1.0, "torch": 2.0}}
    # Another shape class is timed on its own.
    other = shape[:-1] + (measured.size_class(1024 * 513),)
    assert measured.choose("spectral_mix", device, other, ["triton", "torch"], calls.append,
                           fake_timer({"triton": 5.0, "torch": 4.0}, calls)) == "torch"
    assert len(json.loads((cache / measured.FILE_NAME).read_text())) == 2


def test_a_new_process_reads_the_choice_without_timing(cache):
    device = torch.device("cpu")
    calls = []
    measured.choose("pointwise_conv", device, ("float32", 384, 192, 65536), ["triton", "torch"], calls.append,
                    fake_timer({"triton": 2.0, "torch": 1.0}, calls))
    child = subprocess.run([sys.executable, "-c", """
import torch
from ffc_kernels import measured
def trial(backend):
    raise AssertionError("timed again")
print(measured.choose("pointwise_conv", torch.device("cpu"), ("float32", 384, 192, 65536), ["triton", "torch"], trial))
"""], capture_output=True, text=True, env={**__import__("os").environ, "FFC_KERNELS_CACHE": str(cache)})
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "torch"


def test_a_single_candidate_and_a_vanished_one(cache):
    calls = []
    device = torch.device("cpu")
    assert measured.choose("op", device, (1,), ["torch"], calls.append, fake_timer({}, calls)) == "torch"
    assert calls == []
    measured.choose("op", device, (2,), ["cuda", "torch"], calls.append, fake_timer({"cuda": 1.0, "torch": 2.0}, calls))
    # The extension is gone (not rebuilt): the stored "cuda" is no candidate, so the rest are timed.
    assert measured.choose("op", device, (2,), ["triton", "torch"], calls.append,
                           fake_timer({"triton": 3.0, "torch": 2.0}, calls)) == "torch"


def test_a_damaged_file_is_timed_again_and_rewritten(cache):
    (cache / measured.FILE_NAME).write_text("{not json")
    calls = []
    assert measured.choose("op", torch.device("cpu"), (3,), ["triton", "torch"], calls.append,
                           fake_timer({"triton": 1.0, "torch": 2.0}, calls)) == "triton"
    assert json.loads((cache / measured.FILE_NAME).read_text())


def _rank(cache, queue):
    import os
    import time

    os.environ["FFC_KERNELS_CACHE"] = str(cache)
    measured._memory.clear()
    timed = []

    def timer(fn, device):
        fn()
        time.sleep(0.2)  # a slow measurement: the other rank must wait for it, not time too
        return {"triton": 1.0, "torch": 2.0}[timed[-1]]

    choice = measured.choose("op", torch.device("cpu"), (4,), ["triton", "torch"], timed.append, timer)
    queue.put((choice, len(timed)))


def test_concurrent_processes_time_once_and_agree(cache):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(cache, queue)) for _ in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    results = [queue.get(timeout=5) for _ in ranks]
    assert {choice for choice, _ in results} == {"triton"}
    assert sorted(n for _, n in results) == [0, 2]  # one rank timed both backends, the other none


def test_size_class():
    assert [measured.size_class(n) for n in (1, 2, 3, 4, 5, 33024, 65536)] == [1, 2, 4, 4, 8, 65536, 65536]


def test_select_measures_on_cuda_and_captures_reuse_it(cache, monkeypatch):
    """backends.select on a CUDA device (simulated: this machine may have none): the trial runs on
    each candidate, the faster wins; a graph capture and a compiled graph take the stored choice."""
    from ffc_kernels import backends

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    ran = []
    monkeypatch.setattr(measured, "_time_cuda", lambda fn, device: (fn(), {"triton": 2.0, "torch": 1.0}[ran[-1]])[1])
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    shape = ("tf32", 192, 192, 65536, True)
    # Without a trial the fixed order: Triton first, never the CUDA extension first.
    assert backends.select(cuda, has_cuda_impl=True) == "triton"
    assert backends.select(cuda, op="spectral_mix", shape=shape, trial=ran.append) == "torch"
    assert ran == ["triton", "torch"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert backends.select(cuda, op="spectral_mix", shape=shape, trial=ran.append) == "torch"
    assert backends.select(cuda, op="spectral_mix", shape=shape[:-1] + (False,), trial=ran.append) == "triton"
    assert len(ran) == 2  # nothing timed during a capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = str(backends.backend_info(cuda))
    assert "spectral_mix tf32 192 192 65536 True: torch (torch 1.000 ms, triton 2.000 ms)" in info
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.select(cuda, op="spectral_mix", shape=shape, trial=ran.append) == "triton"  # forced wins


def test_spectral_mix_names_its_shape_class(cache, monkeypatch):
    """The op hands select a trial that really runs it, and a shape class that tells apart what
    changes the answer."""
    from ffc_kernels import backends
    from ffc_kernels.ops import spectral_mix

    seen = {}

    def spy(device, has_cuda_impl=False, *, op=None, shape=(), trial=None, tolerance=None):
        seen.update(op=op, shape=shape, out=trial("torch"), tolerance=tolerance)
        return "torch"

    monkeypatch.setattr(backends, "select", spy)
    spec = torch.randn(2, 6, 5, 3, dtype=torch.complex64)
    weight = torch.randn(8, 12)
    out = spectral_mix.spectral_mix(spec, spectral_mix.pack_weight(weight), precision="tf32")
    assert seen["op"] == "spectral_mix" and seen["shape"] == ("tf32", 6, 4, 32, True)
    assert seen["tolerance"] == measured.TOLERANCE["tf32"]
    torch.testing.assert_close(seen["out"], out, rtol=0, atol=0)


def test_a_compiled_graph_takes_the_stored_choice_as_a_constant(cache, monkeypatch):
    from ffc_kernels import backends

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    calls = []
    measured.choose("spectral_mix", torch.device("cuda"), ("tf32", 4, 4, 32, True), ["triton", "torch"],
                    calls.append, fake_timer({"triton": 2.0, "torch": 1.0}, calls))

    def f(x):
        choice = backends._stored_choice("spectral_mix", "cuda", ("tf32", 4, 4, 32, True), ("triton", "torch"))
        return x + len(choice)

    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [5.0, 5.0]  # "torch"


def test_pointwise_conv_trials_leave_an_in_place_residual_alone(cache, monkeypatch):
    """conv2 accumulates into its residual (``out is residual``): timing runs must not add it twice."""
    from ffc_kernels import backends
    from ffc_kernels.ops.pointwise_conv import pointwise_conv

    seen = {}

    def spy(device, has_cuda_impl=False, *, op=None, shape=(), trial=None, tolerance=None):
        for _ in range(3):
            assert trial("torch") is not None  # a scratch output, never ``out``
        seen.update(op=op, shape=shape, tolerance=tolerance)
        return "torch"

    monkeypatch.setattr(backends, "select", spy)
    x, w = torch.randn(1, 6, 4, 5), torch.randn(3, 6)
    y = torch.randn(1, 3, 4, 5)
    expected = torch.relu(torch.einsum("oc,nchw->nohw", w, x) + y)
    pointwise_conv(x, w, residual=y, out=y, relu=True, precision="fp32")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert seen == {"op": "pointwise_conv", "shape": ("float32", "tf32x3", 6, 3, 32, False, False, True, False),
                    "tolerance": measured.TOLERANCE["tf32x3"]}


def test_fourier_unit_measures_csrc_whole_against_the_split_path(cache, monkeypatch):
    """Where csrc's whole FourierUnit can run, the op times it against rfft2 + the mix + irfft2 and
    runs what select picks; without it (or with a gradient) the transforms run around the mix."""
    from ffc_kernels import backends
    from ffc_kernels.ops import fourier_unit as fu
    from ffc_kernels.ops.spectral_mix import pack_weight

    x, weight = torch.randn(1, 4, 6, 8), pack_weight(torch.randn(8, 8))
    split = fu.fourier_unit(x, weight, None, precision="fp32")  # no extension here: the split path
    whole = torch.full_like(split, 7.0)
    monkeypatch.setattr(fu, "_csrc_can_run", lambda *args: True)
    monkeypatch.setattr(fu, "_fourier_unit_csrc", lambda *args: whole)
    seen = {}

    def spy(device, has_cuda_impl=False, *, op=None, shape=(), trial=None, tolerance=None):
        seen.update(op=op, shape=shape, cuda=trial("cuda"), torch=trial("torch"), tolerance=tolerance)
        return seen["pick"]

    monkeypatch.setattr(backends, "select", spy)
    for pick, expected in (("cuda", whole), ("torch", split)):
        seen["pick"] = pick
        torch.testing.assert_close(fu.fourier_unit(x, weight, None, precision="fp32"), expected)
    assert seen["op"] == "fourier_unit" and seen["shape"] == ("fp32", 4, 4, 32)
    assert seen["tolerance"] == measured.TOLERANCE["fp32"]
    assert seen["cuda"] is whole
    torch.testing.assert_close(seen["torch"], split)


def test_a_backend_that_disagrees_with_torch_is_never_timed_or_chosen(cache):
    """A backend whose output is wrong on this device (as csrc's large MMA tile was on an H100 while
    every CPU emulation of it passed) is left out however fast, and the entry says why."""
    torch.manual_seed(0)
    exact = torch.randn(2, 3, 8, 5, dtype=torch.complex64)
    wrong = exact.clone()
    wrong[:, :, :1] = 0  # a block of outputs never written
    near = exact + 1e-3 * torch.randn_like(exact) * exact.abs().mean()  # bf16-like rounding
    outputs = {"cuda": wrong, "triton": near, "torch": exact}
    calls = []

    def trial(backend):
        calls.append(backend)
        return outputs[backend]

    timer = fake_timer({"cuda": 0.1, "triton": 1.0, "torch": 2.0}, calls)
    with pytest.warns(RuntimeWarning, match=r"cuda backend's spectral_mix differs from torch's by 0\.\d+"):
        choice = measured.choose("spectral_mix", torch.device("cpu"), ("bf16", 3, 3, 64, True),
                                 ["cuda", "triton", "torch"], trial, timer, tolerance=measured.TOLERANCE["bf16"])
    assert choice == "triton"
    (entry,) = json.loads((cache / measured.FILE_NAME).read_text()).values()
    assert set(entry["ms"]) == {"triton", "torch"} and set(entry["rejected"]) == {"cuda"}
    assert 0.05 < entry["rejected"]["cuda"] < 1
    # The same outputs at fp32's tolerance: the rounded one is rejected too.
    with pytest.warns(RuntimeWarning) as record:
        assert measured.choose("spectral_mix", torch.device("cpu"), ("fp32", 3, 3, 64, True),
                               ["cuda", "triton", "torch"], trial, timer, tolerance=measured.TOLERANCE["fp32"]) == "torch"
    assert sorted(str(w.message).split()[2] for w in record) == ["cuda", "triton"]


def test_disagreement():
    a = torch.randn(4, 5, dtype=torch.float64)
    assert measured.disagreement(a, a) == 0
    assert measured.disagreement(a * 1.01, a) == pytest.approx(0.01)
    assert measured.disagreement(a[:3], a) == float("inf")  # shape
    b = a.clone()
    b[0, 0] = float("nan")
    assert measured.disagreement(b, a) == float("inf")  # NaN where the reference is finite
    assert measured.disagreement(b, b) == 0  # the same non-finite positions are compared elsewhere
    z = torch.randn(3, 3, dtype=torch.complex64)
    assert measured.disagreement(z, z.real) == float("inf")
    assert measured.disagreement(z * (1 + 1e-3j), z) == pytest.approx(1e-3, rel=1e-3)
    assert measured.disagreement(torch.zeros(3), torch.zeros(3)) == 0
    nan, inf = float("nan"), float("inf")
    assert measured.disagreement(torch.tensor([1.0, nan]), torch.tensor([1.0, inf])) == inf  # NaN is not inf
    assert measured.disagreement(torch.tensor([1.0, -inf]), torch.tensor([1.0, inf])) == inf
    assert measured.disagreement(torch.tensor([1.0, inf]), torch.tensor([1.0, inf])) == 0
    assert measured.disagreement(torch.tensor([inf, 2.0]), torch.tensor([1.0, 2.0])) == inf


def test_the_stored_file_stays_strict_json(cache):
    """A backend whose output has the wrong shape is rejected as null, not Infinity (which strict
    JSON readers refuse)."""
    outputs = {"triton": torch.zeros(2), "torch": torch.zeros(3)}
    calls = []

    def trial(backend):
        calls.append(backend)
        return outputs[backend]

    with pytest.warns(RuntimeWarning, match="triton backend"):
        assert measured.choose("op", torch.device("cpu"), (5,), ["triton", "torch"], trial,
                               fake_timer({"torch": 1.0}, calls), tolerance=1e-4) == "torch"

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    (entry,) = json.loads((cache / measured.FILE_NAME).read_text(), parse_constant=strict).values()
    assert entry["rejected"] == {"triton": None}


@pytest.mark.parametrize("precision,allow_tf32", [("fp32", False), ("tf32", True), ("bf16", True)])
def test_torch_backends_run_at_the_asked_precision(monkeypatch, precision, allow_tf32):
    """The torch backend of the fused ops sets cuDNN's and cuBLAS's fp32 switches for its call, so
    an op asked for fp32-class accuracy is IEEE fp32 even where the process allows TF32 (as a
    compiled graph, which skips the module's own switch setting, would otherwise run it)."""
    from ffc_kernels import backends
    from ffc_kernels.ops.pointwise_conv import pointwise_conv
    from ffc_kernels.ops.spectral_mix import pack_weight, spectral_mix

    seen = []
    real = backends.cuda_fp32_precision

    def spy(device, allow_tf32):
        seen.append(allow_tf32)
        return real(device, allow_tf32)

    monkeypatch.setattr(backends, "cuda_fp32_precision", spy)
    pointwise_conv(torch.randn(1, 4, 3, 3), torch.randn(2, 4), precision=precision, backend="torch")
    spectral_mix(torch.randn(1, 2, 3, 2, dtype=torch.complex64), pack_weight(torch.randn(4, 4)), precision=precision,
                 backend="torch")
    assert seen == [allow_tf32, allow_tf32]
