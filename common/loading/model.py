"""A resolved model directory: its config.json and one tensor source over all its weights.

Opening a model reads config.json and weight-file headers (or data.pkl) only; tensor data
moves later, one `load()` at a time, so planning and dry runs stay cheap.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mksuite.common.errors import MissingTensorError, ModelNotFoundError, TensorFileError, did_you_mean
from mksuite.common.loading.companions import check_companions_parse, check_custom_code
from mksuite.common.loading.containment import check_companions_contained, contained, model_root
from mksuite.common.loading.hub import remote_repo
from mksuite.common.loading.pickle_source import PickleCheckpoint
from mksuite.common.loading.quantized import read_quantized
from mksuite.common.loading.remote import RemoteFile, RemoteRepo, RemoteSafetensorsFile
from mksuite.common.loading.safetensors_source import SafetensorsFile
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, byte_range, load_rows

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_EXPECTED_WEIGHTS = (
    "model.safetensors, model.safetensors.index.json with its shards, pytorch_model.bin, "
    "pytorch_model.bin.index.json with its shards, or a single *.safetensors file"
)


def open_tensor_file(path: str | os.PathLike) -> TensorSource:
    """One weight file, by extension: `.safetensors`, else a torch pickle (`.bin`, `.pt`, ...)."""
    path = Path(path)
    return SafetensorsFile(path) if path.suffix == ".safetensors" else PickleCheckpoint(path)


class ShardedSource(TensorSource):
    """Several weight files behind one name -> file map; each file is opened on first use."""

    def __init__(
        self,
        weight_map: Mapping[str, str | os.PathLike],
        *,
        described_by: str | os.PathLike | None = None,
    ):
        """`weight_map` maps tensor names to existing files; `described_by` (the index
        file, when there is one) is named in errors about the files."""
        self._weight_map = {name: Path(file) for name, file in weight_map.items()}
        self.described_by = Path(described_by) if described_by is not None else None
        self._open: dict[Path, TensorSource] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_index(
        cls, index_path: str | os.PathLike, *, root: Path | None = None, remote: RemoteRepo | None = None
    ) -> ShardedSource:
        """Read a `*.index.json`; every shard it names must exist next to it (or, with
        ``remote``, on the Hub: its header is read remotely, its data fetched on first use).

        With ``root``, every shard must also resolve inside it (no `../` or absolute names,
        no symlinks out of the model).
        """
        index_path = Path(index_path)
        index = _read_json(index_path, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TensorFileError(
                f"{index_path} has no valid `weight_map` (an object of tensor name -> shard file name)",
                path=str(index_path),
            )
        files = {}
        on_hub: dict[Path, str] = {}
        for shard in sorted(set(weight_map.values())):
            file = index_path.parent / shard
            if root is not None:
                contained(root, file, what=f"shard `{shard}` named by {index_path.name}:")
            if remote is not None and not file.is_file() and shard in remote:
                on_hub[file] = shard
            elif not file.is_file():
                raise TensorFileError(
                    f"{index_path} names shard {shard}, but {file} does not exist",
                    path=str(index_path),
                    hint="the download is incomplete or the index is stale; fetch the missing shard again",
                )
            files[shard] = file
        sharded = cls({name: files[shard] for name, shard in weight_map.items()}, described_by=index_path)
        if on_hub:
            # Headers of shards still on the Hub: one round trip each, so several at a time.
            with ThreadPoolExecutor(max_workers=min(8, len(on_hub))) as pool:
                opened = pool.map(lambda shard: remote_source(remote, shard), on_hub.values())
                sharded._open.update(zip(on_hub, opened, strict=True))
        return sharded

    @classmethod
    def from_files(cls, files: Iterable[str | os.PathLike | TensorSource]) -> ShardedSource:
        """Combine unindexed weight files by reading each one's tensor names (headers only).

        A file may also be given as an already opened source (a file still on the Hub).
        """
        weight_map: dict[str, Path] = {}
        opened: dict[Path, TensorSource] = {}
        given = {Path(f.path) if isinstance(f, TensorSource) else Path(f): f for f in files}
        for file in sorted(given):
            item = given[file]
            source = opened[file] = item if isinstance(item, TensorSource) else open_tensor_file(file)
            for name in source.names():
                if name in weight_map:
                    for other in opened.values():
                        other.close()
                    raise TensorFileError(
                        f"tensor `{name}` is stored in both {weight_map[name]} and {file}",
                        path=str(file),
                        hint="keep only one copy of the weights in the model directory",
                    )
                weight_map[name] = file
        combined = cls(weight_map)
        combined._open.update(opened)
        return combined

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def files(self) -> list[Path]:
        """The weight files, in first-use order of the map."""
        return list(dict.fromkeys(self._weight_map.values()))

    def info(self, name: str) -> TensorInfo:
        return self._shard_for(name).info(name)

    def load(self, name: str) -> torch.Tensor:
        return self._shard_for(name).load(name)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return load_rows(self._shard_for(name), name, start, stop)

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
        return byte_range(self._shard_for(name), name, rows)

    def remote_file(self, name: str) -> RemoteFile | None:
        """The Hub file tensor ``name`` will be read from (None when it is local)."""
        file = self._weight_map.get(name)
        locate = getattr(self._open.get(file), "remote_file", None) if file is not None else None
        return locate(name) if locate is not None else None

    def close(self) -> None:
        with self._lock:
            sources, self._open = list(self._open.values()), {}
        for source in sources:
            source.close()

    def _shard_for(self, name: str) -> TensorSource:
        try:
            file = self._weight_map[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor `{name}` is not in the weight map of {self.described_by or 'these weight files'}",
                hint=did_you_mean(name, self._weight_map),
            ) from None
        source = self._open.get(file)
        if source is None:
            with self._lock:  # one open per file even when reader threads race to it
                source = self._open.get(file)
                if source is None:
                    source = self._open[file] = open_tensor_file(file)
        if name not in source:
            raise TensorFileError(
                f"{self.described_by or 'the weight map'} says tensor `{name}` is in {file.name}, "
                "but that file does not contain it",
                path=str(file),
                hint="the index is stale or the shard is from another model; download the model again",
            )
        return source

    def __repr__(self) -> str:
        return f"ShardedSource({len(self._weight_map)} tensors in {len(self.files())} files)"


@dataclass
class ModelFiles:
    """What one resolved model directory offers: its raw config and its weights."""

    path: Path
    config: dict
    tensors: TensorSource

    def close(self) -> None:
        self.tensors.close()


def open_model(path: str | os.PathLike) -> ModelFiles:
    """Read config.json and index the weights of a model directory; no tensor data is read."""
    path = Path(path)
    config_path = path / "config.json"
    root = model_root(path)
    if os.path.lexists(config_path):
        contained(root, config_path, what="config")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a model directory",
            model=str(path),
            hint=_incomplete_snapshot_hint(path) or "point the reference at the directory holding config.json",
        )
    config = _read_json(config_path, "model config")
    if not isinstance(config, dict):
        raise TensorFileError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object", path=str(config_path)
        )
    check_companions_contained(path, root)
    check_companions_parse(path)
    check_custom_code(path, config)
    tensors = _open_weights(path, root, remote_repo(path))
    try:
        tensors = read_quantized(path, config, tensors)
    except BaseException:
        tensors.close()
        raise
    return ModelFiles(path=path, config=config, tensors=tensors)


def _open_weights(path: Path, root: Path, remote: RemoteRepo | None) -> TensorSource:
    """The model's weights; with ``remote``, safetensors files not in the cache stay on the Hub."""

    def inside(name: str) -> Path | None:
        file = path / name
        if not os.path.lexists(file):
            return None
        contained(root, file, what="weight file")
        return file if file.is_file() else None

    def safetensors(name: str) -> TensorSource | None:
        if local := inside(name):
            return SafetensorsFile(local)
        return remote_source(remote, name) if remote is not None and name in remote else None

    if index := inside(SAFETENSORS_INDEX):
        return ShardedSource.from_index(index, root=root, remote=remote)
    if single := safetensors("model.safetensors"):
        return single
    if index := inside(PICKLE_INDEX):
        return ShardedSource.from_index(index, root=root)
    if single := inside("pytorch_model.bin"):
        return PickleCheckpoint(single)
    names = {p.name for p in path.glob("*.safetensors")}
    names |= {n for n in (remote.sizes if remote is not None else ()) if "/" not in n and n.endswith(".safetensors")}
    loose = [source for name in sorted(names) if (source := safetensors(name)) is not None]
    if len(loose) == 1:
        return loose[0]
    if loose:
        return ShardedSource.from_files(loose)
    raise ModelNotFoundError(
        f"no weights in {path}",
        model=str(path),
        hint=" ".join(filter(None, [f"expected {_EXPECTED_WEIGHTS}.", _incomplete_snapshot_hint(path)])),
    )


def remote_source(remote: RemoteRepo, name: str) -> TensorSource:
    """A safetensors file still on the Hub (its header is read now, remotely)."""
    return RemoteSafetensorsFile(remote.file(name))


def _incomplete_snapshot_hint(path: Path) -> str | None:
    # Hub cache snapshots live at .../models--org--name/snapshots/<commit>; a partial one
    # is usually left by a tool that fetched only some files (or by an interrupted run).
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return "this Hub cache snapshot looks incomplete; run once with network access (HF_HUB_OFFLINE unset)"
    return None


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TensorFileError(f"cannot read {what} {path}: {error.strerror or error}", path=str(path)) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TensorFileError(f"{what} {path} is not valid JSON ({error})", path=str(path)) from None
    except RecursionError:
        raise TensorFileError(f"{what} {path} is JSON nested too deeply", path=str(path)) from None
