"""LaMa's Fast Fourier Convolution generator in plain PyTorch: the ground truth.

Every fast path in this library is tested against the modules here. They follow the
published LaMa generator (Suvorov et al., WACV 2022) operation for operation, with the
same module names, constructor arguments, ``nn.Sequential`` indices and state_dict keys,
so the released checkpoints load with ``strict=True``:

- ``FourierUnit``: rfft2 (ortho) -> real/imag stacked as channels 2c, 2c+1 -> 1x1 conv ->
  BatchNorm -> ReLU -> back to complex -> irfft2 (ortho) at the input's spatial size.
- ``SpectralTransform``: optional 2x2 average pool, 1x1 conv+BN+ReLU (``conv1``), a global
  ``FourierUnit`` (``fu``), an optional local Fourier unit on 2x2 spatial tiles (``lfu``),
  and a 1x1 conv (``conv2``) of the sum.
- ``FFC``: the local/global exchange; ``FFC_BN_ACT``; ``FFCResnetBlock``;
  ``ConcatTupleLayer``; ``FFCResNetGenerator``.

Nothing here is optimised on purpose: the eager torch ops are the specification.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "FourierUnit",
    "SpectralTransform",
    "FFC",
    "FFC_BN_ACT",
    "FFCResnetBlock",
    "ConcatTupleLayer",
    "FFCResNetGenerator",
    "GENERATOR_CONFIGS",
    "build_reference_generator",
]


class FourierUnit(nn.Module):
    """1x1 convolution over the stacked real and imaginary parts of rfft2(x)."""

    def __init__(self, in_channels, out_channels, groups=1, spatial_scale_factor=None, spatial_scale_mode="bilinear",
                 spectral_pos_encoding=False, use_se=False, se_kwargs=None, ffc3d=False, fft_norm="ortho"):
        super().__init__()
        # LaMa's optional variants, off in every released configuration (big-lama, lama-fourier).
        unsupported = {name: value for name, value in (
            ("spatial_scale_factor", spatial_scale_factor), ("spectral_pos_encoding", spectral_pos_encoding),
            ("use_se", use_se), ("ffc3d", ffc3d)) if value}
        if unsupported:
            raise NotImplementedError(f"FourierUnit options not implemented here: {unsupported}")
        self.spatial_scale_factor = spatial_scale_factor
        self.spatial_scale_mode = spatial_scale_mode
        self.spectral_pos_encoding = spectral_pos_encoding
        self.use_se = use_se
        self.ffc3d = ffc3d
        self.groups = groups
        self.conv_layer = nn.Conv2d(
            in_channels=in_channels * 2,
            out_channels=out_channels * 2,
            kernel_size=1,
            stride=1,
            padding=0,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels * 2)
        self.relu = nn.ReLU(inplace=True)
        self.fft_norm = fft_norm

    def forward(self, x):
        batch = x.shape[0]
        fft_dim = (-2, -1)
        ffted = torch.fft.rfftn(x, dim=fft_dim, norm=self.fft_norm)
        ffted = torch.stack((ffted.real, ffted.imag), dim=-1)  # (b, c, h, w/2+1, 2)
        ffted = ffted.permute(0, 1, 4, 2, 3).contiguous()  # (b, c, 2, h, w/2+1)
        ffted = ffted.view((batch, -1) + ffted.size()[3:])  # channel 2c = Re(c), 2c+1 = Im(c)

        ffted = self.conv_layer(ffted)
        ffted = self.relu(self.bn(ffted))

        ffted = ffted.view((batch, -1, 2) + ffted.size()[2:]).permute(0, 1, 3, 4, 2).contiguous()
        ffted = torch.complex(ffted[..., 0], ffted[..., 1])

        return torch.fft.irfftn(ffted, s=x.shape[-2:], dim=fft_dim, norm=self.fft_norm)


class SpectralTransform(nn.Module):
    """The global-to-global path of an FFC: conv1 -> FourierUnit (+ LFU) -> conv2."""

    def __init__(self, in_channels, out_channels, stride=1, groups=1, enable_lfu=True, **fu_kwargs):
        super().__init__()
        self.enable_lfu = enable_lfu
        self.downsample = nn.AvgPool2d(kernel_size=(2, 2), stride=2) if stride == 2 else nn.Identity()
        self.stride = stride
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, kernel_size=1, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels // 2),
            nn.ReLU(inplace=True),
        )
        self.fu = FourierUnit(out_channels // 2, out_channels // 2, groups, **fu_kwargs)
        if self.enable_lfu:
            self.lfu = FourierUnit(out_channels // 2, out_channels // 2, groups)
        self.conv2 = nn.Conv2d(out_channels // 2, out_channels, kernel_size=1, groups=groups, bias=False)

    def forward(self, x):
        x = self.downsample(x)
        x = self.conv1(x)
        output = self.fu(x)

        if self.enable_lfu:
            # The first quarter of the channels, cut into a 2x2 grid of tiles stacked along
            # channels. LaMa uses the tile height h // 2 for both axes.
            n, c, h, w = x.shape
            split_no = 2
            split_s = h // split_no
            xs = torch.cat(torch.split(x[:, : c // 4], split_s, dim=-2), dim=1).contiguous()
            xs = torch.cat(torch.split(xs, split_s, dim=-1), dim=1).contiguous()
            xs = self.lfu(xs)
            xs = xs.repeat(1, 1, split_no, split_no).contiguous()
        else:
            xs = 0

        return self.conv2(x + output + xs)


class FFC(nn.Module):
    """Fast Fourier Convolution: local (l) and global (g) channel groups and their exchange."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        ratio_gin,
        ratio_gout,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        enable_lfu=True,
        padding_type="reflect",
        gated=False,
        **spectral_kwargs,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"FFC stride must be 1 or 2, got {stride}")
        self.stride = stride

        in_cg = int(in_channels * ratio_gin)
        in_cl = in_channels - in_cg
        out_cg = int(out_channels * ratio_gout)
        out_cl = out_channels - out_cg

        self.ratio_gin = ratio_gin
        self.ratio_gout = ratio_gout
        self.global_in_num = in_cg

        conv_args = (kernel_size, stride, padding, dilation, groups, bias)
        module = nn.Identity if in_cl == 0 or out_cl == 0 else nn.Conv2d
        self.convl2l = module(in_cl, out_cl, *conv_args, padding_mode=padding_type)
        module = nn.Identity if in_cl == 0 or out_cg == 0 else nn.Conv2d
        self.convl2g = module(in_cl, out_cg, *conv_args, padding_mode=padding_type)
        module = nn.Identity if in_cg == 0 or out_cl == 0 else nn.Conv2d
        self.convg2l = module(in_cg, out_cl, *conv_args, padding_mode=padding_type)
        module = nn.Identity if in_cg == 0 or out_cg == 0 else SpectralTransform
        self.convg2g = module(in_cg, out_cg, stride, 1 if groups == 1 else groups // 2, enable_lfu, **spectral_kwargs)

        self.gated = gated
        module = nn.Identity if in_cg == 0 or out_cl == 0 or not self.gated else nn.Conv2d
        self.gate = module(in_channels, 2, 1)

    def forward(self, x):
        x_l, x_g = x if type(x) is tuple else (x, 0)
        out_xl, out_xg = 0, 0

        if self.gated:
            total_input_parts = [x_l]
            if torch.is_tensor(x_g):
                total_input_parts.append(x_g)
            total_input = torch.cat(total_input_parts, dim=1)
            gates = torch.sigmoid(self.gate(total_input))
            g2l_gate, l2g_gate = gates.chunk(2, dim=1)
        else:
            g2l_gate, l2g_gate = 1, 1

        if self.ratio_gout != 1:
            out_xl = self.convl2l(x_l) + self.convg2l(x_g) * g2l_gate
        if self.ratio_gout != 0:
            out_xg = self.convl2g(x_l) * l2g_gate + self.convg2g(x_g)

        return out_xl, out_xg


class FFC_BN_ACT(nn.Module):
    """FFC followed by a norm and an activation on each branch."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        ratio_gin,
        ratio_gout,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        norm_layer=nn.BatchNorm2d,
        activation_layer=nn.Identity,
        padding_type="reflect",
        enable_lfu=True,
        **kwargs,
    ):
        super().__init__()
        self.ffc = FFC(
            in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding,
            dilation, groups, bias, enable_lfu, padding_type=padding_type, **kwargs,
        )
        lnorm = nn.Identity if ratio_gout == 1 else norm_layer
        gnorm = nn.Identity if ratio_gout == 0 else norm_layer
        global_channels = int(out_channels * ratio_gout)
        self.bn_l = lnorm(out_channels - global_channels)
        self.bn_g = gnorm(global_channels)

        lact = nn.Identity if ratio_gout == 1 else activation_layer
        gact = nn.Identity if ratio_gout == 0 else activation_layer
        self.act_l = lact(inplace=True)
        self.act_g = gact(inplace=True)

    def forward(self, x):
        x_l, x_g = self.ffc(x)
        x_l = self.act_l(self.bn_l(x_l))
        x_g = self.act_g(self.bn_g(x_g))
        return x_l, x_g


class FFCResnetBlock(nn.Module):
    """Two 3x3 FFC_BN_ACT with a residual connection on both branches."""

    def __init__(self, dim, padding_type, norm_layer, activation_layer=nn.ReLU, dilation=1,
                 spatial_transform_kwargs=None, inline=False, **conv_kwargs):
        super().__init__()
        if spatial_transform_kwargs is not None:
            raise NotImplementedError("LaMa's LearnableSpatialTransformWrapper is not implemented here")
        self.conv1 = FFC_BN_ACT(dim, dim, kernel_size=3, padding=dilation, dilation=dilation,
                                norm_layer=norm_layer, activation_layer=activation_layer,
                                padding_type=padding_type, **conv_kwargs)
        self.conv2 = FFC_BN_ACT(dim, dim, kernel_size=3, padding=dilation, dilation=dilation,
                                norm_layer=norm_layer, activation_layer=activation_layer,
                                padding_type=padding_type, **conv_kwargs)
        self.inline = inline

    def forward(self, x):
        if self.inline:
            x_l, x_g = x[:, : -self.conv1.ffc.global_in_num], x[:, -self.conv1.ffc.global_in_num:]
        else:
            x_l, x_g = x if type(x) is tuple else (x, 0)

        id_l, id_g = x_l, x_g

        x_l, x_g = self.conv1((x_l, x_g))
        x_l, x_g = self.conv2((x_l, x_g))

        x_l, x_g = id_l + x_l, id_g + x_g
        out = x_l, x_g
        if self.inline:
            out = torch.cat(out, dim=1)
        return out


class ConcatTupleLayer(nn.Module):
    def forward(self, x):
        assert isinstance(x, tuple)
        x_l, x_g = x
        assert torch.is_tensor(x_l) or torch.is_tensor(x_g)
        if not torch.is_tensor(x_g):
            return x_l
        return torch.cat(x, dim=1)


_OUTPUT_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class FFCResNetGenerator(nn.Module):
    """LaMa's generator: 7x7 stem, strided FFC downsampling, FFC residual blocks, decoder."""

    def __init__(
        self,
        input_nc,
        output_nc,
        ngf=64,
        n_downsampling=3,
        n_blocks=9,
        norm_layer=nn.BatchNorm2d,
        padding_type="reflect",
        activation_layer=nn.ReLU,
        up_norm_layer=nn.BatchNorm2d,
        up_activation=None,
        init_conv_kwargs=None,
        downsample_conv_kwargs=None,
        resnet_conv_kwargs=None,
        spatial_transform_layers=None,
        spatial_transform_kwargs=None,
        add_out_act=True,
        max_features=1024,
        out_ffc=False,
        out_ffc_kwargs=None,
    ):
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        if spatial_transform_layers is not None:
            raise NotImplementedError("LaMa's LearnableSpatialTransformWrapper is not implemented here")
        super().__init__()
        init_conv_kwargs = dict(init_conv_kwargs or {})
        downsample_conv_kwargs = dict(downsample_conv_kwargs or {})
        resnet_conv_kwargs = dict(resnet_conv_kwargs or {})
        up_activation = nn.ReLU(True) if up_activation is None else up_activation

        model = [
            nn.ReflectionPad2d(3),
            FFC_BN_ACT(input_nc, ngf, kernel_size=7, padding=0, norm_layer=norm_layer,
                       activation_layer=activation_layer, **init_conv_kwargs),
        ]

        for i in range(n_downsampling):
            mult = 2 ** i
            if i == n_downsampling - 1:
                cur_conv_kwargs = dict(downsample_conv_kwargs)
                cur_conv_kwargs["ratio_gout"] = resnet_conv_kwargs.get("ratio_gin", 0)
            else:
                cur_conv_kwargs = downsample_conv_kwargs
            model += [
                FFC_BN_ACT(min(max_features, ngf * mult), min(max_features, ngf * mult * 2),
                           kernel_size=3, stride=2, padding=1, norm_layer=norm_layer,
                           activation_layer=activation_layer, **cur_conv_kwargs)
            ]

        mult = 2 ** n_downsampling
        feats_num_bottleneck = min(max_features, ngf * mult)
        for _ in range(n_blocks):
            model += [FFCResnetBlock(feats_num_bottleneck, padding_type=padding_type,
                                     activation_layer=activation_layer, norm_layer=norm_layer,
                                     **resnet_conv_kwargs)]

        model += [ConcatTupleLayer()]

        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            model += [
                nn.ConvTranspose2d(min(max_features, ngf * mult), min(max_features, int(ngf * mult / 2)),
                                   kernel_size=3, stride=2, padding=1, output_padding=1),
                up_norm_layer(min(max_features, int(ngf * mult / 2))),
                up_activation,
            ]

        if out_ffc:
            model += [FFCResnetBlock(ngf, padding_type=padding_type, activation_layer=activation_layer,
                                     norm_layer=norm_layer, inline=True, **dict(out_ffc_kwargs or {}))]

        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        if add_out_act:
            model.append(_OUTPUT_ACTIVATIONS["tanh" if add_out_act is True else add_out_act]())
        self.model = nn.Sequential(*model)

    def forward(self, input):
        return self.model(input)


def _lama_config(n_blocks):
    return dict(
        input_nc=4,
        output_nc=3,
        ngf=64,
        n_downsampling=3,
        n_blocks=n_blocks,
        add_out_act="sigmoid",
        init_conv_kwargs=dict(ratio_gin=0, ratio_gout=0, enable_lfu=False),
        downsample_conv_kwargs=dict(ratio_gin=0, ratio_gout=0, enable_lfu=False),
        resnet_conv_kwargs=dict(ratio_gin=0.75, ratio_gout=0.75, enable_lfu=False),
    )


# The generator sections of LaMa's released configs (big-lama/config.yaml and the
# lama-fourier config): 18 and 9 residual blocks, otherwise identical.
GENERATOR_CONFIGS = {
    "big-lama": _lama_config(18),
    "lama-fourier": _lama_config(9),
}


def build_reference_generator(name="big-lama", n_blocks=None):
    """The reference generator for a configuration name, in eval mode.

    ``n_blocks`` overrides the configuration's block count (checkpoints say how many they hold).
    """
    if name not in GENERATOR_CONFIGS:
        raise ValueError(f"unknown generator configuration {name!r}; known: {sorted(GENERATOR_CONFIGS)}")
    config = dict(GENERATOR_CONFIGS[name])
    if n_blocks is not None:
        config["n_blocks"] = n_blocks
    return FFCResNetGenerator(**config).eval()
