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
"""
from __future__ import annotations

import math

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
        y = act(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return y.permute(0, 3, 1, 2)


def nnunet_conv_blocks(in_channels: int, out_channels: int) -> StackedConvBlocks:
    """2 x (3x3 conv -> InstanceNorm -> LeakyReLU), the stage block of nnU-Net's 2D U-Net."""
    return StackedConvBlocks(2, nn.Conv2d, in_channels, out_channels, 3, 1, conv_bias=True,
                             norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
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
