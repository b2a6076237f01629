"""DINOv3 ViT/16 encoder on top of timm's EVA implementation.

timm's `Eva` (with ``rope_type='dinov3'``) already implements the DINOv3 block, axial RoPE and register
tokens. This subclass adds what MedDINOv3 needs beyond it: the trained ``mask_token`` (iBOT masking in
pretraining), bfloat16 RoPE periods (MedDINOv3 flavour), a clear error for image sizes the patch grid
cannot tile, the official DINOv3 entry points ``get_intermediate_layers`` / ``forward_features``, and
DINOv3's drop path (see `BatchSubsetDropPathBlock`).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.layers import DropPath, LayerNorm, calculate_drop_path_rates
from timm.models.eva import Eva, EvaBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .presets import EncoderArch, preset


def check_image_size(height: int, width: int, patch_size: int = 16) -> None:
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"input of size {height}x{width} cannot be split into {patch_size}x{patch_size} patches: "
            f"height and width must be positive multiples of {patch_size} (e.g. "
            f"{max(patch_size, round(height / patch_size) * patch_size)}x"
            f"{max(patch_size, round(width / patch_size) * patch_size)})")


DROP_PATH_MODES = ("batch_subset", "timm")


class BatchSubsetDropPathBlock(EvaBlock):
    """timm's EVA block with the drop path of DINOv3's ``SelfAttentionBlock`` (``dinov3/layers/block.py``).

    In training with rate ``r > 0``, each residual branch (attention, then MLP, each with its own random
    draw) is computed for ``k = max(int(B * (1 - r)), 1)`` samples picked by ``torch.randperm`` and added to
    those samples scaled by ``B / k``; the other samples skip the branch. The same rate is used in every
    block. In eval mode (or with ``r = 0``) the forward is timm's. Parameters and state dict are timm's.
    """

    drop_path_rate: float = 0.0

    def subset_size(self, batch: int) -> int:
        return max(int(batch * (1 - self.drop_path_rate)), 1)

    def _add_branch(self, x, branch, gamma):
        batch = x.shape[0]
        keep = self.subset_size(batch)
        indices = torch.randperm(batch, device=x.device)[:keep]
        residual = branch(x[indices], indices)
        if gamma is not None:
            residual = gamma * residual
        return torch.index_add(x, 0, indices, residual.to(x.dtype), alpha=batch / keep)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and self.drop_path_rate > 0.0):
            return super().forward(x, rope=rope, attn_mask=attn_mask)

        def pick(t, indices):  # per-sample tensors (batch first) follow the subset; shared ones do not
            return t[indices] if t is not None and t.ndim == 4 and t.shape[0] == x.shape[0] else t

        x = self._add_branch(x, lambda sub, idx: self.attn(self.norm1(sub), rope=pick(rope, idx),
                                                           attn_mask=pick(attn_mask, idx)), self.gamma_1)
        return self._add_branch(x, lambda sub, idx: self.mlp(self.norm2(sub)), self.gamma_2)


def set_drop_path(encoder: Eva, rate: float, mode: str = "batch_subset") -> None:
    """Sets the encoder's drop path in place (no parameter changes).

    ``"batch_subset"``: DINOv3's form, the same ``rate`` in every block (`BatchSubsetDropPathBlock`).
    ``"timm"``: timm's per-sample drop path with rates rising linearly over depth from 0 to ``rate``.
    """
    if mode not in DROP_PATH_MODES:
        raise ValueError(f"drop path mode {mode!r} is not one of {DROP_PATH_MODES}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate {rate} must be in [0, 1)")
    rates = calculate_drop_path_rates(rate, len(encoder.blocks))
    for block, block_rate in zip(encoder.blocks, rates):
        if not isinstance(block, EvaBlock):
            raise TypeError(f"set_drop_path expects timm EvaBlock blocks, got {type(block).__name__}")
        # the subclass only adds a forward, so switching the class keeps parameters and state dict
        block.__class__ = BatchSubsetDropPathBlock if mode == "batch_subset" else EvaBlock
        block.drop_path_rate = rate if mode == "batch_subset" else 0.0
        timm_rate = block_rate if mode == "timm" else 0.0
        block.drop_path1 = DropPath(timm_rate) if timm_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(timm_rate) if timm_rate > 0 else nn.Identity()
    encoder.drop_path_rate, encoder.drop_path_mode = rate, mode


class DINOv3Encoder(Eva):
    """DINOv3 ViT with registers, LayerScale and axial RoPE; no learned position embedding.

    Token order inside the blocks: ``[CLS, registers x R, patches x (H/16 * W/16)]``.
    Drop path: ``drop_path_mode`` ``"batch_subset"`` (DINOv3's, default) or ``"timm"``; see `set_drop_path`.
    """

    def __init__(self, arch: EncoderArch, drop_path_rate: float = 0.0, drop_path_mode: str = "batch_subset"):
        super().__init__(
            patch_size=arch.patch_size,
            in_chans=arch.in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            qkv_bias=arch.qkv_bias,
            mlp_ratio=arch.mlp_ratio,
            drop_path_rate=0.0,  # set below by set_drop_path
            norm_layer=partial(LayerNorm, eps=arch.norm_eps),
            init_values=arch.layerscale_init,
            num_reg_tokens=arch.num_register_tokens,
            use_abs_pos_emb=False,
            use_rot_pos_emb=True,
            rope_type="dinov3",
            rope_temperature=arch.rope_base,
            rope_rotate_half=True,
            use_fc_norm=False,
            dynamic_img_size=True,
        )
        self.arch = arch
        self.patch_size = arch.patch_size
        self.n_storage_tokens = arch.num_register_tokens  # official DINOv3 attribute name
        # DINOv3 initialises the mask token to zero; pretrained checkpoints carry the trained one.
        self.mask_token = nn.Parameter(torch.zeros(1, arch.embed_dim))
        if arch.rope_dtype == "bf16":
            self.rope.periods = self.rope.periods.to(torch.bfloat16)
        set_drop_path(self, drop_path_rate, drop_path_mode)

    # -- token pipeline -------------------------------------------------------------------------
    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       patch_offset: torch.Tensor | None = None):
        """Image (B, 3, H, W) -> tokens (B, 1 + R + N, D) and the RoPE embedding for the grid.

        ``masks`` (B, N) bool replaces those patch tokens by ``mask_token`` before the prefix
        tokens are added, as DINOv3's iBOT branch does. ``patch_offset`` (B, h, w, D) is added to the patch
        embeddings (a hybrid network's conv features injected into the tokens).
        """
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(x.shape)}")
        check_image_size(x.shape[-2], x.shape[-1], self.patch_size)
        tokens = self.patch_embed(x)  # (B, h, w, D)
        if patch_offset is not None:
            if patch_offset.shape != tokens.shape:
                raise ValueError(f"patch_offset must have the patch grid's shape {tuple(tokens.shape)}, "
                                 f"got {tuple(patch_offset.shape)}")
            tokens = tokens + patch_offset.to(tokens.dtype)
        if masks is not None:
            b, h, w, d = tokens.shape
            if masks.shape != (b, h * w):
                raise ValueError(f"masks must have shape (B, N) = ({b}, {h * w}), got {tuple(masks.shape)}")
            tokens = torch.where(masks.view(b, h, w, 1), self.mask_token.to(tokens.dtype).view(1, 1, 1, d), tokens)
        tokens, rope = self._pos_embed(tokens)
        return self.norm_pre(tokens), rope

    def _run_blocks(self, x: torch.Tensor, rope, take: Sequence[int] = ()):
        """Runs every block; returns the final tokens and the pre-norm outputs of blocks in ``take``
        (in block order)."""
        take = set(take)
        taken = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope=rope, use_reentrant=False)
            else:
                x = block(x, rope=rope)
            if i in take:
                taken.append(x)
        return x, taken

    def _resolve_block_indices(self, n: int | Sequence[int]) -> list[int]:
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} must be between 1 and the depth {depth}")
            return list(range(depth - n, depth))
        indices = [int(i) for i in n]
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {depth}-block encoder")
        return indices

    # -- official DINOv3 entry points ------------------------------------------------------------
    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
        patch_offset: torch.Tensor | None = None,
    ):
        """Same semantics as DINOv3's ``DinoVisionTransformer.get_intermediate_layers``.

        ``n`` is the number of last blocks (int) or explicit 0-based block indices. Returns a tuple of
        patch tokens (B, N, D), or (B, D, h, w) with ``reshape``; with ``return_class_token`` /
        ``return_extra_tokens`` each entry is a tuple that adds the CLS (B, D) / register (B, R, D) tokens.
        ``patch_offset``: see `prepare_tokens`.
        """
        indices = self._resolve_block_indices(n)
        tokens, rope = self.prepare_tokens(x, patch_offset=patch_offset)
        _, outputs = self._run_blocks(tokens, rope, take=indices)
        # _run_blocks returns in block order; the caller's order is kept
        by_index = dict(zip(sorted(set(indices)), outputs))
        outputs = [by_index[i] for i in indices]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        prefix = 1 + self.n_storage_tokens
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:prefix] for out in outputs]
        patches = [out[:, prefix:] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            h, w = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """Same keys as DINOv3's ``forward_features``: normed CLS / register / patch tokens and more."""
        tokens, rope = self.prepare_tokens(x, masks)
        tokens, _ = self._run_blocks(tokens, rope)
        normed = self.norm(tokens)
        prefix = 1 + self.n_storage_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_storage_tokens": normed[:, 1:prefix],
            "x_norm_patchtokens": normed[:, prefix:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normed CLS token, as the official backbone returns at inference."""
        return self.forward_features(x)["x_norm_clstoken"]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "reg_token", "mask_token"}


def build_encoder(arch: EncoderArch | str = "vit_b16", drop_path_rate: float = 0.0,
                  drop_path_mode: str = "batch_subset", **overrides) -> DINOv3Encoder:
    """Randomly initialised encoder from an `EncoderArch` or a preset name (MedDINOv3 flavour)."""
    if isinstance(arch, str):
        arch = preset(arch, **overrides)
    elif overrides:
        arch = arch.replace(**overrides)
    return DINOv3Encoder(arch, drop_path_rate=drop_path_rate, drop_path_mode=drop_path_mode)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
