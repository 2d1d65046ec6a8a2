"""Text signatures for data checks: normalised exact keys, MinHash LSH near-duplicates, n-gram leakage.

All hashes are deterministic (crc32/adler32, blake2b), so an audit gives the same answer on every run.
Memory grows with the records indexed, not their size: see the audit numbers in bench/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["LeakIndex", "NearDupIndex", "exact_key", "normalise"]

_NON_WORD = re.compile(r"[^0-9a-z]+")
_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


def normalise(text: str) -> str:
    """Lower case, punctuation and whitespace runs folded to one space: what "the same text" means here."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def exact_key(text: str) -> int:
    """A 64-bit key of the normalised text (duplicates after normalisation share it)."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little")


def _gram_hashes(words: list[str], n: int) -> set[int]:
    """64-bit hashes of the word n-grams (the whole text when shorter than n)."""
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)] or [" ".join(words)]
    out = set()
    for g in grams:
        b = g.encode()
        out.add(zlib.crc32(b) << 32 | zlib.adler32(b))
    return out


class NearDupIndex:
    """Near-duplicate detection with MinHash LSH (datasketch): word 3-gram shingles, Jaccard `threshold`.

    Signatures are computed for a chunk of texts at once with numpy (crc32 of each shingle through the
    permutations of `datasketch.MinHash(num_perm, seed=1)`: (a*h + b) mod (2^61 - 1), low 32 bits), then
    queried and inserted into a `datasketch.MinHashLSH`; LSH candidates are kept only when their estimated Jaccard similarity reaches the
    threshold (the banding alone lets some ~0.5-similar pairs through).

    Shingles found in at least 20 % (and 5) of the first chunk's texts are template (a shared instruction,
    system prompt or JSON keys) and are left out of every signature, so records are compared on content.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, shingle: int = 3):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self._minhash = MinHash
        # Bands tuned for recall (weights: false positives 0.1, false negatives 0.9; at 64 permutations 9 bands
        # of 7 rows catch 99.7 % of 0.9-similar pairs); the Jaccard estimate below removes the extra candidates.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self._perms = MinHash(num_perm=num_perm, seed=1).permutations  # shared: building them costs ~1 ms
        self._a, self._b = (x.astype(np.uint64) for x in self._perms)
        self._template: set[int] | None = None
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # row -> signature (grows by doubling)
        self._keys: list[Hashable] = []

    def _shingles(self, text: str) -> set[int]:
        words = normalise(text).split()
        return {zlib.crc32(" ".join(words[j:j + self.shingle]).encode())
                for j in range(max(1, len(words) - self.shingle + 1))}

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures, shape (len(texts), num_perm), uint64."""
        sets = [self._shingles(t) for t in texts]
        if self._template is None:
            df = Counter(g for s in sets for g in s)
            self._template = {g for g, c in df.items() if c >= max(5, 0.2 * len(sets))}
        owners, values = [], []
        for grams in sets:
            kept = grams - self._template or grams
            owners.append(len(kept))
            values.extend(kept)
        hv = np.asarray(values, dtype=np.uint64)[:, None]
        phv = np.bitwise_and((hv * self._a + self._b) % _PRIME, _MAX32)
        starts = np.concatenate([[0], np.cumsum(owners)[:-1]]).astype(np.int64)
        return np.minimum.reduceat(phv, starts, axis=0)

    def add(self, key: Hashable, sig: np.ndarray, insert: bool = True) -> list[tuple[Hashable, float]]:
        """Near duplicates of `sig` among the texts added before, as (key, estimated Jaccard), most similar
        first; then index `sig` under `key` (unless `insert` is False)."""
        m = self._minhash(hashvalues=sig, permutations=self._perms, scheme="affine32")
        rows = self.lsh.query(m)
        found = []
        if rows:
            sims = (self._sigs[rows] == sig.astype(np.uint32)).mean(axis=1)
            found = sorted(((self._keys[r], float(j)) for r, j in zip(rows, sims) if j >= self.threshold),
                           key=lambda x: -x[1])
        if insert:
            row = len(self._keys)
            if row == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._sigs[row] = sig
            self._keys.append(key)
            self.lsh.insert(row, m, check_duplication=False)
        return found


class LeakIndex:
    """Word n-grams of held-out texts (validation/eval), to find training texts that contain them.

    N-grams found in many held-out texts (`boilerplate_df`: at least 3 texts and 2 % of them, e.g. a shared
    instruction or system prompt) are template, not content, and are ignored. A training text leaks held-out
    text `j` when it contains at least `min_overlap` of `j`'s remaining n-grams.
    """

    def __init__(self, n: int = 8, min_overlap: float = 0.5):
        self.n, self.min_overlap = n, min_overlap
        self._texts: list[set[int]] = []
        self._keys: list[Hashable] = []
        self._owners: dict[int, list[int]] | None = None

    def add(self, key: Hashable, text: str) -> None:
        self._texts.append(_gram_hashes(normalise(text).split(), self.n))
        self._keys.append(key)

    def _build(self) -> None:
        df = Counter(g for grams in self._texts for g in grams)
        limit = max(3, int(0.02 * len(self._texts)))
        owners: dict[int, list[int]] = defaultdict(list)
        for j, grams in enumerate(self._texts):
            kept = {g for g in grams if df[g] < limit}
            self._texts[j] = kept
            for g in kept:
                owners[g].append(j)
        self._owners = dict(owners)

    def __len__(self) -> int:
        return len(self._texts)

    def match(self, text: str) -> tuple[Hashable, float] | None:
        """(held-out key, overlap fraction) of the held-out text `text` leaks most, or None."""
        if self._owners is None:
            self._build()
        assert self._owners is not None
        hits: Counter[int] = Counter()
        for g in _gram_hashes(normalise(text).split(), self.n):
            for j in self._owners.get(g, ()):
                hits[j] += 1
        best = None
        for j, c in hits.items():
            frac = c / max(1, len(self._texts[j]))
            if frac >= self.min_overlap and (best is None or frac > best[1]):
                best = (self._keys[j], frac)
        return best
