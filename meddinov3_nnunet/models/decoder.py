"""Multi-scale token aggregation decoder (MedDINOv3) and its single-scale ablation.

Patch tokens of several encoder blocks, each through the encoder's final norm, are concatenated along
channels at 1/16 resolution and upsampled by ``log2(patch_size)`` stages of
2x2 transposed conv -> channel LayerNorm -> GELU, halving the channels each time, then a 1x1 conv gives
the class logits at input resolution. For ViT-B with four taps: 3072 -> 1536 -> 768 -> 384 -> 192 -> C.

``image_skip_channels > 0`` (beyond the paper) adds an `ImageSkip`: nnU-Net's own conv blocks on the input image at
full resolution, concatenated with the last stage's output and fused by two more conv blocks before the head, as
UNETR's first skip does. Tokens of a ViT are 16 (or 8, 4) pixels wide; the skip gives the decoder the pixel-level
edges that tokens blur, without touching the encoder (its weights load unchanged).

Initialisation as the official ``Primus_Multiscale`` (ricklisz/MedDINOv3, ``dinov3/models/primus.py``), which
applies dynamic_network_architectures' ``InitWeights_He(1e-2)`` to its whole up-projection: every (transposed)
convolution gets Kaiming-normal weights (negative slope 0.01, fan-in) and zero biases; the LayerNorms keep
PyTorch's ones / zeros.

A 2x2 stride-2 transposed convolution is one matrix product per pixel followed by a pixel shuffle, so the
stages compute it that way on channels-last tensors: same parameters and state dict as the convolution
modules, but a GEMM instead of PyTorch's transposed-convolution kernels (several times slower on small maps)
and the channel LayerNorm on contiguous channels. Stages hand each other NCHW-shaped views of channels-last
memory, so no layout copies happen between them.

Every decoder design lives here, built by `build_decoder`: ``aggregation`` (the paper's), ``projected`` (FlexiCT's
Primus v2: a 1x1 projection of the taps first) and ``hybrid`` (`HybridDecoder`: a U-Net decoder whose skips come
from a convolutional pyramid on the image beside the ViT, 2D or 3D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn import functional as F

from .cpu_inference import packed_linear


class UpsampleStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            LayerNorm2d(out_channels),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, 2h, 2w), returned as a view of channels-last memory."""
        conv, norm, act = self
        b, _, h, w = x.shape
        c_out = conv.out_channels
        # weight (C_in, C_out, 2, 2) -> (C_in, C_out * 4) is a view; output columns are ordered (c_out, ky, kx)
        bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
        y = packed_linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1).t(), bias, self,
                          sources=(conv.weight, conv.bias))
        y = y.reshape(b, h, w, c_out, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c_out)
        if y.dtype == torch.bfloat16 and torch.is_autocast_enabled(y.device.type):
            # CUDA autocast would run the norm (and so the GELU) in fp32 and keep fp32 maps at up to full resolution
            # for backward. The kernels accumulate in fp32 anyway and the next layer reads bf16, so under bf16 (fp32's
            # range) both stay bf16, as CPU autocast already runs them; CUDA's kernel wants bf16 affine parameters.
            weight, bias = norm.weight, norm.bias
            if y.device.type != "cpu":
                weight, bias = weight.to(y.dtype), bias.to(y.dtype)
            with torch.autocast(y.device.type, enabled=False):
                y = act(F.layer_norm(y, norm.normalized_shape, weight, bias, norm.eps))
        else:
            y = act(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return y.permute(0, 3, 1, 2)


class Conv3dCPUBf16Safe(nn.Conv3d):
    """`nn.Conv3d` (same parameters and state dict) that runs in fp32 where torch's CPU bf16 kernel gets the weight
    gradient wrong: input depth 2 with a kernel deeper than 1 (torch 2.14.1, oneDNN; measured: values up to 1e35 or NaN
    that change from call to call, e.g. a 3D patch of depth 16 pooled three times). Elsewhere, and on GPUs, unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[2] == 2 and self.kernel_size[0] > 1 and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


CONV_OPS = {2: (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d),
            3: (Conv3dCPUBf16Safe, nn.ConvTranspose3d, nn.InstanceNorm3d)}


def nnunet_conv_blocks(in_channels: int, out_channels: int, ndim: int = 2, kernel_size=3,
                       stride=1) -> StackedConvBlocks:
    """2 x (conv -> InstanceNorm -> LeakyReLU), the stage block of nnU-Net's U-Nets (the first conv strided)."""
    conv, _, norm = CONV_OPS[ndim]
    return StackedConvBlocks(2, conv, in_channels, out_channels, kernel_size, stride, conv_bias=True,
                             norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                             nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


class ImageSkip(nn.Module):
    """Full-resolution skip from the input image: conv blocks on the image (``image_channels`` -> ``channels``),
    concatenated with the decoder's last upsampled map (``decoder_channels``), fused by conv blocks to ``channels``."""

    def __init__(self, image_channels: int, decoder_channels: int, channels: int = 32):
        super().__init__()
        self.image_convs = nnunet_conv_blocks(image_channels, channels)
        self.fuse = nnunet_conv_blocks(decoder_channels + channels, channels)

    def forward(self, decoded: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] != decoded.shape[-2:]:
            raise ValueError(f"image skip: image of size {tuple(image.shape[-2:])} for a decoded map of size "
                             f"{tuple(decoded.shape[-2:])}")
        return self.fuse(torch.cat([decoded, self.image_convs(image).to(decoded.dtype)], dim=1))


class TokenAggregationDecoder(nn.Module):
    """(B, in_channels, H/16, W/16) feature map [+ (B, image_channels, H, W) image] -> (B, num_classes, H, W) logits.
    The image is required with an image skip and ignored without one."""

    # nnU-Net toggles `network.decoder.deep_supervision`; this decoder has a single output either way.
    deep_supervision = False

    def __init__(self, in_channels: int, num_classes: int, patch_size: int = 16, image_skip_channels: int = 0,
                 skip_width: int = 32):
        super().__init__()
        num_stages = int(math.log2(patch_size))
        if 2 ** num_stages != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of two")
        channels = [in_channels // 2 ** i for i in range(num_stages + 1)]
        if channels[-1] < 1:
            raise ValueError(f"{in_channels} input channels cannot be halved {num_stages} times")
        self.stages = nn.Sequential(*(UpsampleStage(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        self.image_skip = ImageSkip(image_skip_channels, channels[-1], skip_width) if image_skip_channels else None
        self.head = nn.Conv2d(skip_width if image_skip_channels else channels[-1], num_classes, kernel_size=1)
        self.apply(InitWeights_He(1e-2))

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stages(features)
        if self.image_skip is not None:
            if image is None:
                raise ValueError("this decoder has an image skip: pass the input image")
            x = self.image_skip(x, image)
        x = x.permute(0, 2, 3, 1)  # channels-last (contiguous without the skip)
        logits = packed_linear(x, self.head.weight.flatten(1), self.head.bias, self,
                               sources=(self.head.weight, self.head.bias))  # the 1x1 head as a matrix product
        return logits.permute(0, 3, 1, 2).contiguous()


class ProjectedDecoder(nn.Module):
    """Primus-v2-style decoder (FlexiCT): the concatenated taps go through a 1x1 convolution back to the
    embedding width and a channel LayerNorm, then ``log2(patch)`` 2x stages halve the channels from there
    (ViT-S: 1536 -> 384 -> 192 -> 96 -> 48 -> 24 -> classes), about 20x fewer decoder parameters."""

    deep_supervision = False

    def __init__(self, in_channels: int, embed_dim: int, num_classes: int, patch_size: int = 16,
                 image_skip_channels: int = 0):
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(in_channels, embed_dim, kernel_size=1, bias=False),
                                        LayerNorm2d(embed_dim))
        self.upsample = TokenAggregationDecoder(embed_dim, num_classes, patch_size, image_skip_channels)

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return self.upsample(self.projection(features), image)


@dataclass(frozen=True)
class ConvPath:
    """The convolutional pyramid beside the ViT: level 0 at the input resolution, level l at 1/2^l in-plane,
    levels 0 .. log2(patch) - 1 (the ViT's tokens are the level below the last).

    ``strides[l]``: stride into level l (level 0: all ones), ``kernels[l]``: its conv kernel, ``widths[l]``: its
    channels. In 3D the depth strides may be 1 (anisotropic plans); in-plane strides are always 2, so level l
    meets the per-slice decoder's in-plane resolution."""

    widths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def ndim(self) -> int:
        return len(self.kernels[0])

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[axis] for s in self.strides) for axis in range(self.ndim))

    @classmethod
    def default(cls, patch_size: int, ndim: int = 2, max_width: int = 320) -> "ConvPath":
        """nnU-Net's default pyramid: widths 32, 64, 128, 256 (capped at ``max_width``), 3x3(x3) kernels,
        stride 2 on every axis from level 1 on."""
        levels = _levels(patch_size)
        return cls(tuple(min(32 * 2 ** level, max_width) for level in range(levels)),
                   tuple((3,) * ndim for _ in range(levels)),
                   tuple((1 if level == 0 else 2,) * ndim for level in range(levels)))

    @classmethod
    def from_plans(cls, patch_size: int, conv_kernel_sizes, pool_strides, widths=None) -> "ConvPath":
        """3D pyramid from an nnU-Net plan's ``conv_kernel_sizes`` / ``strides`` (axis order D, H, W): the plans'
        kernels and depth strides, in-plane strides 2 (where a plan pools an in-plane axis later, the pyramid
        still halves it at each level so that it meets the ViT decoder)."""
        levels = _levels(patch_size)
        if len(conv_kernel_sizes) < levels or len(pool_strides) < levels:
            raise ValueError(f"the plans have {len(conv_kernel_sizes)} stages; the conv path of a patch-"
                             f"{patch_size} ViT needs {levels}")
        kernels = tuple(tuple(int(k) for k in conv_kernel_sizes[level]) for level in range(levels))
        strides = tuple((1,) * len(kernels[0]) if level == 0 else
                        (int(pool_strides[level][0]),) + (2,) * (len(kernels[0]) - 1) for level in range(levels))
        widths = tuple(int(w) for w in widths[:levels]) if widths is not None else cls.default(patch_size).widths
        return cls(widths, kernels, strides)

    def check_patch(self, spatial_shape) -> None:
        """`ValueError` unless every axis of ``spatial_shape`` is divisible by the pyramid's total stride."""
        bad = [(size, stride) for size, stride in zip(spatial_shape, self.total_stride) if size % stride]
        if bad:
            raise ValueError(f"patch size {list(spatial_shape)} is not divisible by the conv path's total stride "
                             f"{list(self.total_stride)}; choose a patch size that is (nnU-Net's own plans are)")


def _levels(patch_size: int) -> int:
    levels = int(math.log2(patch_size))
    if 2 ** levels != patch_size or levels < 1:
        raise ValueError(f"patch size {patch_size} is not a power of two >= 2")
    return levels


class ConvPyramid(nn.Module):
    """nnU-Net encoder stages on the input image: one feature map per level of a `ConvPath`."""

    def __init__(self, in_channels: int, path: ConvPath):
        super().__init__()
        channels = (in_channels,) + path.widths
        self.stages = nn.ModuleList(nnunet_conv_blocks(channels[level], channels[level + 1], path.ndim,
                                                       path.kernels[level], path.strides[level])
                                    for level in range(len(path.widths)))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], image
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class HybridDecoder(nn.Module):
    """U-Net decoder with a ViT at the bottom (UNETR's skips, PrimusV3's stem resolutions), 2D or 3D.

    The concatenated normed taps (B, F, [D,] H/p, W/p) enter below the pyramid's last level; each step up is a
    transposed convolution (kernel = stride, as nnU-Net's decoder) to the level's width, concatenated with the
    `ConvPyramid`'s map of that level and fused by an nnU-Net stage block; a 1x1 conv gives the logits at the input
    resolution. In 3D the tokens come one per slice: they are averaged over the depth stride of the pyramid's last
    level first (no parameters), so that they meet it. Generalises `ImageSkip` (level 0 alone). A patch not divisible
    by the pyramid's total stride is refused with a `ValueError` naming both.

    Deep supervision (nnU-Net's, off unless asked for): `add_supervision_heads` gives every level below full
    resolution a 1x1 head; while ``deep_supervision`` is True (nnU-Net's trainer toggles it) the forward returns the
    logits of every level, full resolution first, at the resolutions `supervision_scales` names."""

    deep_supervision = False

    def __init__(self, token_channels: int, image_channels: int, num_classes: int, path: ConvPath,
                 inject_dim: int = 0):
        super().__init__()
        self.path = path
        conv, transposed, _ = CONV_OPS[path.ndim]
        self.pyramid = ConvPyramid(image_channels, path)
        levels = len(path.widths)
        inputs = path.widths[1:] + (token_channels,)
        into_token_grid = (1,) * (path.ndim - 2) + (2, 2)  # tokens are pooled in depth first (3D)
        ups = [path.strides[level + 1] if level + 1 < levels else into_token_grid for level in range(levels)]
        self.up = nn.ModuleList(transposed(inputs[level], path.widths[level], ups[level], ups[level], bias=False)
                                for level in range(levels))
        self.fuse = nn.ModuleList(nnunet_conv_blocks(2 * path.widths[level], path.widths[level], path.ndim,
                                                     path.kernels[level]) for level in range(levels))
        self.head = conv(path.widths[0], num_classes, kernel_size=1)
        self.token_depth_pool = path.total_stride[0] if path.ndim == 3 else 1
        self.apply(InitWeights_He(1e-2))
        self.injection = TokenInjection(path, inject_dim) if inject_dim else None
        self.supervision_heads = None

    def add_supervision_heads(self, num_classes: int) -> None:
        """1x1 logit heads on levels 1 .. L-1 (nnU-Net's initialisation); part of the state dict from then on, so a
        trainer adds them whenever it builds the network (training and prediction alike)."""
        conv = CONV_OPS[self.path.ndim][0]
        self.supervision_heads = nn.ModuleList(conv(width, num_classes, kernel_size=1)
                                               for width in self.path.widths[1:])
        self.supervision_heads.apply(InitWeights_He(1e-2))

    def supervision_scales(self) -> list[list[float]]:
        """Per output of the deep-supervised forward, its size relative to the patch on each axis (nnU-Net's
        ``deep_supervision_scales``: the targets are downsampled to these)."""
        scales, current = [], [1.0] * self.path.ndim
        for strides in self.path.strides:
            current = [size / stride for size, stride in zip(current, strides)]
            scales.append(current)
        return scales

    def conv_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid's maps of ``image`` (a patch not divisible by its total stride: `ValueError`)."""
        self.path.check_patch(image.shape[2:])
        return self.pyramid(image)

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None,
                skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``skips``: `conv_features` of ``image`` when the caller has them already (token injection)."""
        if image is None:
            raise ValueError("the hybrid decoder needs the input image for its conv path")
        if skips is None:
            skips = self.conv_features(image)
        x = features
        if self.token_depth_pool > 1:
            x = F.avg_pool3d(x, (self.token_depth_pool, 1, 1))
        supervised = self.deep_supervision and self.supervision_heads is not None
        outputs = []
        for level in reversed(range(len(self.up))):
            x = self.up[level](x)
            x = self.fuse[level](torch.cat([x, skips[level].to(x.dtype)], dim=1))
            if supervised and level > 0:
                outputs.insert(0, self.supervision_heads[level - 1](x))
        logits = self.head(x)
        return [logits] + outputs if supervised else logits


class TokenInjection(nn.Module):
    """PrimusV3-style injection of the conv path into the ViT: one more nnU-Net stage block (stride 2) on the 2D
    pyramid's last level brings it to the token grid, a 1x1 convolution that starts at zero maps it to the embedding
    width; the result (B, h, w, D) is added to the patch embeddings, so that training starts from the plain
    hybrid."""

    def __init__(self, path: ConvPath, embed_dim: int):
        super().__init__()
        if path.ndim != 2:
            raise ValueError("token injection is built for the 2D hybrid only")
        width, token_width = path.widths[-1], min(2 * path.widths[-1], 320)
        self.down = nnunet_conv_blocks(width, token_width, 2, path.kernels[-1], (2, 2))
        self.down.apply(InitWeights_He(1e-2))
        self.project = nn.Conv2d(token_width, embed_dim, kernel_size=1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.project(self.down(deepest)).permute(0, 2, 3, 1)


DECODERS = ("aggregation", "projected", "hybrid")


def build_decoder(kind: str, num_taps: int, embed_dim: int, num_classes: int, patch_size: int,
                  image_channels: int = 0, image_skip: bool = False, conv_path: ConvPath | None = None,
                  token_injection: bool = False) -> nn.Module:
    """A decoder for ``num_taps`` concatenated taps of width ``embed_dim``. ``image_skip`` (aggregation and projected):
    the full-resolution `ImageSkip` on the ``image_channels`` input channels; ``hybrid``: `HybridDecoder` with
    ``conv_path`` (default: `ConvPath.default` in 2D), and with ``token_injection`` its `TokenInjection` (2D)."""
    if token_injection and kind != "hybrid":
        raise ValueError(f"token injection needs the hybrid decoder's conv path, not the {kind!r} decoder")
    skip_channels = image_channels if image_skip else 0
    if kind == "aggregation":
        return TokenAggregationDecoder(num_taps * embed_dim, num_classes, patch_size, skip_channels)
    if kind == "projected":
        return ProjectedDecoder(num_taps * embed_dim, embed_dim, num_classes, patch_size, skip_channels)
    if kind == "hybrid":
        if image_skip:
            raise ValueError("the hybrid decoder's conv path already starts at full resolution: no image skip")
        return HybridDecoder(num_taps * embed_dim, image_channels, num_classes,
                             conv_path or ConvPath.default(patch_size), embed_dim if token_injection else 0)
    raise ValueError(f"unknown decoder {kind!r}; choose one of {DECODERS}")
