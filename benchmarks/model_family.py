"""Random Llama-shaped model families on disk, for benchmarks, written without building a model.

Tensors are generated one at a time from seeded generators and written shard by shard with
safetensors, so memory stays near one shard however large the model. Model 0 is the base
(N(0, 0.02) matrices, all-ones norms); model i > 0 is the base read back from disk plus seeded
N(0, delta_std^2) noise, so the family looks like a base and its fine-tunes.

    python benchmarks/model_family.py ROOT --size 1.1b --models 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BASE_STD = 0.02
DELTA_STD = 0.002
CHUNK_ELEMENTS = 1 << 22  # generation unit: one seeded generator per chunk, spread over threads
MARKER = ".family_complete.json"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    max_positions: int = 2048

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor (name, shape) in the order transformers saves a LlamaForCausalLM."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def n_params(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())


SIZES = {
    # 24 x 1280 with 4 KV heads: ~0.50B parameters, untied embeddings, head_dim 64
    "0.5b": LlamaShape(hidden=1280, intermediate=3456, layers=24, heads=20, kv_heads=4),
    # TinyLlama-1.1B
    "1.1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    # OpenLLaMA-3B
    "3b": LlamaShape(hidden=3200, intermediate=8640, layers=26, heads=32, kv_heads=32),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _seed(*parts: object) -> int:
    """A 63-bit generator seed from any parts: independent of tensor order and thread count."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_shards(shape: LlamaShape, dtype: torch.dtype, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors, in order, into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dims in shape.tensors():
        size = _numel(dims) * itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, dims))
        used += size
    return shards


def shard_filenames(n_shards: int) -> list[str]:
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n_shards:05d}.safetensors" for k in range(1, n_shards + 1)]


def _draw_normal_(flat: torch.Tensor, std: float, seed_parts: tuple, pool: ThreadPoolExecutor, *, add: bool) -> None:
    """Fill (or, with add, increment) `flat` with N(0, std^2), chunk by chunk on the pool.

    Chunk k draws from a generator seeded by (seed_parts, k): the bytes do not depend on threads.
    """

    def one_chunk(k: int) -> None:
        chunk = flat[k * CHUNK_ELEMENTS : (k + 1) * CHUNK_ELEMENTS]
        gen = torch.Generator().manual_seed(_seed(*seed_parts, k))
        if add:
            chunk.add_(torch.empty_like(chunk).normal_(0.0, std, generator=gen))
        else:
            chunk.normal_(0.0, std, generator=gen)

    list(pool.map(one_chunk, range((flat.numel() + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS)))


def _base_tensor(name: str, dims: tuple[int, ...], dtype: torch.dtype, seed: int, pool) -> torch.Tensor:
    if len(dims) == 1:  # RMSNorm scales start at one, as in a freshly initialized Llama
        return torch.ones(dims, dtype=dtype)
    out = torch.empty(dims, dtype=dtype)
    _draw_normal_(out.view(-1), BASE_STD, (seed, "base", name), pool, add=False)
    return out


def _config(shape: LlamaShape, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig  # imported here: seconds of import, only when writing

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def _write_model(
    out_dir: Path,
    shape: LlamaShape,
    dtype: torch.dtype,
    seed: int,
    index: int,
    base_dir: Path | None,
    shard_bytes: int,
    delta_std: float,
    pool: ThreadPoolExecutor,
) -> None:
    """Write one model's shards, index and config.json into out_dir; with base_dir, base + noise."""
    plan = plan_shards(shape, dtype, shard_bytes)
    names = shard_filenames(len(plan))
    weight_map: dict[str, str] = {}
    total = 0
    for shard, filename in zip(plan, names):
        tensors: dict[str, torch.Tensor] = {}
        base_file = safe_open(base_dir / filename, framework="pt") if base_dir is not None else None
        for name, dims in shard:
            if base_file is None:
                tensors[name] = _base_tensor(name, dims, dtype, seed, pool)
            else:
                t = base_file.get_tensor(name)  # a copy out of the mmap: adding in place spares the base
                _draw_normal_(t.view(-1), delta_std, (seed, "delta", index, name), pool, add=True)
                tensors[name] = t
            weight_map[name] = filename
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, out_dir / filename, metadata={"format": "pt"})
        del tensors, base_file  # drop this shard before generating the next
    if len(names) > 1:
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(_config(shape, dtype), indent=2, sort_keys=True) + "\n")


def _is_complete(path: Path, marker: dict) -> bool:
    """True when `path` was finished by this script with exactly these parameters."""
    if not path.exists():
        return False
    if not (path / MARKER).is_file():
        raise FileExistsError(
            f"{path} exists but was not written by {Path(__file__).name}; move it or pick another ROOT"
        )
    if json.loads((path / MARKER).read_text()) == marker:
        return True
    shutil.rmtree(path)  # ours, built with other parameters: rebuild
    return False


def build_llama_family(
    root: Path | str,
    size: str,
    n_models: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = 2_000_000_000,
    delta_std: float = DELTA_STD,
    threads: int | None = None,
) -> list[Path]:
    """Write (or reuse) root/llama-{size}-base and root/llama-{size}-ft{i}; return their paths.

    A model directory is built under a .partial name and renamed when complete, so an
    interrupted run leaves nothing that a rerun would mistake for a finished model.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if n_models < 1:
        raise ValueError("n_models must be at least 1 (the base)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shape = SIZES[size]
    paths = [root / f"llama-{size}-base"] + [root / f"llama-{size}-ft{i}" for i in range(1, n_models)]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for i, path in enumerate(paths):
            marker = {
                "shape": asdict(shape),
                "dtype": str(dtype),
                "seed": seed,
                "index": i,
                "shard_bytes": shard_bytes,
                "delta_std": delta_std if i else 0.0,
            }
            if _is_complete(path, marker):
                continue
            partial = path.with_name(path.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            _write_model(partial, shape, dtype, seed, i, paths[0] if i else None, shard_bytes, delta_std, pool)
            (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            partial.rename(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory to hold the model directories")
    parser.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    parser.add_argument("--models", type=int, default=3, help="base plus (models - 1) fine-tunes")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=2_000_000_000)
    parser.add_argument("--threads", type=int, default=None, help="generation threads (default: all cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_llama_family(
        args.root,
        args.size,
        args.models,
        dtype=getattr(torch, args.dtype),
        seed=args.seed,
        shard_bytes=args.shard_bytes,
        threads=args.threads,
    )
    elapsed = time.perf_counter() - start
    print(f"{len(paths)} x llama-{args.size} ({SIZES[args.size].n_params() / 1e9:.2f}B params) in {elapsed:.1f}s:")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
