"""MedDINOv3 on 3D patches: the pretrained 2D encoder runs on the slices of a (B, C, D, H, W) patch.

Axis D (axis 0 of nnU-Net's 3D patch) is the axis nnU-Net's ``2d`` configuration slices: its planner puts the
lowest-resolution axis first (``transpose_forward``), so a slice here is exactly a ``2d`` training image. The
network returns a 3D logit patch (B, K, D, H, W), so nnU-Net's own 3D sliding window predicts with it.

Depth context, two independent switches (both reuse the 2D encoder unchanged, loadable from every supported
checkpoint):

* ``context=k`` (2.5D): slice z's stem input is slices z-k .. z+k. For one input channel and k=1 the slices
  z-1, z, z+1 *are* the three RGB channels of the pretrained stem (no parameters). Otherwise a learned 1x1
  convolution maps the C x (2k+1) slice channels to 3, initialised so that stem channel j sees the channel mean
  of slice z+j-1 (the k=1 grey rule, averaged over channels). Slices beyond the patch edge repeat the edge slice.
* ``mix_slices=True``: after every tapped block a residual `SliceMixer` mixes each token with the same token of
  the neighbouring slices (depthwise convolution along D, then a linear layer that starts at zero), so the
  next blocks and the decoder see depth context; at step 0 the network equals the per-slice 2D network.

The decoder is the 2D one (multi-scale aggregation, or the projected one), run per slice, or the 3D ``hybrid``
(`HybridDecoder`): a 3D U-Net decoder whose skips come from a 3D conv pyramid on the patch (nnU-Net's stage blocks
with the plans' kernels and depth strides), so depth enters at the pixel level where boundaries are drawn.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_inference import use_packed_linears
from .decoder import ConvPath, build_decoder
from .encoder import DINOv3Encoder, build_encoder, check_image_size
from .network import TokenSegmentationNet, checked_tap_blocks
from .presets import EncoderArch, default_tap_blocks, preset


def slices_with_neighbours(volume: torch.Tensor, context: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B*D, C*(2k+1), H, W): for slice z and channel c, slices z-k .. z+k (edge repeated)."""
    b, c, d, h, w = volume.shape
    if context == 0:
        return volume.transpose(1, 2).reshape(b * d, c, h, w)
    padded = F.pad(volume, (0, 0, 0, 0, context, context), mode="replicate")
    stacked = torch.stack([padded[:, :, i:i + d] for i in range(2 * context + 1)], dim=2)  # (B, C, k, D, H, W)
    return stacked.permute(0, 3, 1, 2, 4, 5).reshape(b * d, c * (2 * context + 1), h, w)


class SliceInput(nn.Module):
    """A slice and its neighbours -> the encoder's 3-channel stem input (rule in the module docstring)."""

    def __init__(self, in_channels: int, context: int = 1, stem_channels: int = 3):
        super().__init__()
        if in_channels < 1 or context < 0:
            raise ValueError(f"need in_channels >= 1 and context >= 0, got {in_channels}, {context}")
        self.in_channels, self.context, self.stem_channels = in_channels, context, stem_channels
        k = 2 * context + 1
        self.projection = None
        if in_channels == 1 and k in (1, stem_channels):
            return  # grey slice copied (k=1) or slices z-1, z, z+1 as RGB (k=3): no parameters
        self.projection = nn.Conv2d(in_channels * k, stem_channels, kernel_size=1)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        with torch.no_grad():
            for j in range(stem_channels):
                offset = min(max(j - stem_channels // 2, -context), context) + context  # slice z+j-1
                for c in range(in_channels):
                    self.projection.weight[j, c * k + offset] = 1.0 / in_channels

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != 5:
            raise ValueError(f"expected a 3D patch batch (B, C, D, H, W), got shape {tuple(volume.shape)}; "
                             f"this network is for 3D configurations (3d_fullres, 3d_meddinov3)")
        if volume.shape[1] != self.in_channels:
            raise ValueError(f"network was built for {self.in_channels} input channel(s), got {volume.shape[1]}")
        images = slices_with_neighbours(volume, self.context)
        if self.projection is not None:
            return self.projection(images)
        return images.expand(-1, self.stem_channels, -1, -1)


class SliceMixer(nn.Module):
    """Residual mixing of tokens across neighbouring slices: x + Linear(GELU(depthwise conv_D(LN(x)))).

    Tokens (B*D, N, E), each token position mixed along D with kernel 3 (zero padding at the patch edges).
    The last linear layer starts at zero, so the mixer starts as the identity."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        bd, n, e = tokens.shape
        d = bd // batch
        y = self.norm(tokens).view(batch, d, n, e).permute(0, 2, 3, 1).reshape(batch * n, e, d)
        y = self.act(self.conv(y)).view(batch, n, e, d).permute(0, 3, 1, 2).reshape(bd, n, e)
        return tokens + self.proj(y)


class VolumetricMedDINOv3Net(TokenSegmentationNet):
    """Logits (B, K, D, H, W) for patches (B, C, D, H, W); H and W multiples of the encoder's patch size.

    ``autocast_dtypes``: as `MedDINOv3Net` (device type -> autocast dtype of each forward, None: fp32).
    `decoder_parameters`: decoder, slice mixers and slice input. ``decoder="hybrid"`` with ``conv_path`` (a 3D
    `ConvPath`, e.g. `ConvPath.from_plans`): the 3D `HybridDecoder`; ``vit_tokens=False``: its ablation without the
    ViT (zeros in the tokens' place; the encoder neither runs nor trains)."""

    def __init__(self, encoder: DINOv3Encoder, in_channels: int, num_classes: int, context: int = 1,
                 mix_slices: bool = False, tap_blocks: Sequence[int] | None = None, decoder: str = "aggregation",
                 conv_path: ConvPath | None = None, vit_tokens: bool = True):
        super().__init__()
        depth = encoder.arch.depth
        self.tap_blocks = checked_tap_blocks(tap_blocks if tap_blocks is not None else default_tap_blocks(depth), depth)
        self.slice_input = SliceInput(in_channels, context, encoder.arch.in_chans)
        self.encoder = encoder
        encoder.mask_token.requires_grad_(False)  # iBOT's (pretraining): unused here, DDP fails on unused parameters
        self.mixers = nn.ModuleDict({str(b): SliceMixer(encoder.arch.embed_dim) for b in sorted(set(self.tap_blocks))}
                                    if mix_slices else {})
        if decoder == "hybrid" and (conv_path is None or conv_path.ndim != 3):
            raise ValueError("the 3D hybrid decoder needs a 3D conv path (ConvPath.from_plans)")
        self.volumetric_decoder = decoder == "hybrid"
        self.decoder = build_decoder(decoder, len(self.tap_blocks), encoder.arch.embed_dim, num_classes,
                                     encoder.arch.patch_size, in_channels, conv_path=conv_path)
        self.vit_tokens = vit_tokens
        if not vit_tokens:  # slice input and mixers do not run either: frozen too (DDP fails on unused parameters)
            for module in (encoder, self.slice_input, self.mixers):
                module.requires_grad_(False)
        use_packed_linears(self)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x.shape[-2], x.shape[-1], self.encoder.patch_size)
        b, d, (h, w) = x.shape[0], x.shape[2], x.shape[-2:]
        encoder = self.encoder
        gh, gw = h // encoder.patch_size, w // encoder.patch_size
        if not self.vit_tokens:
            zeros = x.new_zeros(b, len(self.tap_blocks) * encoder.arch.embed_dim, d, gh, gw)
            return self.decoder(zeros, x)
        tokens, rope = encoder.prepare_tokens(self.slice_input(x))
        taken = {}
        for i, block in enumerate(encoder.blocks):
            tokens = block(tokens, rope=rope)
            if str(i) in self.mixers:
                tokens = self.mixers[str(i)](tokens, b)
            if i in self.tap_blocks:
                taken[i] = tokens
        prefix = 1 + encoder.n_storage_tokens
        features = [encoder.norm(taken[i])[:, prefix:].reshape(b * d, gh, gw, -1).permute(0, 3, 1, 2)
                    for i in self.tap_blocks]
        features = torch.cat(features, dim=1)
        if self.volumetric_decoder:  # (B, F, D, h, w) tokens + the 3D patch -> (B, K, D, H, W)
            return self.decoder(features.view(b, d, *features.shape[1:]).transpose(1, 2), x)
        logits = self.decoder(features)  # (B*D, K, H, W)
        return logits.view(b, d, *logits.shape[1:]).transpose(1, 2)


def build_volumetric_network(encoder: EncoderArch | str | DINOv3Encoder = "vit_b16", in_channels: int = 1,
                             num_classes: int = 2, context: int = 1, mix_slices: bool = False,
                             tap_blocks: Sequence[int] | None = None, decoder: str = "aggregation",
                             flavour: str = "meddinov3", drop_path_rate: float = 0.0,
                             conv_path: ConvPath | None = None, vit_tokens: bool = True) -> VolumetricMedDINOv3Net:
    if isinstance(encoder, str):
        encoder = preset(encoder, flavour)
    if isinstance(encoder, EncoderArch):
        encoder = build_encoder(encoder, drop_path_rate=drop_path_rate)
    return VolumetricMedDINOv3Net(encoder, in_channels, num_classes, context=context, mix_slices=mix_slices,
                                  tap_blocks=tap_blocks, decoder=decoder, conv_path=conv_path,
                                  vit_tokens=vit_tokens)
