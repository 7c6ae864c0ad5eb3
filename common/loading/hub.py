"""Turn a model reference into a directory: a local path, or a Hugging Face Hub snapshot.

The offline switch and the cache location are read from the environment on every call
(not when huggingface_hub was imported), so `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and
`HF_HOME` set by a test or a wrapper script take effect.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mksuite.common.errors import ModelNotFoundError, did_you_mean
from mksuite.common.loading.reference import ModelReference

# Config and every tokenizer file (mergekit's narrower set loses
# chat_template.jinja, merges.txt, vocab.txt), and the custom code an auto_map names (copied
# into outputs, never run); weights are added per repo.
CONFIG_PATTERNS = ("*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether the Hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    from_env = any(f is not None and f.strip().lower() in _TRUE for f in flags)
    return from_env or bool(hub_constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hub cache to use: `cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE).expanduser()


def resolve_model_path(ref: ModelReference, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding `ref.path` at `ref.revision` (its LoRA is not applied here).

    A local directory wins. Otherwise the path is a Hub repo id: online, the snapshot is
    downloaded with config/tokenizer files plus `*.safetensors` (or `*.bin` when the repo
    has no safetensors); offline, or when the Hub cannot be reached, an already-cached
    snapshot is used. Resolve an adapter with `resolve_model_path(ref.lora)`.
    """
    local = Path(ref.path).expanduser()
    if local.exists():
        if local.is_dir():
            return local
        raise ModelNotFoundError(
            f"model `{_named(ref)}`: {local} is a file, not a model directory",
            model=_named(ref),
            hint="point the reference at the directory that holds config.json and the weights",
        )
    cache = hub_cache_dir(cache_dir)
    if hub_offline():
        return _cached_snapshot(ref, cache, local, network_error=None)
    return _download_snapshot(ref, cache, local)


def _download_snapshot(ref: ModelReference, cache: Path, local: Path) -> Path:
    try:
        files = huggingface_hub.list_repo_files(ref.path, revision=ref.revision)
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise _hub_refused(ref, local, error) from None
    except Exception as error:  # network down or the Hub failing: the cache may still have it
        return _cached_snapshot(ref, cache, local, network_error=error)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    try:
        folder = huggingface_hub.snapshot_download(
            ref.path,
            revision=ref.revision,
            cache_dir=cache,
            allow_patterns=[*CONFIG_PATTERNS, weights],
        )
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise _hub_refused(ref, local, error) from None
    except Exception as error:
        return _cached_snapshot(ref, cache, local, network_error=error)
    return Path(folder)


def _cached_snapshot(ref: ModelReference, cache: Path, local: Path, *, network_error: Exception | None) -> Path:
    """The cached snapshot for the reference's revision, without contacting the Hub."""
    try:
        # Only config.json is required here: huggingface_hub checks the requested patterns
        # against its cached file listing, and older caches may lack some tokenizer files.
        folder = huggingface_hub.snapshot_download(
            ref.path,
            revision=ref.revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=["config.json"],
        )
    except HFValidationError as error:
        raise _invalid_repo_id(ref, local, error) from None
    except (LocalEntryNotFoundError, FileNotFoundError) as error:
        raise _not_cached(ref, cache, local, error, network_error) from None
    return Path(folder)


def _not_cached(
    ref: ModelReference, cache: Path, local: Path, error: Exception, network_error: Exception | None
) -> ModelNotFoundError:
    revision = ref.revision or "main"
    if network_error is None:
        message = (
            f"no cached snapshot of Hub repo `{ref.path}` at revision `{revision}` in {cache} "
            "(offline mode: HF_HUB_OFFLINE is set, so the Hub was not asked)"
        )
        hint = (
            "unset HF_HUB_OFFLINE and run with network access to download it, "
            "or point HF_HOME / HF_HUB_CACHE at a cache that has it"
        )
    else:
        reason = str(network_error).splitlines()[0] if str(network_error) else ""
        message = (
            f"the Hub could not be reached ({type(network_error).__name__}: {reason}) and {cache} "
            f"has no snapshot of `{ref.path}` at revision `{revision}`"
        )
        hint = (
            "check your network connection, or set HF_HUB_OFFLINE=1 "
            "with HF_HOME / HF_HUB_CACHE pointing at a cache that has it"
        )
    if "incomplete" in str(error):  # huggingface_hub knows the snapshot lacks files
        message += f"; {str(error).splitlines()[0]}"
    suggestion = _cached_repo_suggestion(ref.path, cache)
    return _not_found(ref, local, message, hint=" ".join(filter(None, [suggestion, hint])))


def _invalid_repo_id(ref: ModelReference, local: Path, error: Exception) -> ModelNotFoundError:
    return _not_found(ref, local, f"`{ref.path}` is not a valid Hub repo id either ({error})", hint=None)


def _hub_refused(ref: ModelReference, local: Path, error: Exception) -> ModelNotFoundError:
    if isinstance(error, HFValidationError):
        return _invalid_repo_id(ref, local, error)
    if isinstance(error, RevisionNotFoundError):
        message = f"Hub repo `{ref.path}` has no revision `{ref.revision}`"
        return _not_found(ref, local, message, hint="name an existing branch, tag or commit hash")
    if isinstance(error, GatedRepoError):
        hint = "accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
        return _not_found(ref, local, f"Hub repo `{ref.path}` is gated", hint=hint)
    hint = "check the spelling; for a private repo, log in (`hf auth login` or HF_TOKEN)"
    return _not_found(ref, local, f"the Hub has no repository `{ref.path}` visible to you", hint=hint)


def _not_found(ref: ModelReference, local: Path, message: str, *, hint: str | None) -> ModelNotFoundError:
    local_hint = _local_suggestion(local)
    return ModelNotFoundError(
        f"model `{_named(ref)}`: there is no local directory {local.absolute()}, and {message}",
        model=_named(ref),
        hint=" ".join(filter(None, [local_hint, hint or "check the path or repo id for typos"])),
    )


def _named(ref: ModelReference) -> str:
    return str(ModelReference(ref.path, ref.revision))


def _local_suggestion(local: Path) -> str | None:
    """A "did you mean" hint over the sibling entries of a missing local path."""
    parent = local.parent
    try:
        siblings = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return None
    return did_you_mean(local.name, siblings)


def _cached_repo_suggestion(repo_id: str, cache: Path) -> str | None:
    """A "did you mean" hint over the repo ids already in the cache (`models--org--name`)."""
    try:
        cached = [
            p.name[len("models--") :].replace("--", "/") for p in cache.iterdir() if p.name.startswith("models--")
        ]
    except OSError:
        return None
    return did_you_mean(repo_id, cached)
