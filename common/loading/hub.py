"""Turn a model reference into a directory: a local path, or a Hugging Face Hub snapshot.

A Hub snapshot is planned from without its weights: only config, tokenizer and index files
are downloaded; safetensors weights are read remotely (headers) and fetched when needed
(common/loading/remote.py).

The offline switch and the cache location are read from the environment on every call
(not when huggingface_hub was imported), so `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and
`HF_HOME` set by a test or a wrapper script take effect.
"""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mksuite.common.errors import ModelFileError, ModelNotFoundError, did_you_mean
from mksuite.common.loading.lora_format import ADAPTER_WEIGHTS
from mksuite.common.loading.reference import ModelReference
from mksuite.common.loading.remote import HUB_TIMEOUT, RemoteRepo

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


def hub_endpoint() -> str:
    """The Hub to ask: HF_ENDPOINT read now (a test's local server), else huggingface_hub's default."""
    return (os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT).rstrip("/")


# Per process: a reference resolves once (the vocabulary planner and the output guard ask
# again), Hub snapshots know their remote weights, and Hub inputs the commit they were read at.
_RESOLVED: dict[tuple, Path] = {}
_REMOTE: dict[Path, RemoteRepo] = {}
_COMMITS: dict[tuple[str, str | None], str] = {}


def resolve_model_path(ref: ModelReference, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding `ref.path` at `ref.revision` (its LoRA is not applied here).

    A local directory wins. Otherwise the path is a Hub repo id. Online, the revision is
    resolved to a commit and only the small files (config, tokenizer, weight index, custom
    code) are downloaded into the cache snapshot; safetensors weights stay on the Hub until
    a tensor of theirs is loaded (:func:`remote_repo` says which, for :func:`open_model`).
    A repo with only pickled weights has them downloaded here (their tensor names cannot be
    read remotely). Offline, or when the Hub cannot be reached, an already-cached snapshot
    is used. Resolve an adapter with `resolve_model_path(ref.lora)`.
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
    offline = hub_offline()
    key = (ref.path, ref.revision, str(cache), hub_endpoint(), offline)
    if key not in _RESOLVED:
        if offline:
            _RESOLVED[key] = _cached_snapshot(ref, cache, local, network_error=None)
        else:
            _RESOLVED[key] = _resolve_on_hub(ref, cache, local)
    return _RESOLVED[key]


def remote_repo(path: str | os.PathLike) -> RemoteRepo | None:
    """The Hub repository whose weights a resolved snapshot directory still has to fetch."""
    return _REMOTE.get(Path(path))


def hub_commit(path: str, revision: str | None = None) -> str | None:
    """The commit a Hub reference (`path`, `revision`) was read at in this process, if it was."""
    return _COMMITS.get((path, revision))


def _resolve_on_hub(ref: ModelReference, cache: Path, local: Path) -> Path:
    endpoint = hub_endpoint()
    try:
        info = huggingface_hub.HfApi(endpoint=endpoint).model_info(
            ref.path, revision=ref.revision, files_metadata=True, timeout=HUB_TIMEOUT
        )
    except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise _hub_refused(ref, local, error) from None
    except Exception as error:  # network down or the Hub failing: the cache may have it
        return _cached_snapshot(ref, cache, local, network_error=error)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    snapshot = cache / repo_folder_name(repo_id=ref.path, repo_type="model") / "snapshots" / str(info.sha)
    repo = RemoteRepo(ref.path, str(info.sha), endpoint, cache, sizes, snapshot)
    small = [name for name in sizes if any(fnmatch(name, pattern) for pattern in CONFIG_PATTERNS)]
    if not any(name.endswith(".safetensors") for name in sizes):
        small += [name for name in sizes if name.endswith(".bin")]  # pickles: no remote header to read
    if "adapter_config.json" in sizes:  # a LoRA adapter: small, and read whole to apply it
        small += [name for name in ADAPTER_WEIGHTS if name in sizes]
    for name, size in sizes.items():
        if size is None and name.endswith(".safetensors"):  # a listing without sizes: ask (HEAD)
            sizes[name] = _remote_size(repo, name)
    for name in small:
        _check_repo_name(ref, name)
        repo.download(name)
    _remember_revision(snapshot.parent.parent, ref.revision, repo.commit)
    snapshot.mkdir(parents=True, exist_ok=True)
    _REMOTE[snapshot] = repo
    _COMMITS[(ref.path, ref.revision)] = repo.commit
    return snapshot


def _check_repo_name(ref: ModelReference, name: str) -> None:
    """A file name from the Hub's listing must stay inside the snapshot it is stored in."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or "\\" in name:
        raise ModelFileError(
            f"Hub repo `{ref.path}` lists a file named `{name}`, which would be stored outside its folder",
            path=name,
            hint="files are only read from inside the model's repository",
        )


def _remote_size(repo: RemoteRepo, name: str) -> int:
    try:
        size = huggingface_hub.get_hf_file_metadata(repo.url(name), timeout=HUB_TIMEOUT).size
    except Exception as error:
        raise repo.failed(name, "asking the size of", error) from None
    return int(size or 0)


def _remember_revision(repo_dir: Path, revision: str | None, commit: str) -> None:
    """Record branch/tag -> commit as huggingface_hub does, so an offline run finds the snapshot."""
    revision = revision or "main"
    if revision == commit or revision.startswith("/") or ".." in PurePosixPath(revision).parts:
        return
    ref_file = repo_dir / "refs" / revision
    try:
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        if not ref_file.is_file() or ref_file.read_text() != commit:
            ref_file.write_text(commit)
    except OSError:  # a read-only cache: only later offline runs lose out
        pass


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
    _COMMITS[(ref.path, ref.revision)] = Path(folder).name  # a snapshot folder is named by its commit
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
