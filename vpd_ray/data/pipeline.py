"""Train and eval streams over webdataset shards, split exactly once across ranks and loader workers.

The split rule (why no rank ever hangs): every epoch the shards are put in an order (shuffled from
``seed + epoch`` for training, as listed for eval) and their samples, concatenated, are cut into
``world_size x num_workers`` contiguous ranges whose lengths differ by at most one. Each loader
worker (a "slot") reads only its range, stepping over the members before it. So the split is at
sample level: any shard count works, uneven shards included, and a rank never goes without data.
Counts come from the ``manifest.json`` beside the shards (or one header scan per shard).

- Train: an infinite stream. Each slot walks its range of epoch ``start_epoch``, then of the next
  epoch, ..., through a shuffle buffer (flushed at the end of each epoch), so within every epoch
  each sample is seen exactly once across all ranks. ``data.shuffle_buffer`` is per loader slot: each
  worker holds at most that many encoded samples, and never more than its share of the epoch; the
  next epoch's buffer fills while the last one's empties (:func:`shuffle_epochs`), so the loader
  does not stall at an epoch boundary, only a stream's start waits for one buffer of reads.
  Batches are always full, and because every rank's stream is endless no rank runs out while
  another still steps (the trainer runs ``steps_per_epoch`` steps per epoch, the same number on
  every rank). Needs at least one sample per slot.
- Train position (:class:`DataPosition`): each train sample carries ``"__index__"``, its place in its
  epoch's shard order (concatenated), which does not depend on the split. The stream records which
  samples of each epoch the trainer has taken; a checkpoint keeps the union over ranks, and a stream
  resumed from it, on any worker count, skips exactly those samples of their epoch: across a restart
  every sample of an epoch is trained on once.
- Eval: one pass in listed order; each sample exactly once across ranks, nothing dropped, the last
  batch of a worker may be short. Ranks may differ by one batch, so an eval loop must not run a
  collective per batch (all-reduce metric sums once at the end).

Transforms: ``transform(sample, rng)`` for train (``rng`` a numpy Generator seeded from seed,
epoch and slot) and ``transform(sample)`` for eval, i.e. ``task.train_transform`` /
``task.eval_transform``. Each returns a dict of fixed-shape tensors; the stream adds
``"__key__"`` (list of str in a batch) and, for train, ``"__epoch__"`` and ``"__index__"`` (int64 tensors). Train images
leave as uint8 and the photometric augmentation waits for the device (``Task.augment_on_device``), so
a loader core does decode, flip, crop and collate only; on CUDA hosts batches come in pinned memory,
so the copy to the GPU is asynchronous.
"""

from __future__ import annotations

import base64
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import collate as collate_samples, default_collate_fn_map

from vpd_ray.data.device_decode import PendingImage
from vpd_ray.data.decode import CorruptSampleError, decode_sample, wanted_extensions
from vpd_ray.data.tario import TruncatedShardError, expand_urls, iter_raw_samples, shard_counts
from vpd_ray.errors import DataError

log = logging.getLogger(__name__)

# (shard index, samples to skip, samples to take)
Piece = tuple[int, int, int]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: as given, else from Ray Train's context inside a worker, else 0 / 1."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
    if "ray.train" in sys.modules:  # never import Ray just to learn we are not in it
        import ray.train

        try:
            context = ray.train.get_context()
        except RuntimeError:  # the driver, or a process Ray Train did not start
            return 0, 1
        return context.get_world_rank(), context.get_world_size()
    return 0, 1


def plan_epoch(counts: list[int], num_slots: int, order: list[int]) -> list[list[Piece]]:
    """Cut the samples of ``order``'s shards, concatenated, into ``num_slots`` near-equal ranges.

    Returns, per slot, the pieces ``(shard, skip, take)`` that make up its range.
    """
    total = sum(counts[i] for i in order)
    bounds = [total * s // num_slots for s in range(num_slots + 1)]
    plans: list[list[Piece]] = [[] for _ in range(num_slots)]
    start = 0
    for shard in order:
        end = start + counts[shard]
        for slot in range(num_slots):
            lo, hi = max(start, bounds[slot]), min(end, bounds[slot + 1])
            if lo < hi:
                plans[slot].append((shard, lo - start, hi - lo))
        start = end
    return plans


def piece_starts(counts: list[int], order: list[int], pieces: list[Piece]) -> list[int]:
    """Index, in the epoch's concatenated order, of each piece's first sample."""
    offsets, start = {}, 0
    for shard in order:
        offsets[shard] = start
        start += counts[shard]
    return [offsets[shard] + skip for shard, skip, _ in pieces]


class DataPosition:
    """Where a train stream stands, at sample level: every epoch below ``floor`` is done, and
    ``seen[e]`` (a bool per sample, by ``__index__``) marks what the trainer has taken of epoch ``e``.

    The indices follow the epoch's shard order, not the split, so a position saved by one worker
    count resumes on another. :meth:`dense` / :meth:`from_dense` give the fixed-shape form that ranks
    all-reduce (an elementwise max is the union of what each rank took).
    """

    def __init__(self, total: int, floor: int = 0, seen: dict[int, np.ndarray] | None = None):
        self.total, self.floor, self.seen = total, floor, dict(seen or {})

    def record(self, epochs: torch.Tensor, indices: torch.Tensor) -> None:
        """A batch the trainer takes (its ``__epoch__`` / ``__index__``; a single sample's ints too)."""
        epochs, indices = torch.as_tensor(epochs).reshape(-1), torch.as_tensor(indices).reshape(-1)
        for epoch in torch.unique(epochs).tolist():
            marks = self.seen.setdefault(epoch, np.zeros(self.total, dtype=bool))
            marks[indices[epochs == epoch].numpy()] = True
        self._settle()

    def _settle(self) -> None:
        """Move ``floor`` past the epochs whose every sample is taken."""
        while self.floor in self.seen and self.seen[self.floor].all():
            del self.seen[self.floor]
            self.floor += 1

    @property
    def last(self) -> int:
        """The newest epoch with a sample taken (``floor`` if none)."""
        return max(self.seen, default=self.floor)

    def taken(self, epoch: int) -> int:
        return int(self.seen[epoch].sum()) if epoch in self.seen else 0

    def dense(self, lo: int, hi: int) -> np.ndarray:
        """``uint8 [hi - lo + 1, total]``: 1 where epoch ``lo + row`` has the sample taken (epochs below
        ``floor`` are all taken)."""
        out = np.zeros((hi - lo + 1, self.total), dtype=np.uint8)
        out[: max(0, min(self.floor, hi + 1) - lo)] = 1
        for epoch, marks in self.seen.items():
            if lo <= epoch <= hi:
                out[epoch - lo] |= marks
        return out

    @classmethod
    def from_dense(cls, lo: int, rows: np.ndarray) -> DataPosition:
        position = cls(rows.shape[1], floor=lo, seen={lo + i: row.astype(bool) for i, row in enumerate(rows) if row.any()})
        position._settle()
        return position

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``meta.json``: a bit per sample, packed, base64."""
        return {"total": self.total, "floor": self.floor,
                "seen": {str(e): base64.b64encode(np.packbits(m).tobytes()).decode("ascii") for e, m in self.seen.items()}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DataPosition:
        total = int(state["total"])
        seen = {int(e): np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=total).astype(bool)
                for e, bits in state["seen"].items()}
        return cls(total, floor=int(state["floor"]), seen=seen)


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard order of one epoch: a permutation from ``seed + epoch`` when shuffling."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng(seed + epoch).permutation(num_shards)]


Epoch = tuple[int, np.random.Generator, Iterator[Any], int]  # (epoch, rng, samples, buffer size)


def shuffle_epochs(epochs: Iterator[Epoch]) -> Iterator[tuple[int, np.random.Generator, Any]]:
    """Each epoch's samples in a random order through a buffer, epoch after epoch: ``(epoch, rng, sample)``.

    The buffer fills with an epoch's first ``size`` samples, then each further sample goes in at a
    place drawn from the epoch's ``rng`` and the one there comes out; at the end the rest is shuffled and
    comes out (``size`` 1 or less: the order as read, no draws). So within an epoch every sample comes
    out once.

    No stall at the epoch boundary: while an epoch's buffer empties, the next epoch's fills, one read
    per sample yielded, so only a stream's first epoch waits for a full buffer. Filling draws nothing,
    so an epoch's order and draws are those of the epoch shuffled alone: resuming at any epoch replays it.
    """
    epoch, rng, samples, size = next(epochs)
    head: list[Any] = list(itertools.islice(samples, size if size > 1 else 0))
    while True:
        buffer = head
        for sample in samples:
            if buffer:
                i = int(rng.integers(len(buffer)))
                buffer[i], sample = sample, buffer[i]
            yield epoch, rng, sample
        rng.shuffle(buffer)
        next_epoch, next_rng, samples, size = next(epochs)
        size = size if size > 1 else 0
        head = []
        for sample in buffer:  # the next epoch's buffer fills while this one empties
            head.extend(itertools.islice(samples, 1 if len(head) < size else 0))
            yield epoch, rng, sample
        head.extend(itertools.islice(samples, size - len(head)))
        epoch, rng = next_epoch, next_rng


class ShardDataset(IterableDataset):
    """Decoded, transformed samples of this rank's DataLoader worker (see the module docstring)."""

    def __init__(self, urls: list[str], counts: list[int], transform: Callable, *, train: bool, seed: int,
                 fields: tuple[str, ...] | None, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 max_corrupt: int, position: DataPosition, defer_jpeg: bool = False):
        self.urls, self.counts, self.transform = urls, counts, transform
        self.train, self.seed, self.wanted, self.defer_jpeg = train, seed, wanted_extensions(fields), defer_jpeg
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.buffer, self.max_corrupt = shuffle_buffer, max_corrupt
        # what a resumed stream skips: a copy, since the stream goes on recording into the position
        self.start_epoch, self.seen = position.floor, {e: m.copy() for e, m in position.seen.items()}
        self.corrupt = 0  # per loader worker: each worker process holds its own copy

    def _slot(self) -> int:
        info = get_worker_info()
        return self.rank * self.num_workers + (info.id if info is not None else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = self._slot()
        if not self.train:
            for url, key, fields, _ in self._raw(*self._pieces(slot, epoch=0)):
                if (sample := self._decoded(url, key, fields)) is not None:
                    yield {**self.transform(sample), "__key__": key}
            return
        # The buffer holds encoded bytes (a third of a decoded NYU sample's memory); decode after it.
        for epoch, rng, (url, key, fields, index) in shuffle_epochs(self._train_epochs(slot)):
            if (sample := self._decoded(url, key, fields)) is not None:
                yield {**self.transform(sample, rng), "__key__": key, "__epoch__": epoch, "__index__": index}

    def _pieces(self, slot: int, epoch: int) -> tuple[list[Piece], list[int], np.ndarray | None]:
        """This slot's pieces of ``epoch``, the epoch index of each piece's first sample, and the
        samples of the epoch already taken before a resume (None: none)."""
        order = epoch_order(len(self.urls), self.seed, epoch, shuffle=self.train)
        pieces = plan_epoch(self.counts, self.world_size * self.num_workers, order)[slot]
        return pieces, piece_starts(self.counts, order, pieces), self.seen.get(epoch) if self.train else None

    def _train_epochs(self, slot: int) -> Iterator[Epoch]:
        """Per epoch from ``start_epoch`` on: ``(epoch, rng, raw samples, buffer size)`` for
        :func:`shuffle_epochs`. The rng (from seed, epoch and slot) draws the order and then the
        transform's augmentation; the buffer is ``shuffle_buffer`` or the slot's share of the epoch,
        whichever is smaller (a bigger one would only delay the first sample)."""
        for epoch in itertools.count(self.start_epoch):
            pieces, starts, taken = self._pieces(slot, epoch)
            left = sum(take for _, _, take in pieces)
            if taken is not None:
                left -= sum(int(taken[start : start + take].sum()) for (_, _, take), start in zip(pieces, starts))
            size = min(self.buffer, left)
            yield epoch, np.random.default_rng((self.seed, epoch, slot)), self._raw(pieces, starts, taken), size

    def _raw(self, pieces: list[Piece], starts: list[int],
             taken: np.ndarray | None) -> Iterator[tuple[str, str, dict[str, bytes], int]]:
        """``(url, key, {ext: bytes}, index in the epoch)`` of this slot's pieces, without the samples
        ``taken`` before a resume (read past, not decoded); a truncated shard counts as corrupt."""
        for (shard, skip, take), start in zip(pieces, starts):
            url = self.urls[shard]
            try:
                for index, (key, fields) in enumerate(iter_raw_samples(url, skip, take), start):
                    if taken is None or not taken[index]:
                        yield url, key, fields, index
            except TruncatedShardError as err:
                self._count_corrupt(str(err))

    def _decoded(self, url: str, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        """The decoded sample, or None for a corrupt one (counted)."""
        try:
            return decode_sample(fields, key, url, self.wanted, self.defer_jpeg)
        except CorruptSampleError as err:
            self._count_corrupt(str(err))
            return None

    def _count_corrupt(self, what: str) -> None:
        self.corrupt += 1
        where = f"rank {self.rank} loader worker {self._slot() % self.num_workers}"
        if self.corrupt > self.max_corrupt:
            raise DataError(f"{self.corrupt} corrupt samples in {where}, more than data.max_corrupt="
                               f"{self.max_corrupt}; last: {what}")
        log.warning("skipping corrupt sample (%d so far in %s): %s", self.corrupt, where, what)


class Stream:
    """Iterable of collated batches.

    ``position`` (train): what this rank has taken so far (with what the resumed position had); the
    trainer merges the ranks' positions into the checkpoint.
    """

    def __init__(self, dataset: ShardDataset, loader: DataLoader, batch_size: int | None, position: DataPosition):
        self.dataset, self.loader, self.position = dataset, loader, position
        self.num_samples = sum(dataset.counts)
        world_batch = dataset.world_size * (batch_size or 1)
        # The same on every rank, so all ranks step (and call collectives) equally often.
        self.steps_per_epoch = max(1, self.num_samples // world_batch)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.dataset.train:
                self.position.record(batch["__epoch__"], batch["__index__"])
            yield batch


def build_stream(urls: str | list[str], transform: Callable, *, train: bool, batch_size: int | None, seed: int = 0,
                 fields: tuple[str, ...] | None = None, num_workers: int = 2, shuffle_buffer: int = 256,
                 max_corrupt: int = 10, rank: int | None = None, world_size: int | None = None,
                 position: dict[str, Any] | None = None, pin_memory: bool | None = None,
                 jpeg_decode: str = "loader") -> Stream:
    """A train (infinite, shuffled, full batches) or eval (one pass, in order) stream of batches.

    ``urls``: brace pattern / comma list / list / directory / fsspec URLs. ``fields``: the shard
    fields to decode and require (the task's ``fields``; None: whichever known fields a sample has). ``batch_size=None`` yields single samples uncollated.
    ``max_corrupt``: corrupt samples tolerated per loader worker before the run fails.
    ``position``: where to resume (train): a checkpoint's :meth:`DataPosition.to_dict`.
    ``shuffle_buffer``: encoded samples per loader slot (train; see the module docstring).
    ``pin_memory``: batches in page-locked memory for asynchronous host-to-GPU copies (None: when
    CUDA is available; a no-op on CPU-only hosts).
    ``jpeg_decode``: ``"device"`` leaves a train stream's colour JPEGs encoded for the training device
    (:mod:`vpd_ray.data.device_decode`); eval streams always decode in the loader.
    Raises :class:`~vpd_ray.errors.DataError` for shards whose manifest marks an incomplete conversion.
    """
    rank, world_size = resolve_rank(rank, world_size)
    shard_urls = expand_urls(urls)
    counts = shard_counts(shard_urls)
    slots = world_size * max(num_workers, 1)
    if train and sum(counts) < slots:
        raise ValueError(f"{sum(counts)} samples in {len(shard_urls)} shard(s) cannot feed {world_size} rank(s) x "
                         f"{max(num_workers, 1)} loader worker(s); every worker needs at least one sample per epoch")
    # a position saved before positions were sample-level has no total: it restarts its epoch
    start = DataPosition(sum(counts)) if position is None else DataPosition.from_dict({"total": sum(counts), **position})
    if start.total != sum(counts):
        raise DataError(f"the train shards hold {sum(counts)} samples, but the checkpoint's data position counts "
                        f"{start.total}: the shards changed since it was saved (resume with the same shards, or "
                        "start a new run.name)")
    dataset = ShardDataset(shard_urls, counts, transform, train=train, seed=seed, fields=fields, rank=rank,
                           world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                           max_corrupt=max_corrupt, position=start, defer_jpeg=train and jpeg_decode == "device")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate if batch_size else _identity,
                        persistent_workers=False,
                        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory)
    return Stream(dataset, loader, batch_size, start)


def _identity(sample: Any) -> Any:
    return sample


# torch's collation, with the images a transform left for the device (a list of them, not a tensor)
_COLLATE_FNS = {**default_collate_fn_map, PendingImage: lambda batch, *, collate_fn_map=None: list(batch)}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that :class:`~vpd_ray.data.device_decode.PendingImage` fields stay a list."""
    return collate_samples(samples, collate_fn_map=_COLLATE_FNS)
