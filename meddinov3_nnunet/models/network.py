"""The MedDINOv3 segmentation network: channel adapter -> DINOv3 encoder -> token aggregation decoder.

Input channels: one grey channel is copied to the encoder's 3-channel stem, exactly as the paper does
(no parameters). For C > 1 channels (e.g. several MRI sequences) a learned 1x1 convolution maps C -> 3,
initialised to the channel mean so that at the start every stem channel sees the mean image: the
pretrained patch embedding receives the kind of input it was trained on and the encoder weights stay in
their released layout (exportable and loadable unchanged).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .cpu_inference import use_packed_linears
from .decoder import ConvPath, build_decoder
from .encoder import DINOv3Encoder, build_encoder, check_image_size
from .presets import EncoderArch, default_tap_blocks, preset


class ChannelAdapter(nn.Module):
    def __init__(self, in_channels: int, stem_channels: int = 3):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"need at least one input channel, got {in_channels}")
        self.in_channels, self.stem_channels = in_channels, stem_channels
        self.projection = None
        if in_channels != 1:
            self.projection = nn.Conv2d(in_channels, stem_channels, kernel_size=1)
            nn.init.constant_(self.projection.weight, 1.0 / in_channels)
            nn.init.zeros_(self.projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"network was built for {self.in_channels} input channel(s), got {x.shape[1]}")
        if self.projection is None:
            return x.expand(-1, self.stem_channels, -1, -1)
        return self.projection(x)


def checked_tap_blocks(tap_blocks: Sequence[int], depth: int) -> tuple[int, ...]:
    """``tap_blocks`` as a tuple of ints; `ValueError` if one is not a block of a ``depth``-block encoder."""
    tap_blocks = tuple(int(b) for b in tap_blocks)
    if any(not 0 <= b < depth for b in tap_blocks):
        raise ValueError(f"tap blocks {tap_blocks} out of range for a {depth}-block encoder")
    return tap_blocks


class TokenSegmentationNet(nn.Module):
    """What the 2D and 3D networks share: the autocast forward around ``_forward`` and the two parameter groups.
    Subclasses set ``self.encoder`` and implement ``_forward``."""

    autocast_dtypes: dict[str, torch.dtype | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtypes = self.autocast_dtypes or {}
        if x.device.type not in dtypes:
            return self._forward(x)
        dtype = dtypes[x.device.type]
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self._forward(x)
        return [output.float() for output in logits] if isinstance(logits, list) else logits.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encoder_parameters(self):
        return self.encoder.parameters()

    def decoder_parameters(self):
        """Everything trained at the decoder learning rate: every parameter outside the encoder."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]


class MedDINOv3Net(TokenSegmentationNet):
    """Segmentation logits (B, num_classes, H, W) for images (B, in_channels, H, W), H and W multiples of 16.

    ``tap_blocks`` are the encoder blocks whose normed patch tokens feed the decoder (default: the last
    block of each quarter of the depth); ``multiscale=False`` uses the last block only (the ablation).

    ``autocast_dtypes`` (a plain attribute, not in the state dict) maps a device type to the dtype each forward
    autocasts to there (None: fp32, autocast off), whatever autocast context the caller has open; device types
    not in it follow the caller. The logits are then returned in float32. `decoder_parameters`: decoder and
    channel adapter. ``decoder``: a kind of `build_decoder` (the paper's ``aggregation``, ``projected``, ``hybrid``
    with its conv path beside the ViT). ``image_skip``: the decoder also sees the input image at full resolution
    (`ImageSkip`; all input channels, before the channel adapter). ``vit_tokens=False`` (ablation): zeros in place
    of the ViT's tokens, the encoder neither runs nor trains (its weights stay, so checkpoints keep their layout).
    ``token_injection`` (hybrid only): the conv path's 1/16 features are added to the patch embeddings through a
    projection that starts at zero (`TokenInjection`).
    """

    def __init__(self, encoder: DINOv3Encoder, in_channels: int, num_classes: int,
                 multiscale: bool = True, tap_blocks: Sequence[int] | None = None, image_skip: bool = False,
                 decoder: str = "aggregation", conv_path: ConvPath | None = None, vit_tokens: bool = True,
                 token_injection: bool = False):
        super().__init__()
        depth = encoder.arch.depth
        if tap_blocks is None:
            tap_blocks = default_tap_blocks(depth) if multiscale else (depth - 1,)
        self.tap_blocks = checked_tap_blocks(tap_blocks, depth)
        self.channel_adapter = ChannelAdapter(in_channels, encoder.arch.in_chans)
        self.encoder = encoder
        encoder.mask_token.requires_grad_(False)  # iBOT's (pretraining): unused here, DDP fails on unused parameters
        self.decoder = build_decoder(decoder, len(self.tap_blocks), encoder.arch.embed_dim, num_classes,
                                     encoder.arch.patch_size, in_channels, image_skip, conv_path, token_injection)
        if token_injection and not vit_tokens:
            raise ValueError("token injection feeds the ViT: it cannot go with vit_tokens=False")
        self.vit_tokens = vit_tokens
        if not vit_tokens:  # what feeds the encoder does not run either: frozen too (DDP fails on unused parameters)
            encoder.requires_grad_(False)
            self.channel_adapter.requires_grad_(False)
        use_packed_linears(self)

    def check_input(self, x: torch.Tensor) -> None:
        """Clear `ValueError`s for inputs the network cannot take: rank, empty batch, channels, image size."""
        channels = self.channel_adapter.in_channels
        if x.ndim != 4:
            hint = {3: "an unbatched image: add the batch axis (x[None])",
                    5: "a 3D batch (B, C, D, H, W): this network is 2D; feed slices or use a 3D trainer"}
            raise ValueError(f"expected an image batch of shape (B, {channels}, H, W), got shape {tuple(x.shape)}"
                             + (f" ({hint[x.ndim]})" if x.ndim in hint else ""))
        if x.shape[0] == 0:
            raise ValueError(f"empty batch: input of shape {tuple(x.shape)} has batch size 0")
        if x.shape[1] != channels:
            raise ValueError(f"network was built for {channels} input channel(s), got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        check_image_size(x.shape[-2], x.shape[-1], self.encoder.patch_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        grid = (x.shape[0], x.shape[-2] // self.encoder.patch_size, x.shape[-1] // self.encoder.patch_size, -1)
        if not self.vit_tokens:
            width = len(self.tap_blocks) * self.encoder.arch.embed_dim
            return self.decoder(x.new_zeros(grid[:3] + (width,)).permute(0, 3, 1, 2), x)
        injection = getattr(self.decoder, "injection", None)
        skips = self.decoder.conv_features(x) if injection is not None else None
        tokens = self.encoder.get_intermediate_layers(self.channel_adapter(x), n=self.tap_blocks, norm=True,
                                                      patch_offset=injection(skips[-1]) if skips else None)
        # concatenated channels-last (B, h, w, taps * D), handed to the decoder as an NCHW view without a copy
        features = torch.cat([t.reshape(grid) for t in tokens], dim=-1)
        if skips is not None:
            return self.decoder(features.permute(0, 3, 1, 2), x, skips=skips)
        return self.decoder(features.permute(0, 3, 1, 2), x)  # the decoder uses the image only with a conv path


class ProjectedMedDINOv3Net(MedDINOv3Net):
    """The 2D network with the projected decoder instead of the paper's."""

    def __init__(self, encoder: DINOv3Encoder, in_channels: int, num_classes: int,
                 tap_blocks: Sequence[int] | None = None, image_skip: bool = False):
        super().__init__(encoder, in_channels, num_classes, multiscale=True, tap_blocks=tap_blocks,
                         image_skip=image_skip, decoder="projected")


def build_network(encoder: EncoderArch | str | DINOv3Encoder = "vit_b16", in_channels: int = 1, num_classes: int = 2,
                  multiscale: bool = True, tap_blocks: Sequence[int] | None = None, flavour: str = "meddinov3",
                  drop_path_rate: float = 0.0, drop_path_mode: str = "batch_subset",
                  image_skip: bool = False, decoder: str = "aggregation", conv_path: ConvPath | None = None,
                  vit_tokens: bool = True, token_injection: bool = False) -> MedDINOv3Net:
    """Network with a random encoder from a preset name / `EncoderArch`, or around a given encoder
    (whose drop path is then kept)."""
    if isinstance(encoder, str):
        encoder = preset(encoder, flavour)
    if isinstance(encoder, EncoderArch):
        encoder = build_encoder(encoder, drop_path_rate=drop_path_rate, drop_path_mode=drop_path_mode)
    return MedDINOv3Net(encoder, in_channels, num_classes, multiscale=multiscale, tap_blocks=tap_blocks,
                        image_skip=image_skip, decoder=decoder, conv_path=conv_path, vit_tokens=vit_tokens,
                        token_injection=token_injection)
