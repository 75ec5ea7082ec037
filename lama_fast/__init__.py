"""lama_fast: LaMa inpainting at high resolution on ffc_kernels' fused FFC.

Public API:
- ``build_generator(name)``: the reference generator (``big-lama``, ``lama-fourier``), eval mode.
- ``load_generator(path, device=None)``: LaMa's Lightning ``best.ckpt``, the TorchScript
  ``big-lama.pt``, or a plain generator state dict.
- ``optimize(generator, precision="fp32")``: the whole generator as one folded channels_last plan, in place.
- ``inpaint(image, mask, generator, ...)``: LaMa's inference convention, uint8 RGB out.
- ``refine(image, mask, generator, ...)``: LaMa's multi-scale feature refinement for large images.
- ``inpaint_many(pairs, generator, batch_size=...)``: many pairs at throughput (readers in worker
  processes, batches by size), yielding results as they complete.
- ``inpaint_folder(images, masks, out, generator, ...)``: a folder, resumable, written atomically.
"""
from lama_fast.checkpoints import CheckpointError, load_generator
from lama_fast.folder import inpaint_folder
from lama_fast.generator import GENERATOR_CONFIGS, build_generator
from lama_fast.many import inpaint_many
from lama_fast.memory import estimate_memory
from lama_fast.optimized import optimize
from lama_fast.pipeline import inpaint
from lama_fast.refinement import refine

__all__ = ["CheckpointError", "GENERATOR_CONFIGS", "build_generator", "estimate_memory", "load_generator", "optimize", "inpaint", "refine",
           "inpaint_many", "inpaint_folder"]
