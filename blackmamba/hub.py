"""Finding model files: a local directory or file, else the Hugging Face hub.

The hub is optional (`pip install blackmamba[hub]` installs huggingface_hub). Without it, or
offline, a hub id that is not already cached fails with a FileNotFoundError that says where to
put the files by hand. Nothing here imports huggingface_hub unless a hub id is actually used.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import NamedTuple, Optional

__all__ = ["ModelFiles", "resolve_model_dir", "embedded_model_dir", "embedded_heldout_text",
           "EMBEDDED_MODELS",
           "DEFAULT_MODEL", "resolve_model_files", "looks_like_repo_id",
           "cached_hub_file", "download_hub_file", "HUB_PATTERNS"]

# what a model needs from a hub repository (the released ones hold config.json and
# pytorch_model.bin only; the tokenizer comes from EleutherAI/gpt-neox-20b)
HUB_PATTERNS = ["config.json", "pytorch_model.bin", "*.safetensors", "tokenizer.json"]
# models shipped inside the package (blackmamba/models/<name>/); the first is the default of
# bm.load() and of the `generate` / `routing` commands
EMBEDDED_MODELS = ("shakespeare",)
DEFAULT_MODEL = EMBEDDED_MODELS[0]
_INSTALL_HINT = "`pip install blackmamba[hub]` enables downloading from the Hugging Face hub"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


class ModelFiles(NamedTuple):
    directory: pathlib.Path
    weights: pathlib.Path              # pytorch_model.bin / model.safetensors / an index
    config: Optional[pathlib.Path]     # config.json beside the weights, if present
    tokenizer: Optional[pathlib.Path]  # tokenizer.json beside the weights, if present


def looks_like_repo_id(s: str) -> bool:
    """"owner/name" with hub-legal characters (and not a path that exists locally)."""
    return bool(_REPO_ID.match(s)) and ".." not in s and not os.path.exists(s)


def _hub():
    """The huggingface_hub module, or None when it is not installed."""
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_found(repo_id: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"model {repo_id!r} is neither a local directory nor a local file, and {reason}. "
        f"Put config.json and pytorch_model.bin (as released on "
        f"https://huggingface.co/{repo_id}) in one directory and pass that directory's path; "
        f"{_INSTALL_HINT}.")


def _has_weights(d: pathlib.Path) -> bool:
    return any((d / n).is_file() for n in ("pytorch_model.bin", "model.safetensors",
                                          "model.safetensors.index.json"))


def embedded_model_dir(name: str = DEFAULT_MODEL) -> pathlib.Path:
    """The folder of a model shipped inside the package (EMBEDDED_MODELS)."""
    if name not in EMBEDDED_MODELS:
        raise FileNotFoundError(f"{name!r} is not a model shipped with blackmamba "
                                f"(those are: {', '.join(EMBEDDED_MODELS)})")
    d = pathlib.Path(__file__).resolve().parent / "models" / name
    if not _has_weights(d):
        raise FileNotFoundError(f"the embedded model {name!r} is missing from this install "
                                f"({d} holds no weights): reinstall blackmamba")
    return d


def embedded_heldout_text(name: str = DEFAULT_MODEL) -> pathlib.Path:
    """The held-out text shipped with an embedded model (never used in its training): the
    default corpus of `blackmamba routing` and `blackmamba perplexity`."""
    return embedded_model_dir(name) / "heldout.txt"


def resolve_model_dir(path_or_id=None) -> pathlib.Path:
    """Where a model is on disk: `path_or_id` itself when it is an existing directory or file
    (a file is a weights file; its parent directory holds config.json); None or the name of
    a model shipped with the package ("shakespeare") gives that model's folder; else a hub id
    "owner/name" fetched with huggingface_hub.snapshot_download (from the cache first), whose
    snapshot directory is returned."""
    if path_or_id is None:
        return embedded_model_dir()
    p = pathlib.Path(os.fspath(path_or_id)).expanduser()
    if p.is_dir() or p.is_file():
        return p
    s = os.fspath(path_or_id)
    if s in EMBEDDED_MODELS:
        return embedded_model_dir(s)
    if not looks_like_repo_id(s):
        raise FileNotFoundError(f"{s}: no such model directory or checkpoint file")
    hf = _hub()
    if hf is None:
        raise _not_found(s, "huggingface_hub is not installed")
    try:    # the cache first: no network, and works offline
        d = pathlib.Path(hf.snapshot_download(s, allow_patterns=HUB_PATTERNS,
                                              local_files_only=True))
        if _has_weights(d):
            return d
    except Exception:  # noqa: BLE001 - not cached (the error type varies across versions)
        pass
    if _offline():
        raise _not_found(s, "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        d = pathlib.Path(hf.snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: same advice
        raise _not_found(s, f"downloading it failed ({type(exc).__name__}: {exc})") from exc
    if not _has_weights(d):
        raise _not_found(s, f"the hub repository holds no pytorch_model.bin or "
                            f"model.safetensors (got {sorted(x.name for x in d.iterdir())})")
    return d


def resolve_model_files(path_or_id) -> ModelFiles:
    """Directory, weights file, config.json and tokenizer.json of a model. A file argument
    names the weights; its directory supplies config.json and tokenizer.json."""
    from .checkpoint import find_weights
    found = resolve_model_dir(path_or_id)
    d = found.parent if found.is_file() else found
    weights = found if found.is_file() else find_weights(d)
    config = d / "config.json"
    tok = d / "tokenizer.json"
    return ModelFiles(d, weights, config if config.is_file() else None,
                      tok if tok.is_file() else None)


def cached_hub_file(repo_id: str, filename: str) -> Optional[pathlib.Path]:
    """`filename` of `repo_id` from the local Hugging Face cache, or None (never networks)."""
    hf = _hub()
    if hf is None:
        return None
    try:
        hit = hf.try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache
        return None
    return pathlib.Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def download_hub_file(repo_id: str, filename: str) -> pathlib.Path:
    """Download `filename` of `repo_id`; FileNotFoundError saying why when it cannot."""
    hf = _hub()
    if hf is None:
        raise FileNotFoundError(f"huggingface_hub is not installed ({_INSTALL_HINT})")
    if _offline():
        raise FileNotFoundError(f"{repo_id}/{filename} is not cached and HF_HUB_OFFLINE is set")
    try:
        return pathlib.Path(hf.hf_hub_download(repo_id, filename))
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"downloading {repo_id}/{filename} failed "
                                f"({type(exc).__name__}: {exc})") from exc
