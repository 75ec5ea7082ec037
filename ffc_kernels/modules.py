"""Drop-in fast twins of LaMa's FFC, FFC_BN_ACT and FFCResnetBlock.

Each is a subclass of the reference module with the same constructor and the same
state_dict keys; only ``forward`` differs, and only in inference:

- the local output convl2l(x_l) + convg2l(x_g) is one convolution over the concatenated
  input with concatenated weights (one padding pass, one cuDNN/oneDNN call), bn_l folded into
  weights and bias, ReLU applied while writing into the output buffer;
- the global output runs SpectralTransform as ``pointwise_conv`` (conv1 + BN + ReLU), one or
  two fused ``fourier_unit`` calls, and ``pointwise_conv`` again (conv2 over x + fu(x) + the
  tiled LFU term, + convl2g(x_l), bn_g folded, ReLU), written straight into the output buffer;
- both outputs are channel slices of one buffer, so the next FFC's concatenation and the
  residual block's two adds are free views and one in-place add.

Bytes of the exchange (fp32, per pixel, big-lama's residual FFC: 128 local, 384 global
channels; convolutions counted as one read of their input and one write of their output):
    eager: convl2l with its reflect pad (2.0 KB) + convg2l with its pad (5.1 KB) + add (1.5 KB)
           + bn_l, act_l (2.0 KB) + convl2g with a second pad of x_l (3.1 KB) + the add to
           convg2g (4.6 KB) + bn_g, act_g (6.1 KB)                              = 24.6 KB
    fused: one pad of [x_l | x_g] (4.1 KB) + the merged conv (2.6 KB) + ReLU into the output
           buffer (1.0 KB) + convl2g on the padded slice (2.0 KB) + its read in conv2's
           epilogue (1.5 KB)                                                    = 11.3 KB
The merged convolution's concatenated input costs nothing because the previous layer wrote
[x_l | x_g] into one buffer (a torch.cat would add 4.1 KB), and the residual block's two adds
(6.1 KB) become one in-place add over that buffer (the same bytes, one launch).

Folded weights are derived from the parameters and BatchNorm buffers, cached, and rebuilt
when any of them changes (``load_state_dict``, an optimizer step, ``.to()``: each bumps a
tensor version or moves its storage). The fused path runs when the module is in eval mode and
no gradient is needed (``torch.no_grad``/``inference_mode``, or nothing requires grad);
otherwise the reference math runs, so training, its gradients and BatchNorm statistics are
exactly the reference's. Configurations the fused path does not cover (gated FFC, grouped
convolutions, norms other than BatchNorm2d, activations other than ReLU, LaMa's optional SE /
positional-encoding Fourier units) also run the reference math.

Precision of the fused GEMMs (``precision=`` in the constructors, or ``set_precision(model, ...)``
after ``convert``): "fp32" (fp32-class split TF32), "tf32" or "bf16" for fp32 data. By default
(None) they do what the 1x1 convolutions they replace would: in an fp32 model follow
``torch.backends.cudnn.allow_tf32``, in a bf16 model multiply in bf16 (the FFTs' fp32 data
too). bf16 data always multiplies in bf16; all accumulate in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ffc_kernels import backends, reference
from ffc_kernels.fold import batchnorm_affine, fold
from ffc_kernels.ops.fourier_unit import fourier_unit
from ffc_kernels.ops.pointwise_conv import pointwise_conv
from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight

__all__ = ["FastFFC", "FastFFC_BN_ACT", "FastFFCResnetBlock", "clear_fold_cache", "join_channels", "set_precision"]


def join_channels(a, b):
    """The tensor whose channel slices are ``a`` then ``b``, if they are adjacent views of one buffer, else None.

    None under torch.compile, which cannot trace storage pointers or ``as_strided`` (its graph
    concatenates instead, and fuses that itself)."""
    if torch.compiler.is_compiling():
        return None
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dim() != 4 or b.dim() != 4:
        return None
    if (a.dtype != b.dtype or a.device != b.device or a.stride() != b.stride()
            or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or a.shape[1] == 0 or b.shape[1] == 0):
        return None
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    if b.storage_offset() != a.storage_offset() + a.shape[1] * a.stride(1):
        return None
    shape = (a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
    return a.as_strided(shape, a.stride(), a.storage_offset())


def _cat_channels(a, b):
    joined = join_channels(a, b)
    return joined if joined is not None else torch.cat((a, b), dim=1)


def _relu_flag(act):
    """True for ReLU, False for Identity, None for an activation the kernels do not fuse."""
    if isinstance(act, nn.ReLU):
        return True
    if isinstance(act, nn.Identity):
        return False
    return None


def _fusable_fourier_unit(fu) -> bool:
    return (
        fu.conv_layer.groups == 1
        and type(fu.bn) is nn.BatchNorm2d
        and getattr(fu, "fft_norm", "ortho") in ("ortho", "backward", "forward")
        # Options of LaMa's original FourierUnit that big-lama and lama-fourier leave off.
        and not getattr(fu, "use_se", False)
        and not getattr(fu, "spectral_pos_encoding", False)
        and getattr(fu, "spatial_scale_factor", None) is None
        and not getattr(fu, "ffc3d", False)
    )


def _fusable_spectral(st) -> bool:
    if not isinstance(st.downsample, (nn.Identity, nn.AvgPool2d)):
        return False
    if isinstance(st.downsample, nn.AvgPool2d) and not _is_2x2_pool(st.downsample):
        return False
    conv1 = list(st.conv1)
    return (
        len(conv1) == 3
        and isinstance(conv1[0], nn.Conv2d) and conv1[0].groups == 1 and conv1[0].kernel_size == (1, 1)
        and type(conv1[1]) is nn.BatchNorm2d and isinstance(conv1[2], nn.ReLU)
        and st.conv2.groups == 1 and st.conv2.kernel_size == (1, 1)
        and _fusable_fourier_unit(st.fu)
        and (not st.enable_lfu or _fusable_fourier_unit(st.lfu))
    )


def _is_2x2_pool(pool) -> bool:
    as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (as_pair(pool.kernel_size) == (2, 2) and as_pair(pool.stride) == (2, 2)
            and as_pair(pool.padding) == (0, 0) and not pool.ceil_mode)


def _fusable_ffc(ffc) -> bool:
    if getattr(ffc, "gated", False):
        return False
    convs = [c for c in (ffc.convl2l, ffc.convl2g, ffc.convg2l) if isinstance(c, nn.Conv2d)]
    if any(c.groups != 1 for c in convs):
        return False
    geometry = {(c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode) for c in convs}
    if len(geometry) > 1:
        return False
    if isinstance(ffc.convg2g, nn.Identity):
        return True
    return _fusable_spectral(ffc.convg2g)


class _Folded:
    """Weights and biases of one FFC (+ its norms) in the form the fused path consumes."""


def _spectral_folded(st, scale_g, shift_g, l2g_bias, dtype, device):
    f32 = dict(dtype=torch.float32, device=device)
    folded = _Folded()
    conv1, bn1 = st.conv1[0], st.conv1[1]
    units = [st.fu, st.lfu] if st.enable_lfu else [st.fu]
    if any(batchnorm_affine(bn) is None for bn in [bn1] + [u.bn for u in units]):
        return None  # a BatchNorm in train mode inside an eval FFC: its batch statistics are needed
    w1, b1 = fold(conv1.weight, batchnorm_affine(bn1), conv1.bias)
    folded.w1, folded.b1 = w1.flatten(1).to(**f32), b1.to(**f32)
    for name in ("fu", "lfu") if st.enable_lfu else ("fu",):
        unit = getattr(st, name)
        w, b = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn), unit.conv_layer.bias)
        setattr(folded, name, (pack_weight(w.to(**f32)), pack_bias(b.to(**f32)), getattr(unit, "fft_norm", "ortho")))
    # conv2's epilogue computes bn_g(conv2(s) + convl2g(x_l)): bn_g's scale goes into both
    # weights, and the biases of both convolutions and bn_g's shift into one bias.
    w2, b2 = fold(st.conv2.weight, (scale_g, shift_g), st.conv2.bias)
    if l2g_bias is not None:
        extra = l2g_bias.double() * (scale_g if scale_g is not None else 1.0)
        b2 = extra if b2 is None else b2 + extra
    folded.w2 = w2.flatten(1).to(**f32)
    folded.b2 = None if b2 is None else b2.to(**f32)
    return folded


def _fold_ffc(ffc, bn_l, bn_g, dtype, device):
    """Fold bn_l/bn_g (None: no norm) into the FFC's weights; None if a norm cannot be folded."""
    aff_l = (None, None) if bn_l is None else batchnorm_affine(bn_l)
    aff_g = (None, None) if bn_g is None else batchnorm_affine(bn_g)
    if aff_l is None or aff_g is None:
        return None
    folded = _Folded()
    # Local rows: [convl2l | convg2l] over the concatenated input.
    local = [c for c in (ffc.convl2l, ffc.convg2l) if isinstance(c, nn.Conv2d)]
    folded.local = None
    if ffc.ratio_gout != 1 and local:
        weight = torch.cat([c.weight for c in local], dim=1)
        biases = [c.bias for c in local if c.bias is not None]
        w, b = fold(weight, aff_l, sum(b.double() for b in biases) if biases else None)
        folded.local = (w.to(dtype=dtype, device=device), None if b is None else b.to(dtype=dtype, device=device))
    # Global rows: convl2g with bn_g's scale; its bias and bn_g's shift go to conv2's epilogue
    # when there is a spectral branch, else to the convolution itself.
    folded.l2g = None
    folded.spectral = None
    if ffc.ratio_gout != 0 and isinstance(ffc.convl2g, nn.Conv2d):
        if isinstance(ffc.convg2g, nn.Identity):
            w, b = fold(ffc.convl2g.weight, aff_g, ffc.convl2g.bias)
        else:
            w, b = fold(ffc.convl2g.weight, (aff_g[0], None))
        folded.l2g = (w.to(dtype=dtype, device=device), None if b is None else b.to(dtype=dtype, device=device))
    if ffc.ratio_gout != 0 and not isinstance(ffc.convg2g, nn.Identity):
        l2g_bias = ffc.convl2g.bias if isinstance(ffc.convl2g, nn.Conv2d) else None
        folded.spectral = _spectral_folded(ffc.convg2g, aff_g[0], aff_g[1], l2g_bias, dtype, device)
        if folded.spectral is None:
            return None
    # No spectral branch: local and global rows are one convolution over the same input.
    folded.rows = None
    rows = [r for r in (folded.local, folded.l2g) if r is not None]
    if folded.spectral is None and rows:
        bias = None
        if any(r[1] is not None for r in rows):
            bias = torch.cat([r[1] if r[1] is not None else r[0].new_zeros(r[0].shape[0]) for r in rows])
        folded.rows = (torch.cat([r[0] for r in rows]), bias)
    return folded


def _fold_key(*roots):
    """What folding reads, as (tensors, key): every parameter and buffer with its version and
    storage, and the settings of each module (BatchNorm eps and mode, FFT norm). One walk, since
    it runs on every forward."""
    tensors, key = [], []
    for root in roots:
        if root is None:
            continue
        for m in root.modules():
            # __dict__ lookups: a missing attribute costs nn.Module.__getattr__ an exception.
            key.append((type(m), m.__dict__.get("eps"), m.training, m.__dict__.get("fft_norm")))
            for group in (m._parameters, m._buffers):
                for t in group.values():
                    if t is not None:
                        tensors.append(t)
                        key.append((0 if t.is_inference() else t._version, t.data_ptr()))
    return tensors, tuple(key)


def _has_hooks(module: nn.Module, include_self: bool = True) -> bool:
    """Whether running ``module`` with fused math would skip a forward hook someone registered."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        backends.warn_once("ffc_kernels: global module forward hooks are registered (a profiler or FLOP "
                           "counter?); FFC modules run the reference math while they are, so every hook fires")
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               for m in module.modules() if include_self or m is not module)


def _spatial_conv(ffc):
    """The FFC's first spatial convolution (all share kernel, stride, padding), or None."""
    return next((c for c in (ffc.convl2l, ffc.convl2g, ffc.convg2l) if isinstance(c, nn.Conv2d)), None)


def _pad(x, conv):
    if conv.padding_mode == "zeros":
        return x, conv.padding
    ph, pw = conv.padding
    if ph == 0 and pw == 0:
        return x, (0, 0)
    return F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode), (0, 0)


def _conv(x_padded, padding, conv, weight_bias):
    weight, bias = weight_bias
    return F.conv2d(x_padded, weight, bias, conv.stride, padding, conv.dilation)


def _spectral_forward(st, folded, x_g, residual, relu, out, precision):
    """SpectralTransform(x_g) (+ residual), bn_g and act_g folded, written into ``out``."""
    x = st.downsample(x_g)
    # conv1's output feeds the FFTs, which run in fp32 whatever the model's dtype.
    t = torch.empty(x.shape[0], folded.w1.shape[0], *x.shape[2:], dtype=torch.float32, device=x.device)
    pointwise_conv(x, folded.w1, folded.b1, relu=True, out=t, precision=precision)
    f = fourier_unit(t, folded.fu[0], folded.fu[1], fft_norm=folded.fu[2], precision=precision)
    tiled = None
    if st.enable_lfu:
        # LaMa's local Fourier unit input, built exactly as LaMa builds it (tile height h // 2
        # on both axes); shapes LaMa cannot tile back fail in the reference, so they go there.
        n, c, h, w = t.shape
        split_s = h // 2
        if 2 * split_s != h or 2 * split_s != w or c % 4:
            return None
        xs = torch.cat(torch.split(t[:, : c // 4], split_s, dim=-2), dim=1)
        xs = torch.cat(torch.split(xs, split_s, dim=-1), dim=1).contiguous()
        tiled = fourier_unit(xs, folded.lfu[0], folded.lfu[1], fft_norm=folded.lfu[2], precision=precision)
    return pointwise_conv(t, folded.w2, folded.b2, addend=f, tiled=tiled, residual=residual, relu=relu, out=out,
                          precision=precision)


def _needs_grad(module, x) -> bool:
    if not torch.is_grad_enabled():
        return False
    inputs = x if isinstance(x, tuple) else (x,)
    if any(torch.is_tensor(t) and t.requires_grad for t in inputs):
        return True
    return any(p.requires_grad for p in module.parameters())


class _FusedFFCMixin:
    """The fused eval forward shared by FastFFC (no norms) and FastFFC_BN_ACT."""

    _ffc_fold_cache = None
    last_path = None  # "fused" or "reference": which math the last forward ran
    # The fused GEMMs' precision on fp32 data: "fp32" (split TF32), "tf32" or "bf16"; None follows
    # torch.backends.cudnn.allow_tf32 at each forward, as the convolutions replaced would.
    precision = None

    def _folded(self, ffc, bn_l, bn_g, dtype, device):
        # Keyed on each source tensor's identity, storage and version: in-place updates
        # (load_state_dict, optimizer steps) bump the version, new Parameters change identity,
        # ``.to()`` and ``p.data = ...`` change storage. Writes through ``p.data`` bump nothing:
        # call ``clear_fold_cache(model)`` after those. Inference tensors (made under
        # torch.inference_mode) have no version counter and cannot be changed in place outside it.
        tensors, key = _fold_key(ffc, bn_l, bn_g)
        versions = (dtype, device, key)
        cache = self._ffc_fold_cache
        if (cache is None or cache[1] != versions or len(cache[0]) != len(tensors)
                or any(a is not b for a, b in zip(cache[0], tensors))):
            with torch.no_grad():
                cache = (tensors, versions, _fold_ffc(ffc, bn_l, bn_g, dtype, device))
            self._ffc_fold_cache = cache
        return cache[2]

    def _fused_ffc(self, ffc, x, bn_l, bn_g, relu_l, relu_g):
        """The FFC (+ norms and ReLU) output, or None when the fused path does not apply."""
        x_l, x_g = x if type(x) is tuple else (x, 0)
        ref = next((t for t in (x_l, x_g) if torch.is_tensor(t)), None)
        if ref is None or ref.dim() != 4 or ref.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        if not _fusable_ffc(ffc) or _has_hooks(self, include_self=False):
            return None  # hooks (weight_norm, feature taps) must see the submodules run
        # Identity branches pass their input through: the fused path covers them only when that
        # input is LaMa's integer 0 placeholder.
        has_l, has_g = torch.is_tensor(x_l), torch.is_tensor(x_g)
        used = []
        if ffc.ratio_gout != 1:
            used += [(ffc.convl2l, has_l), (ffc.convg2l, has_g)]
        if ffc.ratio_gout != 0:
            used += [(ffc.convl2g, has_l), (ffc.convg2g, has_g)]
        for conv, present in used:
            if isinstance(conv, nn.Identity) and present:
                return None
            if not isinstance(conv, nn.Identity) and not present:
                return None
        folded = self._folded(ffc, bn_l, bn_g, ref.dtype, ref.device)
        if folded is None:
            return None
        conv = _spatial_conv(ffc)

        # The spatial convolutions' input: [x_l | x_g] for the local rows, x_l for convl2g.
        x_pad = padding = None
        if conv is not None:
            x_in = _cat_channels(x_l, x_g) if folded.local is not None and has_l and has_g else (x_l if has_l else x_g)
            x_pad, padding = _pad(x_in, conv)

        if folded.spectral is None:
            if folded.rows is None:
                return None
            y = _conv(x_pad, padding, conv, folded.rows)
            n_l = folded.local[0].shape[0] if folded.local is not None else 0
            out_l = y[:, :n_l] if folded.local is not None else 0
            out_g = y[:, n_l:] if folded.l2g is not None else 0
            for out, relu in ((out_l, relu_l), (out_g, relu_g)):
                if relu and torch.is_tensor(out):
                    out.relu_()
            return out_l, out_g

        residual = None
        if folded.l2g is not None:
            n_in_l = x_l.shape[1]
            residual = _conv(x_pad[:, :n_in_l] if x_pad.shape[1] != n_in_l else x_pad, padding, conv, folded.l2g)
        y_l = _conv(x_pad, padding, conv, folded.local) if folded.local is not None else None
        st = ffc.convg2g
        n_l = y_l.shape[1] if y_l is not None else 0
        n_g = folded.spectral.w2.shape[0]
        h_o, w_o = x_g.shape[2] // st.stride, x_g.shape[3] // st.stride
        # Channels innermost in the input: keep the output channels_last too.
        memory_format = torch.channels_last if ref.stride(1) < ref.stride(3) else torch.contiguous_format
        out = torch.empty(x_g.shape[0], n_l + n_g, h_o, w_o, dtype=ref.dtype, device=ref.device,
                          memory_format=memory_format)
        out_l, out_g = 0, out[:, n_l:]
        if y_l is not None:
            if y_l.shape[2:] != (h_o, w_o):
                return None  # LaMa cannot add these either; let the reference raise its error
            out_l = out[:, :n_l]
            if relu_l:
                torch.clamp(y_l, min=0, out=out_l)
            else:
                out_l.copy_(y_l)
        # A bf16 model's convolutions would multiply in bf16, its fp32 spectral data included.
        precision = self.precision or ("bf16" if ref.dtype == torch.bfloat16 else None)
        if _spectral_forward(st, folded.spectral, x_g, residual, relu_g, out_g, precision) is None:
            return None
        return out_l, out_g


def set_precision(model: nn.Module, precision: str | None) -> None:
    """Give every fast module in ``model`` the GEMM ``precision`` ("fp32", "tf32", "bf16", or None)."""
    backends.check_precision(precision)
    for m in model.modules():
        if isinstance(m, _FusedFFCMixin):
            m.precision = precision


def clear_fold_cache(model: nn.Module) -> None:
    """Drop the folded weights of every fast module in ``model``; the next forward refolds."""
    for m in model.modules():
        if isinstance(m, _FusedFFCMixin):
            m._ffc_fold_cache = None


class FastFFC(_FusedFFCMixin, reference.FFC):
    """LaMa's FFC with a fused inference path; same constructor (plus ``precision``) and state_dict keys."""

    def __init__(self, *args, precision=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.precision = backends.check_precision(precision)

    def forward(self, x):
        if not self.training and not _needs_grad(self, x):
            out = self._fused_ffc(self, x, None, None, False, False)
            if out is not None:
                self.last_path = "fused"
                return out
        self.last_path = "reference"
        return super().forward(x)


class FastFFC_BN_ACT(_FusedFFCMixin, reference.FFC_BN_ACT):
    """LaMa's FFC_BN_ACT with its norms and activations folded into the fused FFC."""

    def __init__(self, *args, precision=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ffc.__class__ = FastFFC
        self.precision = self.ffc.precision = backends.check_precision(precision)

    def forward(self, x):
        if not self.training and not _needs_grad(self, x):
            relu_l, relu_g = _relu_flag(self.act_l), _relu_flag(self.act_g)
            if relu_l is not None and relu_g is not None:
                out = self._fused_ffc(self.ffc, x, self.bn_l, self.bn_g, relu_l, relu_g)
                if out is not None:
                    self.last_path = self.ffc.last_path = "fused"
                    return out
        self.last_path = "reference"
        return super().forward(x)


class FastFFCResnetBlock(reference.FFCResnetBlock):
    """LaMa's FFCResnetBlock whose residual adds run as one in-place add over the joined output."""

    def __init__(self, *args, precision=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv1.__class__ = FastFFC_BN_ACT
        self.conv2.__class__ = FastFFC_BN_ACT
        self.conv1.ffc.__class__ = FastFFC
        self.conv2.ffc.__class__ = FastFFC
        set_precision(self, precision)

    last_path = None  # "fused" or "reference": which math the last forward ran

    def forward(self, x):
        if self.inline or self.training or _needs_grad(self, x):
            self.last_path = "reference"
            return super().forward(x)
        self.last_path = "fused"
        x_l, x_g = x if type(x) is tuple else (x, 0)
        y_l, y_g = self.conv2(self.conv1((x_l, x_g)))
        if _has_hooks(self.conv2):  # a hook may hold conv2's outputs: LaMa's out-of-place adds
            return x_l + y_l, x_g + y_g
        # conv2's outputs are fresh tensors nobody else holds, so the adds may go in place.
        y, identity = join_channels(y_l, y_g), join_channels(x_l, x_g)
        if y is not None and identity is not None and y.shape == identity.shape:
            y.add_(identity)
            return y_l, y_g
        return _add(y_l, x_l), _add(y_g, x_g)


def _add(y, identity):
    if torch.is_tensor(y) and torch.is_tensor(identity) and y.shape == identity.shape:
        return y.add_(identity)
    return identity + y
