"""Packaging for ffc-kernels / lama-fast.

The CUDA extension in csrc/ is built only when asked (FFC_KERNELS_BUILD_EXT=1) and a CUDA
toolkit is present; without it the package is pure Python and uses Triton or torch.
"""
import os
import runpy

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("FFC_KERNELS_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    # fourier_unit.cpp calls cuFFT: the toolkit's, or the nvidia-cufft wheel torch links.
    cufft_cflags, cufft_ldflags = runpy.run_path(os.path.join("csrc", "cufft_flags.py"))["cufft_flags"](CUDA_HOME)
    ext_modules.append(
        CUDAExtension(
            name="ffc_kernels._C",
            sources=["csrc/bindings.cpp", "csrc/spectral_mix.cu", "csrc/spectral_mix_mma.cu", "csrc/fourier_unit.cpp"],
            extra_compile_args={
                "cxx": ["-O3", *cufft_cflags],
                "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
            },
            extra_link_args=cufft_ldflags,
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="ffc-kernels",
    # One version for the package and its metadata; read without importing lama_fast (and torch).
    version=runpy.run_path(os.path.join("lama_fast", "_version.py"))["__version__"],
    description="Fused Fast Fourier Convolution kernels and a fast LaMa inpainting generator",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ffc_kernels", "ffc_kernels.*", "lama_fast", "lama_fast.*"]),
    package_data={"lama_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "tqdm",
    ],
    # kornia: the refinement's blur, resize and erosion are checked against it (LaMa uses it)
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib", "kornia"],
                    "bench": ["matplotlib", "pytest-benchmark"]},
    entry_points={"console_scripts": ["lama-fast=lama_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
