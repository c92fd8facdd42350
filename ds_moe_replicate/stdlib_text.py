"""Real text without a download: the Python standard library's own ``.py`` files, split by file.

Every Python install ships tens of megabytes of source, docstrings and comments written by many
people over decades (``sysconfig.get_paths()["stdlib"]``). A *document* is one file; the split
into training and held-out documents is by file, never by position, so no held-out byte was
ever seen in training inside its own file.

The split rule (fixed, documented, the same on every machine and rank): a file is held out when
the first 8 hex digits of the SHA-1 of its path relative to the stdlib root (with ``/``
separators), read as an integer, are ``< held_out_share * 2**32``. The rule depends on the
relative path only, so adding or removing a file never moves another one between the sets.
``site-packages`` and ``__pycache__`` are skipped. The *contents* depend on the Python version
installed; ``Corpus.describe()`` records which.

Sequences are byte windows (token = byte, 256 ids). Training windows are drawn at random
positions of training documents (documents weighted by length); held-out windows are a fixed,
seeded set from held-out documents, each tagged with its document, so confidence intervals can
resample documents.

Legend: B sequences, S tokens per sequence (+1: inputs and next-token targets).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Document", "Corpus", "is_held_out", "list_documents", "load_corpus", "HELD_OUT_SHARE"]

HELD_OUT_SHARE = 0.1
_SKIP_DIRS = {"site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class Document:
    """One source file: its path relative to the stdlib root and its bytes."""

    path: str
    data: bytes


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_held_out(rel_path: str, held_out_share: float = HELD_OUT_SHARE) -> bool:
    """The split rule (module docstring): SHA-1 of the relative path, first 32 bits, below the share."""
    digest = hashlib.sha1(rel_path.replace(os.sep, "/").encode("utf-8")).hexdigest()
    return int(digest[:8], 16) < held_out_share * 2 ** 32


def list_documents(root: Optional[str] = None) -> List[str]:
    """Sorted relative paths (``/`` separators) of the ``.py`` files under ``root`` (the stdlib)."""
    root = root or stdlib_root()
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(here, name), root).replace(os.sep, "/"))
    return sorted(found)


class Corpus:
    """Training and held-out documents of one root, and the byte windows drawn from them."""

    def __init__(self, train: List[Document], held_out: List[Document], root: str, held_out_share: float) -> None:
        if not train or not held_out:
            raise ValueError(f"the split of {root!r} left {len(train)} training and {len(held_out)} held-out "
                             "documents; both must be non-empty (more files, or another --max-files)")
        self.train, self.held_out, self.root, self.held_out_share = train, held_out, root, held_out_share
        sizes = np.array([len(d.data) for d in train], dtype=np.float64)
        self._train_p = sizes / sizes.sum()

    def describe(self) -> Dict[str, object]:
        """What the run trained on: counts, bytes, the rule, and the Python that shipped the text."""
        return dict(root=self.root, python=sys.version.split()[0], held_out_share=self.held_out_share,
                    rule="held out iff int(sha1(relative path)[:8], 16) < share * 2**32",
                    train_documents=len(self.train), held_out_documents=len(self.held_out),
                    train_bytes=int(sum(len(d.data) for d in self.train)),
                    held_out_bytes=int(sum(len(d.data) for d in self.held_out)))

    def train_batches(self, batch: int, seq: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless int64 [B, S + 1] windows of training documents, from a seeded generator.

        Documents are drawn with probability proportional to their length, then a uniform start.
        """
        rng = np.random.default_rng(seed)
        while True:
            docs = rng.choice(len(self.train), size=batch, p=self._train_p)
            yield torch.stack([_window(self.train[d].data, seq, rng) for d in docs])

    def held_out_windows(self, count: int, seq: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``count`` fixed windows of held-out documents: (int64 [B, S + 1] bytes, int64 [B] document index).

        Documents are taken round-robin in a seeded order (so many documents are covered), each
        window at a seeded start; the same arguments give the same windows on every rank and run.
        """
        return _fixed_windows(self.held_out, count, seq, seed)

    def train_windows(self, count: int, seq: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like ``held_out_windows``, from training documents (e.g. to distil a predictor)."""
        return _fixed_windows(self.train, count, seq, seed)


def _fixed_windows(documents: List[Document], count: int, seq: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(documents))
    docs = [int(order[i % len(order)]) for i in range(count)]
    return torch.stack([_window(documents[d].data, seq, rng) for d in docs]), torch.tensor(docs)


def _window(data: bytes, seq: int, rng: np.random.Generator) -> torch.Tensor:
    """int64 [S + 1] bytes from a random start; short documents are zero-padded at the end."""
    need = seq + 1
    start = int(rng.integers(0, len(data) - need + 1)) if len(data) > need else 0
    chunk = np.frombuffer(data[start:start + need], dtype=np.uint8).astype(np.int64)
    out = np.zeros(need, dtype=np.int64)
    out[:chunk.size] = chunk
    return torch.from_numpy(out)


def load_corpus(root: Optional[str] = None, held_out_share: float = HELD_OUT_SHARE, min_bytes: int = 256,
                max_files: Optional[int] = None) -> Corpus:
    """Read and split the ``.py`` files under ``root`` (the stdlib by default).

    Args:
        root: folder to read; default ``sysconfig.get_paths()["stdlib"]``.
        held_out_share: fraction of files held out by the hash rule.
        min_bytes: files shorter than this are skipped (mostly empty ``__init__.py``).
        max_files: keep only the first files of the sorted list (tests, quick runs); the split of
            a kept file does not change.

    Returns:
        The ``Corpus``; documents in sorted path order.
    """
    root = root or stdlib_root()
    paths = list_documents(root)
    if max_files is not None:
        paths = paths[:max_files]
    train, held = [], []
    for rel in paths:
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        if len(data) < min_bytes:
            continue
        (held if is_held_out(rel, held_out_share) else train).append(Document(rel, data))
    return Corpus(train, held, root, held_out_share)
