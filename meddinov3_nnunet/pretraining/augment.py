"""Multi-crop augmentation for grey CT/MRI slices and iBOT block masks (DINOv3's ``data/augmentations.py``,
``data/collate.py`` and ``data/masking.py``, adapted to single-channel medical slices).

Per slice: two global crops (random resized crop + flip; the first always blurred, the second rarely, as in
DINOv3), ``local_number`` local crops, and, for Gram anchoring, the two global crops again at the Gram
teacher's resolution *before* any distortion (DINOv3's ``gram_teacher_no_distortions``). DINOv3's colour
jitter, grey-scale and solarisation have no meaning for a calibrated grey image; a small random intensity
shift and scale (in z-score units) takes the colour jitter's place.

Every random draw comes from a `numpy.random.Generator` handed in by the caller, so a sample's crops are a
function of its position in the stream (reproducible after a resume, independent of worker scheduling).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from lightly.models.utils import random_block_mask_image

from .config import resolutions

BICUBIC = TF.InterpolationMode.BICUBIC
BLUR_KERNEL = 9  # DINOv3 data/transforms.py GaussianBlur(kernel_size=9)


def random_resized_crop_box(height: int, width: int, scale, rng: np.random.Generator,
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) by torchvision's RandomResizedCrop rule (10 tries, then a centre crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCrop:
    """``__call__(slice (H, W) float32, rng)`` -> ``{'global': (2, 1, G, G), 'local': (L, 1, l, l),
    'gram': (2, 1, Gg, Gg) or absent}`` float32 tensors. ``sizes`` (global, local, Gram teacher) replaces the
    config's single sizes (one entry of a mixed-resolution recipe)."""

    def __init__(self, crops, sizes: tuple[int, int, int | None] | None = None):
        self.cfg = crops
        self.global_size, self.local_size, self.gram_size = sizes or (crops.global_size, crops.local_size,
                                                                      crops.gram_teacher_size)

    def _flip(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() < self.cfg.horizontal_flip:
            image = TF.horizontal_flip(image)
        if rng.random() < self.cfg.vertical_flip:
            image = TF.vertical_flip(image)
        return image

    def _distort(self, image: torch.Tensor, blur_probability: float, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() < self.cfg.intensity_probability:
            scale = 1.0 + rng.uniform(-self.cfg.intensity_scale, self.cfg.intensity_scale)
            shift = rng.uniform(-self.cfg.intensity_shift, self.cfg.intensity_shift)
            image = image * scale + shift
        if rng.random() < blur_probability:
            sigma = float(rng.uniform(*self.cfg.blur_sigma))
            kernel = min(BLUR_KERNEL, 2 * (min(image.shape[-2:]) // 2) - 1)
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        return image

    def _crop(self, image: torch.Tensor, size: int, scale, rng: np.random.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], scale, rng)
        crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=BICUBIC, antialias=True)
        return self._flip(crop, rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]  # (1, H, W)
        base_size = max(self.global_size, self.gram_size or 0)
        globals_, grams = [], []
        for crop_index in range(2):
            base = self._crop(tensor, base_size, cfg.global_scale, rng)
            student = base if base_size == self.global_size else TF.resize(base, [self.global_size] * 2, BICUBIC,
                                                                           antialias=True)
            globals_.append(self._distort(student, cfg.blur_probability[crop_index], rng))
            if self.gram_size:
                grams.append(base if base_size == self.gram_size else
                             TF.resize(base, [self.gram_size] * 2, BICUBIC, antialias=True))
        locals_ = [self._distort(self._crop(tensor, self.local_size, cfg.local_scale, rng), cfg.blur_probability[2],
                                 rng) for _ in range(cfg.local_number)]
        out = {"global": torch.stack(globals_), "local": torch.stack(locals_)}
        if grams:
            out["gram"] = torch.stack(grams)
        return out


class MixedResolutionCrops:
    """DINOv3's multi-resolution loader (``CombinedDataLoader`` over one loader per size triple): each training
    step takes one (global, local, Gram teacher) size triple, drawn with ``crops.mixed_ratios``. The draw is a
    function of (seed, step) alone, so every rank uses the same sizes at a step and a resume repeats them."""

    def __init__(self, crops, seed: int):
        self.crops = [MultiCrop(crops, sizes) for sizes in resolutions(crops)]
        ratios = np.asarray(crops.mixed_ratios or [1.0], dtype=np.float64)
        self.probabilities = ratios / ratios.sum()
        self.seed = seed

    def for_step(self, step: int) -> MultiCrop:
        if len(self.crops) == 1:
            return self.crops[0]
        index = np.random.default_rng([self.seed, step, 13]).choice(len(self.crops), p=self.probabilities)
        return self.crops[int(index)]


def block_masks(n_images: int, grid: tuple[int, int], probability: float, ratio_min_max, rng: np.random.Generator) -> torch.Tensor:
    """iBOT masks (n_images, h * w) bool, as DINOv3's collate: ``int(n_images * probability)`` images get block
    masks covering ``int(N * r)`` patches with ``r`` stepping through ``ratio_min_max`` (then shuffled), the
    others none. Blocks come from lightly's `random_block_mask_image` (DINOv3's MaskingGenerator rule, at least
    4 patches per block, at most half the grid); like DINOv3 the remainder is filled with random patches so
    each image gets exactly its count. At least one patch of the batch is always masked."""
    h, w = grid
    n_tokens = h * w
    n_masked_images = int(n_images * probability)
    ratios = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked_images + 1)
    masks = []
    state = random.getstate()  # lightly draws from Python's global RNG: seed it from ours, then restore it
    random.seed(int(rng.integers(2 ** 31)))
    try:
        for i in range(n_masked_images):
            count = int(n_tokens * ratios[i + 1])
            smallest = min(4, count)
            mask = random_block_mask_image((h, w), num_masks=count, min_num_masks_per_block=smallest,
                                           max_num_masks_per_block=max(smallest, int(0.5 * n_tokens))).flatten().numpy()
            missing = count - int(mask.sum())
            if missing > 0:
                mask[rng.choice(np.flatnonzero(~mask), size=missing, replace=False)] = True
            masks.append(mask)
    finally:
        random.setstate(state)
    masks += [np.zeros(n_tokens, dtype=bool) for _ in range(n_images - n_masked_images)]
    order = rng.permutation(len(masks))
    stacked = torch.from_numpy(np.stack([masks[i] for i in order]))
    if not stacked.any():
        stacked[0, int(rng.integers(n_tokens))] = True
    return stacked


def collate(samples: list[dict], patch_size: int, ibot, rng: np.random.Generator, micro_batches: int = 1) -> dict:
    """Crop-major batches as DINOv3 (``[crop 0 of every image, crop 1 of every image, ...]``) plus masks. With
    ``micro_batches`` > 1 (gradient accumulation) each consecutive 1/micro_batches of the images gets its own
    `block_masks` draw, as the batch of a forward pass does in DINOv3 (`split_batch` cuts them apart)."""
    n_global = samples[0]["global"].shape[0]
    n_local = samples[0]["local"].shape[0]
    global_crops = torch.stack([s["global"][c] for c in range(n_global) for s in samples])
    local_crops = torch.stack([s["local"][c] for c in range(n_local) for s in samples])
    size = global_crops.shape[-1]
    grid = (size // patch_size, size // patch_size)
    if micro_batches == 1:
        masks = block_masks(len(global_crops), grid, ibot.mask_sample_probability, ibot.mask_ratio_min_max, rng)
    else:  # (n_global, images of one micro-batch, N) per draw, joined along the images
        share = len(samples) // micro_batches
        masks = torch.cat([block_masks(n_global * share, grid, ibot.mask_sample_probability, ibot.mask_ratio_min_max,
                                       rng).unflatten(0, (n_global, share)) for _ in range(micro_batches)], 1).flatten(0, 1)
    batch = {
        "global_crops": global_crops,  # (2B, 1, G, G)
        "local_crops": local_crops,  # (L * B, 1, l, l)
        "masks": masks,  # (2B, N) bool
        "mask_indices": masks.flatten().nonzero().flatten(),
    }
    if "gram" in samples[0]:
        batch["gram_crops"] = torch.stack([s["gram"][c] for c in range(n_global) for s in samples])
    return batch


def split_batch(batch: dict, n_images: int, parts: int) -> list[dict]:
    """A collated batch of ``n_images`` images cut into ``parts`` micro-batches of consecutive images, each
    crop-major like the whole, with its own masks and ``mask_indices`` (the batch itself when ``parts`` is 1)."""
    if parts == 1:
        return [batch]
    share = n_images // parts
    out = []
    for k in range(parts):
        images = slice(k * share, (k + 1) * share)
        micro = {key: batch[key].unflatten(0, (-1, n_images))[:, images].flatten(0, 1)
                 for key in ("global_crops", "local_crops", "masks", "gram_crops") if key in batch}
        micro["mask_indices"] = micro["masks"].flatten().nonzero().flatten()
        out.append(micro)
    return out
