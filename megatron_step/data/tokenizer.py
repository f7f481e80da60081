"""Tokenizers: text <-> token ids for preprocessing, Megatron's GPTDataset and export.

`load_tokenizer(spec)` understands three specs (the `data.tokenizer` config field):
- `"byte"`: built in, no files. One id per UTF-8 byte, vocab_size 256 (fits the `tiny` preset).
  The end-of-document id (EOD) is 0, the NUL byte, which text corpora do not contain (Megatron's
  own ByteLevelTokenizer makes the same choice): a NUL in the text would read as EOD.
- a Hugging Face `tokenizer.json` (or a directory holding one), loaded with the `tokenizers`
  package. Its EOD is the first of EOD_CANDIDATES that it defines as a token.
- a SentencePiece `.model`; its EOD is the model's `</s>` (eos_id).

Every tokenizer offers what megatron.core.datasets' GPTDataset reads (`vocab_size`, `eod`, `pad`,
`unique_identifiers`), plus `encode`/`decode` (no special tokens are added: EOD is appended by the
preprocessing), `files()` (what an export must copy) and `describe()` for logs. `pad` is Megatron's
sentinel -1: there is no padding token, GPTDataset only pads partial validation sequences and
masks them. `unique_identifiers` holds a content hash, so Megatron's index caches and our dataset
metadata notice a changed tokenizer file. Tokenizers pickle by their spec (worker processes load
their own copy). We do not use megatron.core.tokenizers: its Hugging Face path goes through
`transformers` and needs a metadata file, which a plain tokenizer.json does not come with.

`train_bpe` trains a byte-level BPE (`tokenizers`) deterministically: same texts, same vocab size
-> byte-identical tokenizer.json.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BYTE_SPEC = "byte"
BYTE_EOD = 0
PAD_SENTINEL = -1
"""Megatron's `_PAD_TOKEN_ID`: never a real id, so no real token is ever masked as padding."""
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<eod>", "[EOS]")
"""End-of-document tokens looked up in a tokenizer.json, in this order."""
BPE_EOD = EOD_CANDIDATES[0]


class TokenizerError(ValueError):
    """A tokenizer spec names no file, an unreadable file, or something that is not a tokenizer."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks: corpora can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Common interface; subclasses set `spec`, `kind`, `vocab_size`, `eod` in __init__."""

    spec: str
    kind: str
    vocab_size: int
    eod: int
    pad: int = PAD_SENTINEL

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What identifies the id mapping (Megatron hashes this into its cache file names)."""
        files = {path.name: file_sha256(path) for path in self.files()}
        return OrderedDict(kind=self.kind, vocab_size=self.vocab_size, eod=self.eod, files=files)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens included as text)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Files an exported model needs to rebuild this tokenizer (empty for the byte level)."""
        return []

    def describe(self) -> str:
        """One line for logs: kind, source, vocabulary size and EOD."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return load_tokenizer, (self.spec,)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; EOD = 0 (NUL)."""

    def __init__(self) -> None:
        self.spec, self.kind, self.vocab_size, self.eod = BYTE_SPEC, "byte", 256, BYTE_EOD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # "replace": a sample window may cut a multi-byte character
        return bytes(ids).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "byte-level (built in): vocab 256, EOD = 0 (NUL)"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust loader raises plain Exception subclasses
            raise TokenizerError(f"tokenizer {str(path)!r}: not a Hugging Face tokenizer.json "
                                 f"({str(exc).splitlines()[0]})") from None
        eods = [(name, self._tok.token_to_id(name)) for name in EOD_CANDIDATES]
        found = [(name, i) for name, i in eods if i is not None]
        if not found:
            raise TokenizerError(f"tokenizer {str(path)!r}: has no end-of-document token; "
                                 f"add one of {', '.join(EOD_CANDIDATES)} as a special token")
        self._path = path
        self._eod_name, self.eod = found[0]
        self.spec, self.kind = str(path), "huggingface"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def files(self) -> list[Path]:
        return [self._path]

    def describe(self) -> str:
        return (f"Hugging Face tokenizer.json {self._path}: vocab {self.vocab_size}, "
                f"EOD = {self.eod} ({self._eod_name})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; EOD is its eos piece."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"tokenizer {str(path)!r}: not a tokenizer (neither a "
                                 f"tokenizer.json nor a SentencePiece model: "
                                 f"{str(exc).splitlines()[0]})") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {str(path)!r}: the SentencePiece model has no eos "
                                 "piece to use as end of document (train it with eos_id >= 0)")
        self._path = path
        self.spec, self.kind = str(path), "sentencepiece"
        self.vocab_size, self.eod = self._sp.get_piece_size(), self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def files(self) -> list[Path]:
        return [self._path]

    def describe(self) -> str:
        return (f"SentencePiece model {self._path}: vocab {self.vocab_size}, "
                f"EOD = {self.eod} ({self._sp.id_to_piece(self.eod)})")


def load_tokenizer(spec: str) -> Tokenizer:
    """Load the tokenizer a `data.tokenizer` spec names.

    Args:
        spec: "byte", a tokenizer.json path (or a directory holding `tokenizer.json`), or a
            SentencePiece model path. Files are recognised by content, not by name.

    Returns:
        The tokenizer.

    Raises:
        TokenizerError: the spec names nothing, an unreadable file, or not a tokenizer.
    """
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"tokenizer {spec!r}: directory has no tokenizer.json")
        path = path / "tokenizer.json"
    if not path.exists():
        raise TokenizerError(f"tokenizer {spec!r}: no such file (expected 'byte', a "
                             "tokenizer.json or a SentencePiece .model)")
    if not path.is_file():
        raise TokenizerError(f"tokenizer {spec!r}: not a regular file")
    try:
        with path.open("rb") as stream:
            head = stream.read(64).lstrip()
    except OSError as exc:
        raise TokenizerError(f"tokenizer {spec!r}: cannot read ({exc.strerror})") from None
    if not head:
        raise TokenizerError(f"tokenizer {spec!r}: file is empty")
    return HFTokenizer(path) if head.startswith(b"{") else SentencePieceTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path, *,
              overwrite: bool = False) -> HFTokenizer:
    """Train a byte-level BPE tokenizer.json on `texts` (deterministic) and load it.

    Byte-level pre-tokenization with the full 256-byte alphabet means every text round-trips
    (`decode(encode(t)) == t`); the only special token is `<|endoftext|>` (id 0), the EOD.

    Args:
        texts: training documents (e.g. `corpus.read_documents` over the input files).
        vocab_size: final vocabulary size, at least 257 (bytes + EOD).
        out_path: where to write the tokenizer.json (written to a temp name, then renamed).
        overwrite: replace an existing `out_path`.

    Returns:
        The trained tokenizer, loaded from `out_path`.

    Raises:
        ValueError: vocab_size too small.
        FileExistsError: `out_path` exists and overwrite is false.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size: must be >= 257 (256 bytes + EOD), got {vocab_size}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists (pass overwrite to replace it)")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return HFTokenizer(out_path)
