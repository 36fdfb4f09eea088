"""The order of an epoch: which sample sits at each position of the epoch's global order, as a
function of (seed, epoch, position), which ``EpochSampler`` deals out to the ranks.

Folders and the synthetic set keep ``torch.randperm`` (``PermutationOrder``): N integers an epoch.
Tar shards (``ShardWindowOrder``) never hold a permutation of N: the epoch shuffles the shards,
cuts them into windows of ``window`` shards, and walks each window's samples in a keyed pseudorandom
permutation (a Feistel network on the bits of the position, cycle-walked into the window's size).
A stretch of the order then reads one window's shards, each about once an epoch, and memory stays
per shard however many samples there are.
"""
import functools
from typing import Iterator, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Sampler

FEISTEL_ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudorandom function give a strong pseudorandom permutation
U64 = np.uint64


class PermutationOrder:
    """``torch.randperm(N)`` seeded by ``seed + epoch``: ``DistributedSampler``'s draw."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed

    @functools.lru_cache(maxsize=1)
    def permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).numpy()  # (N,)

    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        return self.permutation(epoch)[positions]


def mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective, well-mixing hash of uint64 (wrapping arithmetic)."""
    values = (values ^ (values >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> U64(27))) * U64(0x94D049BB133111EB)
    return values ^ (values >> U64(31))


def feistel(values: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """A permutation of [0, 4 ** half_bits): a balanced Feistel network over two halves of
    ``half_bits`` bits, one round per key."""
    mask = U64((1 << half_bits) - 1)
    left, right = values >> U64(half_bits), values & mask
    for key in keys:
        left, right = right, left ^ (mix(right ^ key) & mask)
    return (left << U64(half_bits)) | right


def keyed_permutation(positions: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
    """``positions`` (each < ``size``) through a permutation of [0, size) keyed by ``keys``: the
    Feistel permutation of the smallest power of 4 >= size, applied again to whatever lands
    outside [0, size) (cycle walking, under 4 rounds on average)."""
    half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
    values = feistel(positions.astype(U64), half_bits, keys)
    outside = values >= U64(size)
    while outside.any():
        values[outside] = feistel(values[outside], half_bits, keys)
        outside = values >= U64(size)
    return values.astype(np.int64)


class ShardWindowOrder:
    """The order of an epoch over shards of ``counts`` samples each (sample indices run shard after
    shard): the shards permuted by ``(seed, epoch)``, taken ``window`` at a time, and each window's
    samples in a keyed permutation of their own. O(shards) memory, O(log shards) per position."""

    def __init__(self, counts: np.ndarray, window: int, seed: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)  # (S,)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # (S + 1,): each shard's first index
        self.num_samples = int(self.starts[-1])
        self.window, self.seed = window, seed

    @functools.lru_cache(maxsize=2)  # an epoch's, and the next one's while its first window is prefetched
    def layout(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards in the epoch's order (S,), where each begins in the order (S + 1,), where each
        window begins (windows + 1,))."""
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))  # (S,)
        begins = np.concatenate([[0], np.cumsum(self.counts[shards])])  # (S + 1,)
        window_begins = begins[np.append(np.arange(0, len(shards), self.window), len(shards))]  # (windows + 1,)
        return shards, begins, window_begins

    def window_at(self, epoch: int, position: int) -> Tuple[int, int]:
        """(epoch, window) of ``position`` of ``epoch``'s order."""
        window_begins = self.layout(epoch)[2]
        return epoch, int(np.searchsorted(window_begins, min(position, self.num_samples - 1), side="right")) - 1

    def next_window(self, epoch: int, window: int) -> Tuple[int, int]:
        """The window read after ``window`` of ``epoch``: the next one, or the next epoch's first."""
        return (epoch, window + 1) if window + 2 < len(self.layout(epoch)[2]) else (epoch + 1, 0)

    def window_shards(self, epoch: int, window: int) -> np.ndarray:
        """The shards ``window`` of ``epoch`` reads."""
        return self.layout(epoch)[0][window * self.window: (window + 1) * self.window]

    @functools.lru_cache(maxsize=64)
    def window_keys(self, epoch: int, window: int) -> np.ndarray:
        """The Feistel round keys of one window of one epoch."""
        return np.random.SeedSequence([self.seed, epoch, window]).generate_state(FEISTEL_ROUNDS, dtype=np.uint64)

    def indices(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The sample index at each of ``positions`` (< num_samples) of ``epoch``'s order."""
        shards, begins, window_begins = self.layout(epoch)
        positions = np.asarray(positions, dtype=np.int64)
        windows = np.searchsorted(window_begins, positions, side="right") - 1
        places = np.empty_like(positions)  # each position's place in the shard order, once its window is shuffled
        for window in np.unique(windows):
            chosen = windows == window
            first, size = window_begins[window], window_begins[window + 1] - window_begins[window]
            places[chosen] = first + keyed_permutation(positions[chosen] - first, int(size),
                                                       self.window_keys(epoch, int(window)))
        ranks = np.searchsorted(begins, places, side="right") - 1  # which shard of the epoch's order
        return self.starts[shards[ranks]] + places - begins[ranks]


EpochOrder = Union[PermutationOrder, ShardWindowOrder]
POSITIONS_PER_DRAW = 4096  # positions turned into indices at a time, so a rank's share is never held whole


class EpochSampler(Sampler):
    """``(index, epoch)`` keys for ``SeededSamples``: rank r of W takes positions r, r + W, ... of
    the epoch's global order (``image_data.epoch_order``), with ``drop_last``.

    So the first S steps of B images per rank cover exactly positions [0, S * B * W) of the global
    order, whatever W is: an epoch resumed at ``samples_done`` continues with the positions after
    it, on any number of processes, none seen twice and none dropped but the tail that fills no
    global batch, which every epoch drops. The keys are computed a few thousand at a time.
    """

    def __init__(self, order: EpochOrder, num_replicas: int, rank: int) -> None:
        self.order = order
        self.num_samples = order.num_samples
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.samples_done = 0, 0

    def set_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """The next pass is ``epoch``'s, from position ``samples_done`` of its global order."""
        self.epoch, self.samples_done = epoch, samples_done

    def __len__(self) -> int:
        """A whole epoch's samples per rank."""
        return self.num_samples // self.num_replicas

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, start = self.epoch, self.samples_done
        self.samples_done = 0  # a resumed epoch's start applies to one pass only
        return self.keys(epoch, start)

    def keys(self, epoch: int, start: int) -> Iterator[Tuple[int, int]]:
        per_rank = (self.num_samples - start) // self.num_replicas
        for first in range(0, per_rank, POSITIONS_PER_DRAW):
            steps = np.arange(first, min(per_rank, first + POSITIONS_PER_DRAW))  # this rank's k-th positions
            positions = start + self.rank + steps * self.num_replicas
            for index in self.order.indices(epoch, positions).tolist():
                yield index, epoch
