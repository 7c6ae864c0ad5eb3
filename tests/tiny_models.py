"""Tiny random causal LMs on disk, for tests: configs, models, fine-tune families, tokenizers.

Every model is built by transformers itself and saved with save_pretrained, so the files have
exactly the tensor names, dtypes, and tying that real checkpoints of that architecture have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors.torch import load_file

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox")
FORMATS = ("safetensors", "sharded", "bin", "sharded_bin")

HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 128
SLIDING_WINDOW = 16

# Token ids fixed by the order of SPECIAL_TOKENS in tiny_tokenizer; configs point at them.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)

_SINGLE_FILE = "1000GB"  # a max_shard_size no tiny model reaches: one model.safetensors


def _llama_style(config_cls, layers, hidden, vocab, tie, **extra):
    """Kwargs for the configs that share Llama's field names."""
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    kwargs.update(extra)
    return config_cls, kwargs


def _gemma3_layer_types(layers: int) -> list[str]:
    # Real Gemma 3 puts a global layer after every five local ones; with three layers that
    # would be all-local, so use every third to keep both kinds present.
    return ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]


def tiny_config(
    arch: str,
    *,
    layers: int = 3,
    hidden: int = 32,
    vocab: int = 128,
    tie: bool | None = None,
    **overrides,
) -> transformers.PretrainedConfig:
    """A transformers config of `arch` at toy size; `tie=None` keeps the architecture's default.

    `overrides` are passed to the config class last, under that class's own field names.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if hidden % HEADS:
        raise ValueError(f"hidden={hidden} must be a multiple of {HEADS} heads")
    head_dim = hidden // HEADS
    full = ["full_attention"] * layers

    if arch == "llama":
        cls, kw = _llama_style(transformers.LlamaConfig, layers, hidden, vocab, tie, head_dim=head_dim)
    elif arch == "mistral":
        cls, kw = _llama_style(
            transformers.MistralConfig, layers, hidden, vocab, tie, head_dim=head_dim, sliding_window=SLIDING_WINDOW
        )
    elif arch == "qwen2":
        cls, kw = _llama_style(transformers.Qwen2Config, layers, hidden, vocab, tie, layer_types=full)
    elif arch == "qwen3":
        cls, kw = _llama_style(
            transformers.Qwen3Config, layers, hidden, vocab, tie, head_dim=head_dim, layer_types=full
        )
    elif arch == "gemma2":
        sliding = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cls, kw = _llama_style(
            transformers.Gemma2Config,
            layers,
            hidden,
            vocab,
            tie,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=SLIDING_WINDOW,
            layer_types=sliding,
        )
    elif arch == "gemma3":
        cls, kw = _llama_style(
            transformers.Gemma3TextConfig,
            layers,
            hidden,
            vocab,
            tie,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=SLIDING_WINDOW,
            layer_types=_gemma3_layer_types(layers),
        )
    elif arch == "phi3":
        cls, kw = _llama_style(
            transformers.Phi3Config, layers, hidden, vocab, tie, original_max_position_embeddings=MAX_POSITIONS
        )
    elif arch == "gpt2":
        cls = transformers.GPT2Config
        kw = dict(
            vocab_size=vocab,
            n_embd=hidden,
            n_inner=2 * hidden,
            n_layer=layers,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        if tie is not None:
            kw["tie_word_embeddings"] = tie
    else:  # gpt_neox
        cls, kw = _llama_style(transformers.GPTNeoXConfig, layers, hidden, vocab, tie)
        del kw["num_key_value_heads"]  # GPT-NeoX has no grouped-query attention
    kw.update(overrides)
    return cls(**kw)


# --- tokenizer ---------------------------------------------------------------------------------

_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.
A model is a set of weights and a config that says how the weights fit together.
When two models share a base, their weights can be merged by averaging, by task vectors,
or by choosing the largest changes and keeping only the signs that agree.
Every layer has attention and a feed forward block; the attention looks back at earlier tokens
and the feed forward block mixes the features of each token on its own.
In the morning the farmer walks to the field, counts the sheep, and opens the gate to the river.
She reads a book about the history of ships, stars, maps, and the people who made them.
Small tests build small models, run the whole program, and check that the numbers are right.
It was a bright cold day in April, and the clocks were striking thirteen across the town square.
We write code that is easy to read, easy to test, and honest about what it does not know.
One, two, three, four, five, six, seven, eight, nine, ten: the children count and laugh and run.
The river flows past the old mill, under the stone bridge, and out into the wide green valley.
Numbers and letters, words and sentences, questions and answers fill the pages of the notebook.
"""

_TRAINED: dict[int, tokenizers.Tokenizer] = {}  # trained once per vocab size per process


def _train_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # a small alphabet leaves room for merges in 128 ids
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=max(1, (vocab_size - len(SPECIAL_TOKENS)) // 2),
        show_progress=False,
    )
    words = _TRAINING_TEXT.split()
    tok.train_from_iterator([" ".join(words[i : i + 12]) for i in range(0, len(words), 12)], trainer=trainer)
    return tok


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A BPE tokenizer of at most `vocab_size` ids, trained in milliseconds on built-in text."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special tokens")
    if vocab_size not in _TRAINED:
        _TRAINED[vocab_size] = _train_tokenizer(vocab_size)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_TRAINED[vocab_size],  # copied by the wrapper, so the cache stays pristine
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )


# --- building models -----------------------------------------------------------------------------


def _perturb_(model: torch.nn.Module, seed: int, perturb: float) -> None:
    """Add seeded N(0, (perturb * tensor std)^2) noise to every float parameter, in name order."""
    gen = torch.Generator().manual_seed(seed)
    # named_parameters() lists a tied embedding once, so it gets one dose of noise, not two.
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not param.is_floating_point():
                continue
            std = param.float().std().item() if param.numel() > 1 else 0.0
            scale = std if std > 0 else 1.0  # norms start as all-ones (std 0) and still need to move
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.add_((noise * (perturb * scale)).to(param.dtype))


def _safetensors_to_bin(out_dir: Path) -> None:
    """Rewrite the safetensors files save_pretrained wrote as pytorch_model*.bin (+ index)."""
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        renames = {
            f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for f in set(index["weight_map"].values())
        }
        for old, new in renames.items():
            torch.save(load_file(out_dir / old), out_dir / new)
            (out_dir / old).unlink()
        index["weight_map"] = {name: renames[f] for name, f in index["weight_map"].items()}
        (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        index_path.unlink()
    else:
        torch.save(load_file(out_dir / "model.safetensors"), out_dir / "pytorch_model.bin")
        (out_dir / "model.safetensors").unlink()


def build_model(
    arch: str,
    out_dir: Path | str,
    *,
    seed: int = 0,
    layers: int = 3,
    hidden: int = 32,
    vocab: int = 128,
    tie: bool | None = None,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
    shard_size: str | int = "20KB",
    base: Path | str | None = None,
    perturb: float = 0.02,
    tokenizer: bool = True,
) -> Path:
    """Save a complete, loadable random model of `arch` in `out_dir` and return the path.

    With `base`, the model is that base plus seeded relative noise (a "fine-tune"); the base's
    own config wins then, so `arch`, `layers`, `hidden`, `vocab` and `tie` are ignored.
    `fmt`: "safetensors" (one file), "sharded" (safetensors shards of `shard_size`), "bin",
    "sharded_bin" (pickled state dicts, written by us because transformers 5 saves only safetensors).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if base is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        _perturb_(model, seed, perturb)
        vocab_size = model.config.vocab_size
    else:
        config = tiny_config(arch, layers=layers, hidden=hidden, vocab=vocab, tie=tie)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        vocab_size = vocab

    sharded = fmt in ("sharded", "sharded_bin")
    model.to(dtype).save_pretrained(out_dir, max_shard_size=shard_size if sharded else _SINGLE_FILE)
    if sharded and not (out_dir / "model.safetensors.index.json").exists():
        raise ValueError(f"shard_size={shard_size!r} is larger than the whole model; the output was not sharded")
    if fmt in ("bin", "sharded_bin"):
        _safetensors_to_bin(out_dir)
    if tokenizer:
        tiny_tokenizer(vocab_size).save_pretrained(out_dir)
    return out_dir


def build_family(arch: str, root: Path | str, n_finetunes: int = 2, **kw) -> tuple[Path, list[Path]]:
    """A base model under root/base and `n_finetunes` perturbed copies under root/ft1, root/ft2, ...

    Fine-tune i draws its noise with seed `seed + i`, so the family is reproducible and every
    member differs from the others.
    """
    root = Path(root)
    seed = kw.pop("seed", 0)
    base = build_model(arch, root / "base", seed=seed, **kw)
    finetunes = [build_model(arch, root / f"ft{i}", seed=seed + i, base=base, **kw) for i in range(1, n_finetunes + 1)]
    return base, finetunes


# --- reading models back -------------------------------------------------------------------------


def load_causal_lm(path: Path | str) -> transformers.PreTrainedModel:
    """Load a saved model in float32, eval mode, with eager attention.

    Eager attention runs every architecture here (Gemma 2's soft-capping included) the same way on CPU.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Next-token logits [len(token_ids), vocab] for one unpadded sequence."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


def read_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor stored in a model directory: single or sharded safetensors, or .bin files."""
    path = Path(path)
    st_files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if st_files:
        for f in st_files:
            tensors.update(load_file(f))
    else:
        for f in sorted(path.glob("pytorch_model*.bin")):
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not tensors:
        raise FileNotFoundError(f"no .safetensors or pytorch_model*.bin files in {path}")
    return tensors


def copy_model(src: Path | str, dst: Path | str) -> Path:
    """Copy a built model directory (so a test may modify it without touching a cached one)."""
    return Path(shutil.copytree(src, dst))
