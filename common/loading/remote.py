"""Weight files that are still on the Hub: headers read with range requests, data fetched on first use.

Planning a Hub model needs only its config and the safetensors headers; a header is the
first bytes of its file, so it is read with HTTP range requests and no weights move. The
file itself is downloaded (into the ordinary Hugging Face cache, through huggingface_hub)
the first time one of its tensors is loaded, or earlier by a :class:`Prefetcher` that
fetches the files a run needs, in the order the run needs them, while it computes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mksuite.common.errors import MissingTensorError, MkError, TensorFileError, did_you_mean
from mksuite.common.loading.safetensors_source import SafetensorsFile, read_header
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, byte_range, load_rows

log = logging.getLogger(__name__)

# The first request for a header asks for this many bytes: almost every header fits, so
# one round trip usually suffices (the length field says when a second one is needed).
FIRST_HEADER_BYTES = 100_000
# How often a header read answered 429/5xx (or cut off) is retried, with backoff from 1 s.
HEADER_RETRIES = 3
# Seconds to wait for the Hub to answer a metadata or range request before giving up.
HUB_TIMEOUT = 10.0


@dataclass
class RemoteRepo:
    """One repository at one commit on a Hub endpoint, and where its files are cached."""

    repo_id: str
    commit: str
    endpoint: str
    cache: Path
    sizes: dict[str, int]  # file name -> bytes, from the Hub's listing
    snapshot: Path  # cache/models--org--name/snapshots/<commit>
    _files: dict[str, RemoteFile] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __contains__(self, name: object) -> bool:
        return name in self.sizes

    def file(self, name: str) -> RemoteFile:
        """The one download state of ``name`` (shared by every source that reads it)."""
        with self._lock:
            if name not in self._files:
                self._files[name] = RemoteFile(self, name, self.sizes[name])
            return self._files[name]

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a file on the Hub (a range request; a busy Hub is asked again)."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        headers = {**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
        try:
            response = http_backoff(
                "GET",
                self.url(name),
                headers=headers,
                timeout=HUB_TIMEOUT,
                follow_redirects=True,
                max_retries=HEADER_RETRIES,
            )
            hf_raise_for_status(response)
        except Exception as error:  # network, HTTP and offline errors all mean the same here
            raise self.failed(name, "reading the header of", error) from None
        data = response.content
        if response.status_code == 200:  # a server that ignores Range sends the whole file
            data = data[start:stop]
        return data

    def download(self, name: str) -> Path:
        """The cached file ``name``, downloaded first when it is not in the cache yet."""
        import huggingface_hub

        log.info("downloading %s from %s (%s bytes)", name, self.repo_id, self.sizes.get(name))
        try:
            path = huggingface_hub.hf_hub_download(
                self.repo_id,
                name,
                revision=self.commit,
                cache_dir=self.cache,
                endpoint=self.endpoint,
                etag_timeout=HUB_TIMEOUT,
            )
        except Exception as error:
            raise self.failed(name, "downloading", error) from None
        return Path(path)

    def failed(self, name: str, doing: str, error: Exception) -> MkError:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return MkError(
            f"{doing} `{name}` of Hub repo `{self.repo_id}` (commit {self.commit[:12]}) failed: {reason}",
            hint="check the network connection and run again; files already downloaded stay in the cache",
        )


class RemoteFile:
    """One file of a :class:`RemoteRepo`: downloaded at most once, by whichever thread asks first."""

    def __init__(self, repo: RemoteRepo, name: str, size: int):
        self.repo, self.name, self.size = repo, name, size
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._error: MkError | None = None

    @property
    def ready(self) -> bool:
        return self._path is not None

    def fetch(self) -> Path:
        """The local copy; downloads it, or waits for the thread downloading it."""
        if self._path is not None:
            return self._path
        with self._lock:
            if self._path is None and self._error is None:
                try:
                    self._path = self.repo.download(self.name)
                except MkError as error:
                    self._error = error
        if self._error is not None:
            raise self._error
        return self._path  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"RemoteFile({self.repo.repo_id}/{self.name}, {self.size} bytes)"


class RemoteSafetensorsFile(TensorSource):
    """A safetensors file on the Hub: header read remotely at open, data read from the cache."""

    def __init__(self, remote: RemoteFile):
        self.remote = remote
        self.path = remote.repo.snapshot / remote.name  # where it will be (named in errors)
        label = f"{remote.repo.repo_id}/{remote.name}"
        head: list[bytes] = []  # the first FIRST_HEADER_BYTES, fetched by the first read

        def read(count: int, offset: int) -> bytes:
            if not head:
                head.append(remote.repo.read_range(remote.name, 0, min(remote.size, FIRST_HEADER_BYTES)))
            if offset + count <= len(head[0]):
                return head[0][offset : offset + count]
            return remote.repo.read_range(remote.name, offset, offset + count)

        self.metadata, self._entries, self._data_start = read_header(read, remote.size, label)
        self._local: SafetensorsFile | None = None
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        if name not in self._entries:
            raise MissingTensorError(
                f"tensor `{name}` is not in {self.path}", hint=did_you_mean(name, self._entries)
            ) from None
        return self._entries[name][0]

    def load(self, name: str) -> torch.Tensor:
        return self._opened().load(name)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return load_rows(self._opened(), name, start, stop)

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
        # Only once the file is here: a verbatim copy must not wait for a download the
        # prefetcher has not reached yet (the tensor is then loaded and written instead).
        if self._local is None and not self.remote.ready:
            return None
        return byte_range(self._opened(), name, rows)

    def remote_file(self, name: str) -> RemoteFile | None:
        return self.remote if name in self._entries else None

    def close(self) -> None:
        with self._lock:
            local, self._local = self._local, None
        if local is not None:
            local.close()

    def _opened(self) -> SafetensorsFile:
        if self._local is not None:
            return self._local
        path = self.remote.fetch()
        with self._lock:
            if self._local is None:
                local = SafetensorsFile(path)
                if local._entries != self._entries or local._data_start != self._data_start:
                    local.close()
                    raise TensorFileError(
                        f"the downloaded {path} does not match the header read from the Hub before",
                        path=str(path),
                        hint="delete it from the Hugging Face cache and run again",
                    )
                self._local = local
            return self._local

    def __repr__(self) -> str:
        state = "cached" if self.remote.ready else "on the Hub"
        return f"RemoteSafetensorsFile({self.remote.repo.repo_id}/{self.remote.name}, {state})"


def remote_file_of(source: object, name: str) -> RemoteFile | None:
    """The Hub file a source would read tensor ``name`` from, or None (local, or unknown)."""
    seen = 0
    while source is not None and seen < 8:  # through adapter and dequantizing wrappers
        locate = getattr(source, "remote_file", None)
        if locate is not None:
            return locate(name)
        source = getattr(source, "base", None) or getattr(source, "inner", None)
        seen += 1
    return None


class Prefetcher:
    """Downloads ``files`` one after another on a background thread, in the order given.

    Reader threads that need a file ask it with :meth:`RemoteFile.fetch`, which waits for
    the download in progress (or starts its own): so tensors whose files are here are
    computed while later files still download. A failure is not raised here; the reader
    that needs the file meets it.
    """

    def __init__(self, files: Iterable[RemoteFile]):
        self.files = [f for f in dict.fromkeys(files) if not f.ready]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mksuite-hub-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        if self.files:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # a download in progress finishes; no further one starts

    def _run(self) -> None:
        for file in self.files:
            if self._stop.is_set():
                return
            try:
                file.fetch()
            except MkError:
                return
