"""Classification tasks: GLUE SST-2, MRPC, RTE (through ``datasets``) and a built-in ``synthetic`` one.

Every task becomes lists of ``Example(ids, label)``: token ids of the input text and an integer
label. The model answers by rank classification: the logits of one label token per class at the
first decoder position (encoder-decoder models, T5/Switch style) or after the last input token
(decoder-only models).

GLUE comes from the hub when online (``datasets.load_dataset("glue", task)``), or from local
files with ``--data-dir``: ``<data-dir>/<task>/{train,validation}.{jsonl,json,csv,tsv,parquet}``
holding the GLUE columns (``sentence`` or ``sentence1``/``sentence2``, and ``label``).

``synthetic`` needs nothing: each sequence holds a few "positive" and "negative" words among
neutral ones; the label is which kind is in the majority. A tiny model learns it in seconds.
"""

from __future__ import annotations

import glob
import os
import random
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Example", "Task", "load_task", "HashTokenizer", "TASKS"]


@dataclass(frozen=True)
class Example:
    ids: Tuple[int, ...]
    label: int


@dataclass
class Task:
    name: str
    train: List[Example]
    validation: List[Example]
    label_ids: List[int]  # one token id per class
    metrics: List[str]  # the first is the one retention is computed on


# text fields, label words (class 0, class 1), metrics
GLUE = {
    "sst2": (("sentence",), ("negative", "positive"), ["accuracy"]),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ["accuracy", "f1"]),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), ["accuracy"]),
}
TASKS = ("synthetic",) + tuple(GLUE)


class HashTokenizer:
    """Words to ids by a stable hash, for models that come without a tokenizer (``tiny-switch``)."""

    def __init__(self, vocab_size: int, reserved: int = 16) -> None:
        self.vocab_size, self.reserved = vocab_size, reserved

    def word_id(self, word: str) -> int:
        return self.reserved + zlib.crc32(word.lower().encode()) % (self.vocab_size - self.reserved)

    def encode(self, text: str, max_len: int) -> List[int]:
        return [self.word_id(w) for w in text.split()][:max_len] + [1]  # 1 = </s>


def _synthetic(vocab_size: int, n: int, seed: int, seq: int = 16) -> List[Example]:
    # NOTE: words live in [16, 16 + 8 + 8 + 64) so any vocabulary of >= 96 ids works.
    pos, neg = range(16, 24), range(24, 32)
    neutral = range(32, min(96, vocab_size))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice((3, 5, 7))
        n_pos = rng.randint(0, k)
        label = int(n_pos * 2 > k)
        words = [rng.choice(pos) for _ in range(n_pos)] + [rng.choice(neg) for _ in range(k - n_pos)]
        words += [rng.choice(neutral) for _ in range(seq - k - 1)]
        rng.shuffle(words)
        out.append(Example(tuple(words) + (1,), label))
    return out


def _glue_split(task: str, split: str, data_dir: Optional[str]):
    import datasets

    if data_dir is None:
        return datasets.load_dataset("glue", task, split=split)
    base = os.path.join(data_dir, task)
    for ext, builder in (("jsonl", "json"), ("json", "json"), ("csv", "csv"), ("tsv", "csv"), ("parquet", "parquet")):
        files = sorted(glob.glob(os.path.join(base, f"{split}*.{ext}")))
        if files:
            kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
            return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
    raise FileNotFoundError(f"no {split} file for {task} under {base} (expected {split}.jsonl/json/csv/tsv/parquet)")


def _encode(tokenizer, text: str, max_len: int) -> List[int]:
    if isinstance(tokenizer, HashTokenizer):
        return tokenizer.encode(text, max_len)
    return list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"])


def _label_ids(tokenizer, words: Sequence[str]) -> List[int]:
    if isinstance(tokenizer, HashTokenizer):
        return [2 + i for i in range(len(words))]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words} share their first token {ids}")
    return ids


def load_task(name: str, tokenizer, vocab_size: int, data_dir: Optional[str] = None, max_len: int = 128,
              train_size: Optional[int] = None, eval_size: Optional[int] = None, seed: int = 0) -> Task:
    """The task's train and validation examples, tokenised, with one label token per class."""
    if name == "synthetic":
        return Task(name, _synthetic(vocab_size, train_size or 2048, seed), _synthetic(vocab_size, eval_size or 512,
                                                                                       seed + 1),
                    [2, 3], ["accuracy"])
    if name not in GLUE:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    fields, words, metrics = GLUE[name]
    splits: Dict[str, List[Example]] = {}
    for split, limit in (("train", train_size), ("validation", eval_size)):
        rows = _glue_split(name, split, data_dir)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        splits[split] = [
            Example(tuple(_encode(tokenizer, f"{name} " + " ".join(f"{f}: {r[f]}" for f in fields), max_len)),
                    int(r["label"]))
            for r in rows if int(r["label"]) >= 0]
    return Task(name, splits["train"], splits["validation"], _label_ids(tokenizer, words), metrics)
