"""pytest hooks for the benchmarks: collect bench_*.py, pick the device, opt into torch.compile.

The bench files are collected only when benchmarks/ (or a file in it) is named on the command
line, so `python -m pytest` and `python -m pytest tests` never run them.

    python -m pytest benchmarks --benchmark-only                  # CPU, small shapes, well under a minute
    python -m pytest benchmarks --benchmark-only --compile        # also torch.compile(reference)
    python -m pytest benchmarks --benchmark-only --bench-device cuda
"""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("ffc benchmarks")
    group.addoption("--bench-device", default="cpu", help="device for the bench_*.py tests (default: cpu)")
    group.addoption("--compile", action="store_true", default=False,
                    help="also time torch.compile(reference) (minutes of inductor compilation on a small CPU)")


def _named_on_command_line(session) -> bool:
    for arg in session.config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest itself whatever their name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path) and _named_on_command_line(parent.session)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    device = request.config.getoption("--bench-device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def bench_compile(request):
    return request.config.getoption("--compile")
