"""Tokenizers: GPT-NeoX-20B BPE (what BlackMamba was trained with) and a byte tokenizer.

The model's vocabulary (50304 embedding rows) is larger than the tokenizer's (50277 real
tokens, ids 0..50276): rows 50277.. are padding and must never be sampled; `vocab_size` here
is the count of real tokens, so a sampler masks logits[..., tokenizer.vocab_size:].

StreamDecoder turns generated ids into text pieces as they arrive without ever splitting a
UTF-8 character: byte-level BPE tokens can end inside a multi-byte character, and decoding
such a prefix yields U+FFFD until the rest of the character arrives. Tokenizers that can say
which bytes a token stands for (`token_bytes`: both here) are streamed through an incremental
UTF-8 decoder, exact by construction; others by re-decoding the pending ids.
"""
from __future__ import annotations

import codecs
import os
import pathlib
from typing import List, Protocol, Sequence, runtime_checkable

from . import hub

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "StreamDecoder", "load_tokenizer",
           "DEFAULT_TOKENIZER_REPO"]

DEFAULT_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"
_REPLACEMENT = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int       # real tokens; ids are 0 .. vocab_size-1
    eos_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _check_ids(ids, vocab_size, name) -> List[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} outside the {name} tokenizer's vocabulary "
                         f"[0, {vocab_size})")
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): for tests and byte-level toy models. eos is 0."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(_check_ids(ids, 256, self.name)).decode("utf-8", errors="replace")

    def token_bytes(self, token_id) -> bytes:
        return bytes(_check_ids([token_id], 256, self.name))

    def __repr__(self):
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (GPT-NeoX-20B: eos 0, 50277 real tokens).

    encode adds no special tokens (a base model: no BOS, no template); decode keeps special
    tokens, so decode(encode(s)) == s for NFC-normalised text (the tokenizer NFC-normalises
    its input).
    """

    def __init__(self, path, eos_token=None):
        from tokenizers import Tokenizer as _HF
        self.path = pathlib.Path(path)
        self._tok = _HF.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = [eos_token] if eos_token else ["<|endoftext|>", "</s>", "<eos>", "<|eos|>"]
        ids = [self._tok.token_to_id(t) for t in candidates]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"{self.path}: no end-of-text token among {candidates}; pass "
                             "eos_token=")
        self.eos_id = ids[0]
        self.name = self.path.parent.name if self.path.name == "tokenizer.json" else \
            self.path.stem
        from tokenizers import decoders
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self._bytes = None     # id -> bytes, built on first use of token_bytes

    def token_bytes(self, token_id) -> bytes:
        """The bytes token `token_id` decodes to (byte-level BPE only; else TypeError).
        decode(ids) == b"".join(token_bytes(i) for i in ids).decode("utf-8", "replace")."""
        if not self._byte_level:
            raise TypeError(f"{self.name}: token_bytes needs a byte-level BPE tokenizer")
        if self._bytes is None:
            self._bytes = _byte_level_table(self._tok, self.vocab_size)
        return self._bytes[_check_ids([token_id], self.vocab_size, self.name)[0]]

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size, self.name),
                                skip_special_tokens=False)

    def __repr__(self):
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _byte_level_table(tok, vocab_size) -> List[bytes]:
    """Bytes of every id, as the `tokenizers` ByteLevel decoder computes them: a token's
    characters map back through GPT-2's byte<->unicode alphabet; a token with characters
    outside it (added tokens such as runs of spaces) stands for its own UTF-8."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in char_to_byte.values():
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    table = []
    for i in range(vocab_size):
        token = tok.id_to_token(i) or ""
        try:
            table.append(bytes(char_to_byte[c] for c in token))
        except KeyError:
            table.append(token.encode("utf-8"))
    return table


def load_tokenizer(spec=None, model_dir=None) -> Tokenizer:
    """The tokenizer to use.

    spec: "byte" -> ByteTokenizer; a tokenizer.json path (or a directory holding one); a hub
          id "owner/name" (its tokenizer.json, from the cache or downloaded); None -> the
          tokenizer.json beside the checkpoint in `model_dir`, else GPT-NeoX-20B's from the
          Hugging Face cache, else downloaded (huggingface_hub installed and online).
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec is not None:
        p = pathlib.Path(os.fspath(spec)).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if p.is_file():
            return HFTokenizer(p)
        if hub.looks_like_repo_id(os.fspath(spec)):
            return HFTokenizer(_hub_tokenizer(os.fspath(spec)))
        raise FileNotFoundError(f"tokenizer {os.fspath(spec)!r}: no such file (expected "
                                "'byte', a tokenizer.json path, or a hub id)")
    where = None
    if model_dir is not None:
        d = pathlib.Path(model_dir)
        d = d.parent if d.is_file() else d
        if (d / "tokenizer.json").is_file():
            return HFTokenizer(d / "tokenizer.json")
        where = d
    return HFTokenizer(_hub_tokenizer(DEFAULT_TOKENIZER_REPO, where))


def _hub_tokenizer(repo_id, model_dir=None) -> pathlib.Path:
    cached = hub.cached_hub_file(repo_id, "tokenizer.json")
    if cached is not None:
        return cached
    try:
        return hub.download_hub_file(repo_id, "tokenizer.json")
    except FileNotFoundError as exc:
        beside = f"next to the checkpoint ({model_dir / 'tokenizer.json'}), " if model_dir \
            else "next to the checkpoint, "
        raise FileNotFoundError(
            f"no tokenizer found: {exc}. Put {repo_id}'s tokenizer.json "
            f"(https://huggingface.co/{repo_id}/blob/main/tokenizer.json) {beside}or pass its "
            "path explicitly (--tokenizer PATH), or install huggingface_hub "
            "(pip install blackmamba[hub]) to fetch it.") from exc


class StreamDecoder:
    """Incremental detokenizer: push(id) -> text piece (possibly ""), flush() -> the rest.

    The pieces never split a UTF-8 character, and their concatenation equals
    tokenizer.decode(all ids).

    Tokenizers with `token_bytes` (byte-level BPE, bytes) go through an incremental UTF-8
    decoder: a piece is released as soon as its characters are complete, and invalid bytes
    become U+FFFD exactly as a one-shot decode makes them.

    Others: the pending ids are re-decoded together with the previous piece's ids (some
    tokenizers decode a token differently after a neighbour) and released once their text no
    longer ends in U+FFFD. `max_pending` bounds the wait for text that really ends in U+FFFD;
    a release forced by it can differ from a one-shot decode in how invalid bytes are
    replaced (never for valid text).
    """

    def __init__(self, tokenizer, max_pending=16):
        self.tokenizer = tokenizer
        self.max_pending = max_pending
        self._token_bytes = getattr(tokenizer, "token_bytes", None)
        if self._token_bytes is not None:
            try:
                self._token_bytes(tokenizer.eos_id)
            except TypeError:            # e.g. an HFTokenizer that is not byte-level
                self._token_bytes = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: List[int] = []
        self._prefix = 0      # start of the previous piece's ids: decoding context
        self._read = 0        # ids before this are emitted
        self._prefix_text = ""

    def push(self, token_id) -> str:
        if self._token_bytes is not None:
            return self._utf8.decode(self._token_bytes(int(token_id)))
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids[self._prefix:])
        pending = len(self._ids) - self._read
        if text.endswith(_REPLACEMENT) and pending < self.max_pending:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        if self._token_bytes is not None:
            return self._utf8.decode(b"", final=True)
        if self._read == len(self._ids):
            return ""
        return self._emit(self.tokenizer.decode(self._ids[self._prefix:]))

    def _emit(self, text) -> str:
        # the previous piece ended on a whole character, so `text` starts with it unchanged
        # and the new text is what follows
        piece = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self.tokenizer.decode(self._ids[self._prefix:])
        return piece

    def reset(self):
        self.__init__(self.tokenizer, self.max_pending)
