"""Shared test setup: offline Hugging Face, `tiny_models` importable, cached tiny model fixtures."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub or transformers, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def _cache_key(*args, **kw) -> str:
    """A directory name for one set of build arguments (reprs cover Paths and torch dtypes)."""
    text = repr(args) + repr(sorted(kw.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Factory `(arch, **build_family kwargs) -> (base, finetunes)`, built once per session per arguments.

    The directories are shared by every test that asks for the same arguments: treat them as
    read-only (copy with tiny_models.copy_model before modifying).
    """
    root = tmp_path_factory.mktemp("tiny_families")
    built: dict[str, tuple[Path, list[Path]]] = {}

    def make(arch: str, **kw) -> tuple[Path, list[Path]]:
        key = _cache_key(arch, **kw)
        if key not in built:
            from tiny_models import build_family  # lazy: transformers takes seconds to import

            built[key] = build_family(arch, root / f"{arch}-{key}", **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory `(arch, **build_model kwargs) -> path` of one model, built once per session per arguments.

    Shared like tiny_family: read-only.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def make(arch: str, **kw) -> Path:
        key = _cache_key(arch, **kw)
        if key not in built:
            from tiny_models import build_model

            built[key] = build_model(arch, root / f"{arch}-{key}", **kw)
        return built[key]

    return make


# Every way the engine reaches tensor bytes: whole loads, row blocks, and byte ranges that are
# copied file to file without being loaded.
_DATA_ACCESS = (
    ("SafetensorsFile", "load"),
    ("SafetensorsFile", "load_rows"),
    ("SafetensorsFile", "byte_range"),
    ("PickleCheckpoint", "load"),
)


def _watch_tensor_data(monkeypatch, on_access) -> None:
    import mksuite.common.loading as loading

    for class_name, method in _DATA_ACCESS:
        cls = getattr(loading, class_name)
        real = getattr(cls, method)

        def watched(self, name, *args, _real=real, **kwargs):
            on_access(name)
            return _real(self, name, *args, **kwargs)

        monkeypatch.setattr(cls, method, watched)


@pytest.fixture
def tensor_reads(monkeypatch):
    """Names of the tensors whose data was read or copied, in order (repeats included)."""
    reads: list[str] = []
    _watch_tensor_data(monkeypatch, reads.append)
    return reads


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Any access to tensor data fails the run (for errors that must be found before it)."""

    def refuse(name):
        raise AssertionError(f"tensor data was read ({name}) before the error was found")

    _watch_tensor_data(monkeypatch, refuse)


@pytest.fixture
def family(tiny_family):
    """A tiny llama base and two fine-tunes, ``(base, a, b)`` (shared and read-only)."""
    base, (a, b) = tiny_family("llama")
    return base, a, b
