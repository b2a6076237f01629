"""DINOv3's training losses: DINO (CLS) and iBOT (masked patches) with Sinkhorn-Knopp centring, KoLeo, Gram.

Reference: facebookresearch/dinov3, ``dinov3/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss,gram_loss}.py``.
Tests compare every function here with outputs of those modules on fixed tensors (within 1e-5 relative).

What comes from lightly and what is written here:

* KoLeo is lightly's `KoLeoLoss` unchanged (same nearest-neighbour rule and eps as DINOv3's).
* DINO and iBOT are written here. lightly's `DINOLoss` / `IBOTPatchLoss` take raw teacher logits and centre
  them with a running mean inside the loss (DINO/DINOv2's softmax centring, with a centre buffer updated on
  every call); DINOv3 instead turns teacher logits into probabilities with Sinkhorn-Knopp (no state) and
  weights the global and local DINO terms separately (its stage 2/3 down-weight the local term). Feeding
  Sinkhorn-Knopp probabilities through lightly's classes would need log-probabilities as fake logits and a
  centre that must stay zero, so the two cross-entropies (a few lines each) follow DINOv3 directly.
* Sinkhorn-Knopp and the Gram loss do not exist in lightly.
* `masked_pixel_loss` (the optional ``mim`` objective) is SimMIM's / MAE's pixel regression on masked patches,
  not part of DINOv3.

All functions reduce across distributed ranks exactly where DINOv3 does (Sinkhorn-Knopp sums), so a run on
N ranks computes the same numbers as one process holding the whole batch.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import KoLeoLoss
from torch import nn

__all__ = ["sinkhorn_knopp", "dino_cross_entropy", "ibot_masked_cross_entropy", "KoLeoLoss", "koleo_loss",
           "GramLoss", "masked_pixel_loss", "patch_pixels"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_samples: int | torch.Tensor | None = None) -> torch.Tensor:
    """Teacher probabilities by Sinkhorn-Knopp: rows (samples) sum to 1, prototypes get equal mass.

    ``teacher_logits`` (B, K) on this rank. ``n_samples`` is the number of rows on *all* ranks; by default
    B x world size (DINO, equal batches); iBOT passes its local count of masked tokens, which is summed
    across ranks here (ranks mask different numbers of patches). Returns (B, K) float32.

    Same algorithm as DINOv3's ``DINOLoss.sinkhorn_knopp_teacher`` / ``SinkhornKnoppTeacher`` (normalise the
    whole matrix, then ``n_iterations`` x [each prototype's mass to 1/K, each sample's to 1/B]), carried out on
    logarithms: DINOv3 exponentiates ``logits / temp`` directly, which overflows float32 once a logit exceeds
    ~3.5 at temperature 0.04 (inf -> NaN) and loses whole prototypes to underflow. The log-domain sums give the
    same numbers where DINOv3's are finite (tests: within 1e-5 of its outputs).
    """
    log_q = teacher_logits.float() / teacher_temp  # (B, K)
    if n_samples is None:
        log_total = math.log(log_q.shape[0] * (dist.get_world_size() if _distributed() else 1))
    else:  # stays on the device: the count is summed across ranks without a host sync
        count = torch.as_tensor(n_samples, dtype=torch.float64, device=log_q.device).clone()
        if _distributed():
            dist.all_reduce(count)
        log_total = count.log().float()
    prototypes = log_q.shape[1]
    log_q = log_q - _global_logsumexp(log_q, dim=None)
    for _ in range(n_iterations):
        log_q = log_q - _global_logsumexp(log_q, dim=0) - math.log(prototypes)  # prototype mass, over all ranks
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_total  # sample mass (local rows)
    return torch.exp(log_q + log_total)


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """logsumexp over ``dim`` (None: everything) and over all ranks' rows."""
    if dim is None:
        peak = x.max().reshape(1, 1)
    else:
        peak = x.max(dim=dim, keepdim=True).values
    peak = peak.detach().clone()
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    summed = torch.exp(x - peak)
    summed = summed.sum().reshape(1, 1) if dim is None else summed.sum(dim=dim, keepdim=True)
    if _distributed():
        dist.all_reduce(summed)
    return peak + torch.log(summed)


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float = 0.1,
                       ignore_diagonal: bool = False) -> torch.Tensor:
    """DINO loss between student CLS logits (S crops, B, K) and teacher probabilities (T crops, B, K).

    Mean over samples and (student crop, teacher crop) pairs of ``-sum_k p_t log softmax(s / temp)``; with
    ``ignore_diagonal`` the pairs of a crop with itself (s == t) are left out, as for the two global crops.
    Same as DINOv3's ``DINOLoss.forward``.
    """
    student_crops, batch, _ = student_logits.shape
    teacher_crops = teacher_probs.shape[0]
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    teacher_probs = teacher_probs.float()
    if not ignore_diagonal:
        loss = -torch.einsum("sbk,tbk->", log_probs, teacher_probs)
        return loss / (batch * student_crops * teacher_crops)
    pair_losses = -torch.einsum("sbk,tbk->st", log_probs, teacher_probs)
    diagonal = min(student_crops, teacher_crops)
    pair_losses = torch.diagonal_scatter(pair_losses, pair_losses.new_zeros(diagonal))
    return pair_losses.sum() / (batch * student_crops * teacher_crops - batch * diagonal)


def ibot_masked_cross_entropy(student_masked_logits: torch.Tensor, teacher_masked_probs: torch.Tensor,
                              masks: torch.Tensor, student_temp: float = 0.1,
                              mask_indices: torch.Tensor | None = None) -> torch.Tensor:
    """iBOT loss on the masked patch tokens only.

    ``student_masked_logits`` / ``teacher_masked_probs`` (M, K): the masked tokens in the order of
    ``masks.flatten().nonzero()`` (``mask_indices`` when given: then no host sync for the boolean selection);
    ``masks`` (n_images, N) bool. Each image's tokens are weighted 1 / its number of masked tokens, the sum is
    divided by the number of images (masked or not). Same as DINOv3's ``iBOTPatchLoss.forward_masked`` (and
    lightly's IBOTPatchLoss weighting).
    """
    per_token = torch.sum(teacher_masked_probs.float() * F.log_softmax(student_masked_logits.float() / student_temp,
                                                                        dim=-1), dim=-1)
    per_image = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)
    weights = per_image[masks] if mask_indices is None else per_image.flatten().index_select(0, mask_indices)
    return -(per_token * weights).sum() / masks.shape[0]


_koleo = KoLeoLoss()


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """lightly's KoLeo (nearest neighbour on L2-normalised features) in float32, as DINOv3 runs it
    (autocast off). ``features`` (B, D)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return _koleo(features.float())


class GramLoss(nn.Module):
    """Gram anchoring (DINOv3 §4.2): MSE between the per-image cosine Gram matrices of student patch features
    and Gram-teacher patch features, both (B, N, D).

    ``remove_negatives``: 'none' keeps all similarities (DINOv3's stage configs), 'both' sets negative
    similarities to 0 in both matrices (``GramLoss()`` defaults), 'teacher' sets the teacher's negatives to 0
    (``remove_only_teacher_neg=True``). DINOv3's code for 'teacher' also tries to zero student entries where
    both are negative, but it tests the teacher matrix after clamping it, so that never fires; this class
    reproduces what the code computes (only the teacher's negatives removed).
    """

    def __init__(self, remove_negatives: str = "both"):
        super().__init__()
        if remove_negatives not in ("none", "both", "teacher"):
            raise ValueError(f"remove_negatives must be 'none', 'both' or 'teacher', got {remove_negatives!r}")
        self.remove_negatives = remove_negatives

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        if student_features.ndim != 3 or student_features.shape != teacher_features.shape:
            raise ValueError(f"Gram loss needs two (B, N, D) tensors of one shape, got "
                             f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
        student = F.normalize(student_features.float(), dim=-1)
        teacher = F.normalize(teacher_features.float(), dim=-1)
        student_gram = student @ student.transpose(-1, -2)
        teacher_gram = teacher @ teacher.transpose(-1, -2)
        if self.remove_negatives in ("both", "teacher"):
            teacher_gram = teacher_gram.clamp(min=0.0)
        if self.remove_negatives == "both":
            student_gram = student_gram.clamp(min=0.0)
        return F.mse_loss(student_gram, teacher_gram)


def patch_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, C * p * p) float32 patches in the encoder's token order (row-major over the
    h x w grid, as ``patch_embed`` flattens it); each patch's pixels row-major, channel first."""
    return F.unfold(images.float(), kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def masked_pixel_loss(pred: torch.Tensor, images: torch.Tensor, mask_indices: torch.Tensor, patch_size: int,
                      norm_pixels: bool = True, kind: str = "l1") -> torch.Tensor:
    """Masked-image reconstruction loss, in float32: ``pred`` (M, C * p * p) for the masked tokens
    ``mask_indices`` (indices into the flattened (B, N) token grid) against those patches of ``images``
    (B, C, H, W).

    ``norm_pixels``: MAE's targets, each patch minus its mean over sqrt(var + 1e-6) (``var`` unbiased, as MAE's
    ``target.var(dim=-1)``). ``kind``: 'l1' (SimMIM) or 'mse' (MAE), the mean over every masked pixel (both papers
    average over the masked patches only)."""
    target = patch_pixels(images, patch_size).flatten(0, 1).index_select(0, mask_indices)
    if norm_pixels:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    if kind == "l1":
        return F.l1_loss(pred.float(), target)
    if kind == "mse":
        return F.mse_loss(pred.float(), target)
    raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
