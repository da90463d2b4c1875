"""Rank 0's index of the prefix cache: which token prefixes are cached, how big, which to evict.

Every rank keeps the KV state of its own layers under the entry ids this index hands out
(see batch.py); only rank 0 keeps the tokens, decides hits and evictions, and tells the
others. Pure Python: no MLX here.
"""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    tokens: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Hit:
    entry: int
    reuse: int  # tokens of the prompt the entry's KV state covers


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixIndex:
    """An LRU of token prefixes bounded in bytes.

    `trimmable`: the model's KV caches can be cut back to a shorter prefix (plain attention),
    so an entry longer than what a prompt shares still helps; otherwise only entries that are
    a whole prefix of the prompt do.
    """

    def __init__(self, max_bytes: int, trimmable: bool = True) -> None:
        self.max_bytes = max_bytes
        self.trimmable = trimmable
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.lookups = 0
        self.cached_tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, tokens: list[int]) -> Hit | None:
        """The entry sharing the longest prefix with `tokens`; at least one token is left to compute."""
        self.lookups += 1
        best, best_reuse = None, 0
        for entry_id, entry in self.entries.items():
            shared = common_prefix(entry.tokens, tokens)
            if not self.trimmable and (shared < len(entry.tokens) or shared == len(tokens)):
                continue  # an entry that cannot be cut back must be a prefix with a token left to compute
            reuse = min(shared, len(tokens) - 1)
            if reuse > best_reuse:
                best, best_reuse = entry_id, reuse
        if best is None:
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        self.cached_tokens += best_reuse
        return Hit(best, best_reuse)

    def add(self, entry_id: int, tokens: list[int], nbytes: int) -> list[int]:
        """Record a new entry; returns the ids to drop (entries it makes useless, then the least recently used
        while over budget, possibly the new one itself)."""
        drops = []
        if self.trimmable:
            key = tuple(tokens)
            drops = [i for i, e in self.entries.items() if key[: len(e.tokens)] == e.tokens]
            for i in drops:
                self._remove(i)
        self.entries[entry_id] = Entry(tuple(tokens), nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes and self.entries:
            oldest = next(iter(self.entries))
            self._remove(oldest)
            drops.append(oldest)
        return drops

    def clear(self) -> list[int]:
        drops = list(self.entries)
        for i in drops:
            self._remove(i)
        return drops

    def _remove(self, entry_id: int) -> None:
        self.nbytes -= self.entries.pop(entry_id).nbytes
