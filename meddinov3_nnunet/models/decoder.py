"""Multi-scale token aggregation decoder (MedDINOv3) and its single-scale ablation.

Patch tokens of several encoder blocks, each through the encoder's final norm, are concatenated along
channels at 1/16 resolution and upsampled by ``log2(patch_size)`` stages of
2x2 transposed conv -> channel LayerNorm -> GELU, halving the channels each time, then a 1x1 conv gives
the class logits at input resolution. For ViT-B with four taps: 3072 -> 1536 -> 768 -> 384 -> 192 -> C.

Initialisation as the official ``Primus_Multiscale`` (ricklisz/MedDINOv3, ``dinov3/models/primus.py``), which
applies dynamic_network_architectures' ``InitWeights_He(1e-2)`` to its whole up-projection: every (transposed)
convolution gets Kaiming-normal weights (negative slope 0.01, fan-in) and zero biases; the LayerNorms keep
PyTorch's ones / zeros.
"""
from __future__ import annotations

import math

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from timm.layers import LayerNorm2d
from torch import nn


class UpsampleStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            LayerNorm2d(out_channels),
            nn.GELU(),
        )


class TokenAggregationDecoder(nn.Module):
    """(B, in_channels, H/16, W/16) feature map -> (B, num_classes, H, W) logits."""

    # nnU-Net toggles `network.decoder.deep_supervision`; this decoder has a single output either way.
    deep_supervision = False

    def __init__(self, in_channels: int, num_classes: int, patch_size: int = 16):
        super().__init__()
        num_stages = int(math.log2(patch_size))
        if 2 ** num_stages != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of two")
        channels = [in_channels // 2 ** i for i in range(num_stages + 1)]
        if channels[-1] < 1:
            raise ValueError(f"{in_channels} input channels cannot be halved {num_stages} times")
        self.stages = nn.Sequential(*(UpsampleStage(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        self.head = nn.Conv2d(channels[-1], num_classes, kernel_size=1)
        self.apply(InitWeights_He(1e-2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(features))
