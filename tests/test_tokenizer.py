"""blackmamba.tokenizer and blackmamba.hub: GPT-NeoX-20B encodes as SPEC section 6 says,
decoding is exact, streaming never cuts a character, missing files give useful errors."""
import pathlib
import shutil

import numpy as np
import pytest

from blackmamba import hub
from blackmamba import tokenizer as tk
from blackmamba.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer

import conftest

DATA = pathlib.Path(conftest.DATA)
NEOX = DATA / "gpt-neox-20b-tokenizer.json"
SHAKESPEARE = DATA / "tinyshakespeare.txt"

MIXED = ("héllo wörld — naïve café. 世界你好，日本語のテキスト。한국어 🙂🎉👩‍👩‍👧 "
         "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ «quotes» \t tabs\n\nnew    lines <|endoftext|> end")


@pytest.fixture(scope="module")
def neox():
    if not NEOX.exists() or not SHAKESPEARE.exists():
        pytest.fail(f"{NEOX} or {SHAKESPEARE} not found (set BLACKMAMBA_SHARED)")
    return HFTokenizer(NEOX)


def _shakespeare_samples(seed, n=5, length=2000):
    text = SHAKESPEARE.read_text()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - length, n)
    return [text[s:s + length] for s in starts]


def test_spec_checks(neox):
    assert neox.encode("Hello world") == [12092, 1533]
    assert neox.encode("    ") == [50274]
    assert neox.eos_id == 0 and neox.vocab_size == 50277
    assert neox.decode([0]) == "<|endoftext|>"
    assert neox.encode("<|endoftext|>") == [0]           # special token recognised, no BOS added
    assert isinstance(neox, tk.Tokenizer)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_shakespeare(neox, seed):
    for s in _shakespeare_samples(seed):
        ids = neox.encode(s)
        assert len(ids) < len(s) / 2                     # really BPE, not bytes
        assert neox.decode(ids) == s


def test_round_trip_unicode(neox):
    ids = neox.encode(MIXED)
    assert neox.decode(ids) == MIXED
    # numpy ids (what the sampler hands back) work too
    assert neox.decode(np.array(ids, dtype=np.int64)) == MIXED
    with pytest.raises(ValueError, match="outside"):
        neox.decode([50277])                             # padding rows of the embedding
    with pytest.raises(ValueError, match="outside"):
        neox.decode([-1])


def _stream(tok, ids, **kw):
    sd = StreamDecoder(tok, **kw)
    pieces = [sd.push(i) for i in ids]
    pieces.append(sd.flush())
    return pieces


def test_stream_decoder_unicode(neox):
    ids = neox.encode(MIXED)
    pieces = _stream(neox, ids)
    assert "".join(pieces) == neox.decode(ids) == MIXED
    assert not any("\ufffd" in p for p in pieces)
    # the emoji/CJK really are split across tokens, so some pushes must hold text back
    partial = [i for i in ids if "\ufffd" in neox.decode([i])]
    assert partial and pieces.count("") >= 2


@pytest.mark.parametrize("seed", [3, 4])
def test_stream_decoder_shakespeare(neox, seed):
    for s in _shakespeare_samples(seed, n=2, length=1500):
        ids = neox.encode(s)
        pieces = _stream(neox, ids)
        assert "".join(pieces) == s
        assert not any("\ufffd" in p for p in pieces)
        assert sum(1 for p in pieces if p) >= len(ids) * 0.9     # streams, not buffers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_decoder_random_ids_match_full_decode(neox, seed):
    # what an untrained model emits: arbitrary ids, invalid UTF-8 included
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, neox.vocab_size, 300).tolist()
    assert "".join(_stream(neox, ids)) == neox.decode(ids)
    # byte-fragment tokens only: long runs of incomplete and invalid UTF-8
    frag = [i for i in range(neox.vocab_size) if "\ufffd" in neox.decode([i])]
    assert len(frag) > 200
    ids = rng.choice(frag, 300).tolist()
    assert "".join(_stream(neox, ids)) == neox.decode(ids)


def test_byte_tokenizer():
    t = ByteTokenizer()
    assert t.vocab_size == 256 and t.eos_id == 0 and t.name == "byte"
    ids = t.encode(MIXED)
    assert ids == list(MIXED.encode("utf-8")) and t.decode(ids) == MIXED
    assert t.decode([0xE2, 0x82]) == "\ufffd"            # cut character: replaced, no error
    with pytest.raises(ValueError):
        t.decode([256])
    pieces = _stream(t, ids)
    assert "".join(pieces) == MIXED
    assert not any("\ufffd" in p for p in pieces)
    # every piece is whole characters: each multi-byte character arrives in one piece
    assert "🙂" in pieces and "世" in pieces


class _DecodeOnly:
    """A tokenizer that offers only the protocol (no token_bytes): the generic stream path."""

    def __init__(self, tok):
        self.tok, self.name, self.eos_id = tok, "decode-only", tok.eos_id
        self.vocab_size = tok.vocab_size

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


AWKWARD_BYTES = [
    [0xE2, 0x82, ord("a")],              # truncated 3-byte char then ASCII
    [0xFF, 0xFE, ord("b"), 0xF0, 0x9F],  # invalid bytes, then a truncated 4-byte char at the end
    [0x80] * 40,                         # 40 lone continuation bytes
    list("\ufffd\ufffd".encode()) * 10,  # literal U+FFFD characters (valid text ending in FFFD)
    list("a🙂".encode()) * 5 + [0xF0, 0x9F, 0x99],   # ends inside a character
]


@pytest.mark.parametrize("ids", AWKWARD_BYTES)
def test_stream_decoder_invalid_utf8(ids):
    t = ByteTokenizer()
    pieces = _stream(t, ids)
    assert "".join(pieces) == t.decode(ids)
    if ids is AWKWARD_BYTES[4]:          # whole characters go out at once, the cut one last
        assert [p for p in pieces[:-1] if p] == ["a", "🙂"] * 5 and pieces[-1] == "\ufffd"


@pytest.mark.parametrize("ids", AWKWARD_BYTES)
def test_generic_stream_decoder_pending_bound(ids):
    t = _DecodeOnly(ByteTokenizer())
    sd = StreamDecoder(t, max_pending=8)
    assert sd._token_bytes is None
    pieces = []
    for i in ids:
        pieces.append(sd.push(i))
        assert len(sd._ids) - sd._read < 8               # never more than max_pending held
    pieces.append(sd.flush())
    assert "".join(pieces) == t.decode(ids)
    assert sd.flush() == ""


def test_generic_stream_decoder_valid_text(neox):
    for tok in (_DecodeOnly(neox), _DecodeOnly(ByteTokenizer())):
        ids = tok.encode(MIXED)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == MIXED
        assert not any("\ufffd" in p for p in pieces)
        assert pieces.count("") >= 2


def test_token_bytes_agree_with_decode(neox):
    # the byte table behind streaming reproduces the tokenizer's own decoder for every id
    for i in range(neox.vocab_size):
        assert neox.token_bytes(i).decode("utf-8", "replace") == neox.decode([i]), i
    assert neox.token_bytes(50274) == b"    " and neox.token_bytes(0) == b"<|endoftext|>"
    with pytest.raises(ValueError):
        neox.token_bytes(50277)


def test_load_tokenizer_specs(tmp_path, monkeypatch, neox):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    monkeypatch.setattr(hub, "_hub", lambda: None)       # as if huggingface_hub were absent
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(model_dir=tmp_path)
    msg = str(e.value)
    assert "tokenizer.json" in msg and str(tmp_path) in msg and "blackmamba[hub]" in msg
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.json"))
    assert load_tokenizer(str(NEOX)).encode("Hello world") == [12092, 1533]
    shutil.copy(NEOX, tmp_path / "tokenizer.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert load_tokenizer(tmp_path).vocab_size == 50277                      # a directory
    assert load_tokenizer(model_dir=tmp_path).encode("    ") == [50274]      # beside ckpt
    assert load_tokenizer(model_dir=tmp_path / "pytorch_model.bin").eos_id == 0


def test_load_tokenizer_from_hub_cache(tmp_path, monkeypatch, neox):
    seen = []

    def cached(repo, filename):
        seen.append((repo, filename))
        return NEOX
    monkeypatch.setattr(hub, "cached_hub_file", cached)
    t = load_tokenizer(model_dir=tmp_path)               # no tokenizer.json there
    assert seen == [("EleutherAI/gpt-neox-20b", "tokenizer.json")]
    assert t.encode("Hello world") == [12092, 1533]


class _FakeHub:
    """Stands in for huggingface_hub: serves a prepared snapshot directory."""

    def __init__(self, snapshot, online=True):
        self.snapshot, self.online, self.calls = snapshot, online, []

    def snapshot_download(self, repo_id, allow_patterns=None, local_files_only=False):
        self.calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only or not self.online:
            raise OSError("not cached")
        return str(self.snapshot)


def test_resolve_model_dir_local(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert hub.resolve_model_dir(tmp_path) == tmp_path
    assert hub.resolve_model_dir(str(tmp_path / "pytorch_model.bin")) == \
        tmp_path / "pytorch_model.bin"                   # a file stays the file
    (tmp_path / "other.safetensors").write_bytes(b"x")
    assert hub.resolve_model_files(tmp_path / "other.safetensors").weights == \
        tmp_path / "other.safetensors"
    assert hub.resolve_model_files(tmp_path).weights == tmp_path / "pytorch_model.bin"
    files = hub.resolve_model_files(tmp_path / "pytorch_model.bin")
    assert files.weights == tmp_path / "pytorch_model.bin" and files.config is None
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model_files(tmp_path).config == tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match="no such model"):
        hub.resolve_model_dir(tmp_path / "missing" / "dir" / "x")


def test_resolve_model_dir_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_hub", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve_model_dir("Zyphra/BlackMamba-2.8B")
    msg = str(e.value)
    assert "config.json" in msg and "pytorch_model.bin" in msg and "blackmamba[hub]" in msg
    assert "huggingface.co/Zyphra/BlackMamba-2.8B" in msg

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "pytorch_model.bin").write_bytes(b"x")
    fake = _FakeHub(snap)
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.resolve_model_dir("Zyphra/BlackMamba-2.8B") == snap
    assert fake.calls[0][2] is True and fake.calls[1][2] is False        # cache, then network
    assert "pytorch_model.bin" in fake.calls[1][1] and "config.json" in fake.calls[1][1]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake.calls.clear()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        hub.resolve_model_dir("Zyphra/BlackMamba-2.8B")
    assert len(fake.calls) == 1                                          # never went online

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_hub", lambda: _FakeHub(snap, online=False))
    with pytest.raises(FileNotFoundError, match="downloading it failed"):
        hub.resolve_model_dir("Zyphra/BlackMamba-2.8B")
