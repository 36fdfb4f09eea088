"""The order of an epoch: which sample sits at each position of the epoch's global order, as a
function of (seed, epoch, position), which ``datasets.EpochSampler`` deals out to the ranks.

Folders and the synthetic set keep ``torch.randperm`` (``PermutationOrder``): N integers an epoch.
Tar shards (``ShardWindowOrder``) never hold a permutation of N: the epoch shuffles the shards,
cuts them into windows of ``window`` shards, and walks each window's samples in a keyed pseudorandom
permutation (a Feistel network on the bits of the position, cycle-walked into the window's size).
A stretch of the order then reads one window's shards, each about once an epoch, and memory stays
per shard however many samples there are.
"""
import functools
from typing import Tuple

import numpy as np
import torch

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

    @functools.lru_cache(maxsize=1)
    def layout(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards in the epoch's order (S,), where each begins in the order (S + 1,), where each
        window begins (windows + 1,))."""
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))  # (S,)
        begins = np.concatenate([[0], np.cumsum(self.counts[shards])])  # (S + 1,)
        window_begins = begins[np.append(np.arange(0, len(shards), self.window), len(shards))]  # (windows + 1,)
        return shards, begins, window_begins

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
