"""lama_fast: LaMa inpainting at high resolution on ffc_kernels' fused FFC.

Public API:
- ``build_generator(name)``: the reference generator (``big-lama``, ``lama-fourier``), eval mode.
- ``load_generator(path, device=None)``: LaMa's Lightning ``best.ckpt``, the TorchScript
  ``big-lama.pt``, or a plain generator state dict.
- ``optimize(generator, precision="fp32")``: the whole generator as one folded channels_last plan, in place.
- ``inpaint(image, mask, generator, ...)``: LaMa's inference convention, uint8 RGB out.
"""
from lama_fast.checkpoints import CheckpointError, load_generator
from lama_fast.generator import GENERATOR_CONFIGS, build_generator
from lama_fast.memory import estimate_memory
from lama_fast.optimized import optimize
from lama_fast.pipeline import inpaint

__all__ = ["CheckpointError", "GENERATOR_CONFIGS", "build_generator", "estimate_memory", "load_generator", "optimize", "inpaint"]
