"""Small text corpora and a byte-level BPE trained on them locally, for the word-piece data tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang over the quiet river "
         "as children played near old trees in the warm evening light").split()


def documents(count: int, seed: int = 0) -> list[str]:
    """``count`` documents of 3 to 40 words drawn deterministically from ``WORDS``."""
    docs, state = [], seed + 1
    for _ in range(count):
        state = (state * 1103515245 + 12345) % 2**31
        length = 3 + state % 38
        words = []
        for _ in range(length):
            state = (state * 1103515245 + 12345) % 2**31
            words.append(WORDS[state % len(WORDS)])
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def train_bpe(path: Path, vocab_size: int = 300, corpus: list[str] | None = None) -> Path:
    """A GPT-2 style byte-level BPE with ``<|endoftext|>``, trained on ``corpus``, saved as ``path``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus or documents(200), trainer)
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: doc}) + "\n" for doc in docs))
    return path
