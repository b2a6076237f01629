"""Streaming slices from a corpus manifest into training batches, sharded across ranks and loader workers.

The stream never holds the corpus in memory. Each *shard* (one per data-loader worker per rank) walks an
endless sequence of epochs; in epoch ``e`` the volumes are permuted with seed ``(seed, e)`` and shard ``s`` of
``S = world_size x workers`` takes every S-th one. It reads its volumes ``chunk_volumes`` at a time and emits
the chunk's slices in a seeded random order, so disk reads are sequential per volume while batches mix
volumes. Every shard's sample sequence, each sample's crops and each batch's masks are functions of
(seed, shard, position) alone.

Data position: the DataLoader hands out batches round-robin over its workers, so training step ``t`` on a
rank is batch ``t // W`` of worker ``t % W``. A stream started at ``start_step`` (a resume) rotates the
worker roles and jumps each shard to its next batch by arithmetic on the manifest's slice counts (no volume
is read to skip), so a resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from meddinov3_nnunet.volume_io import file_version

from .corpus import Corpus
from .volumes import expand_ranges, normalise_slice, read_volume

log = logging.getLogger(__name__)


class ShardPlan:
    """Which (volume, slice) a shard emits at each position; pure arithmetic on the manifest."""

    def __init__(self, counts: np.ndarray, shard: int, num_shards: int, chunk_volumes: int, seed: int):
        if len(counts) < num_shards:
            raise ValueError(f"the corpus has {len(counts)} volume(s), fewer than the {num_shards} data shards "
                             f"(ranks x loader workers); use fewer data.num_workers")
        self.counts, self.shard, self.num_shards = counts, shard, num_shards
        self.chunk_volumes, self.seed = chunk_volumes, seed

    def epoch_volumes(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.counts))
        return order[self.shard::self.num_shards]

    def chunks(self, epoch: int) -> list[np.ndarray]:
        volumes = self.epoch_volumes(epoch)
        return [volumes[i:i + self.chunk_volumes] for i in range(0, len(volumes), self.chunk_volumes)]

    def chunk_order(self, epoch: int, chunk_index: int, chunk: np.ndarray) -> np.ndarray:
        """Permutation of the chunk's flattened (volume, slice) list."""
        total = int(self.counts[chunk].sum())
        return np.random.default_rng([self.seed, epoch, self.shard, chunk_index, 11]).permutation(total)

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, chunk index, offset within the chunk) of sample ``position`` of this shard."""
        epoch = 0
        while True:
            for chunk_index, chunk in enumerate(self.chunks(epoch)):
                size = int(self.counts[chunk].sum())
                if position < size:
                    return epoch, chunk_index, position
                position -= size
            epoch += 1


class SliceStream(IterableDataset):
    """Endless batches for one rank. ``transform(slice, rng) -> crops`` and ``collate(list, rng) -> batch`` run
    inside the loader workers; ``transform_for_step(step) -> transform``, when given, picks the transform of each
    training step instead (mixed resolutions)."""

    def __init__(self, corpus: Corpus, batch_size: int, transform: Callable | None, collate: Callable, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, chunk_volumes: int = 4,
                 start_step: int = 0, transform_for_step: Callable[[int], Callable] | None = None):
        self.corpus = corpus
        self.batch_size, self.transform, self.collate = batch_size, transform, collate
        self.transform_for_step = transform_for_step
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.chunk_volumes, self.start_step = chunk_volumes, start_step
        self._verified: dict[str, list[int]] = {}  # path -> file version verified since the manifest (per worker)
        # fail in the main process, before workers start
        ShardPlan(corpus.counts, 0, world_size * self.num_workers, chunk_volumes, seed)

    def _roles(self) -> tuple[int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        virtual = (worker + self.start_step) % self.num_workers
        # batches this role produced before start_step: steps t < start_step with t % W == virtual
        done = max(0, -(-(self.start_step - virtual) // self.num_workers))
        return self.rank * self.num_workers + virtual, done

    def __iter__(self) -> Iterator[dict]:
        shard, first_batch = self._roles()
        plan = ShardPlan(self.corpus.counts, shard, self.world_size * self.num_workers, self.chunk_volumes, self.seed)
        samples = self._samples(plan, first_batch * self.batch_size)
        batch_index = first_batch
        while True:
            transform = self.transform
            if self.transform_for_step is not None:  # this batch is training step batch_index * W + role
                transform = self.transform_for_step(batch_index * self.num_workers + shard % self.num_workers)
            items = []
            for _ in range(self.batch_size):
                volume, slice_index, position, image = next(samples)
                rng = np.random.default_rng([self.seed, shard, position, 3])
                items.append(transform(image, rng))
            batch = self.collate(items, np.random.default_rng([self.seed, shard, batch_index, 5]))
            batch["batch_index"] = torch.tensor(batch_index)
            batch["shard"] = torch.tensor(shard)
            yield batch
            batch_index += 1

    def _samples(self, plan: ShardPlan, position: int):
        """Yields (volume index, slice index, position, normalised slice) from ``position`` on, forever."""
        epoch, chunk_index, offset = plan.locate(position)
        while True:
            chunks = plan.chunks(epoch)
            while chunk_index < len(chunks):
                chunk = chunks[chunk_index]
                order = plan.chunk_order(epoch, chunk_index, chunk)
                pairs = [(int(v), int(z)) for v in chunk for z in expand_ranges(self.corpus.volumes[v]["slices"])]
                arrays = {int(v): self._load(int(v)) for v in chunk}
                readable = [p for p in pairs if arrays[p[0]] is not None]
                if not readable:
                    log.warning("no volume of a data chunk could be read (volumes %s); skipping it", list(chunk))
                    position += len(order) - offset  # keep positions aligned with the plan
                else:
                    for k in range(offset, len(order)):
                        volume, z = pairs[order[k]]
                        if arrays[volume] is None:  # stand in with a fixed other slice of the chunk
                            volume, z = readable[(position * 2654435761) % len(readable)]
                        entry = self.corpus.volumes[volume]
                        yield volume, z, position, normalise_slice(arrays[volume][z], entry["norm"])
                        position += 1
                offset = 0
                chunk_index += 1
            epoch, chunk_index = epoch + 1, 0

    def _load(self, volume: int):
        """The volume's array, or None (with a warning) when it cannot be read or has changed shape. A file is
        verified (complete gzip stream, NIfTI size) once per version: the manifest holds the [size, mtime] the
        indexing verified, and a changed file is verified again when first read, then remembered."""
        entry = self.corpus.volumes[volume]
        path = entry["path"]
        try:
            version = None if entry.get("series") else file_version(path)
            verified = self._verified.get(path, entry.get("file_version"))
            verify = version is None or version != verified
            array, _, _ = read_volume(path, entry.get("series"), verify=verify)
            if verify and version is not None:
                self._verified[path] = version
        except Exception as err:  # a file damaged or removed after indexing: skip it, never stop the run
            log.warning("skipping %s: unreadable now (%s)", path, err)
            return None
        if list(array.shape) != entry["shape"]:
            log.warning("skipping %s: shape %s differs from the indexed %s (file changed?)", entry["path"],
                        list(array.shape), entry["shape"])
            return None
        return array
