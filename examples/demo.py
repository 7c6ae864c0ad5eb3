"""End-to-end demo: build tiny local models, run every example recipe, load and generate.

    python examples/demo.py [WORKDIR]

Builds a 4-layer Llama base and three "fine-tunes" (the base plus small seeded noise; ft-chat
also adds two chat tokens) under WORKDIR/models with transformers' own classes, then runs
`mkmerge` on each recipe in examples/ and examples/multistage/ (`mkstack` for the stack_*
recipes) and `mkmoe` on each config in examples/moe/, from WORKDIR, loads every output with
transformers and generates a few tokens.
Nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EXAMPLES = Path(__file__).resolve().parent
TEXT = (
    "the quick brown fox jumps over the lazy dog while models merge their weights "
    "into one network that keeps what each fine tune learned about language and code"
).split()


def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator([" ".join(TEXT)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def add_chat_tokens(path: Path, seed: int) -> None:
    """Give the model at ``path`` new special tokens with rows of their own, as chat fine-tuning does."""
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.add_tokens(CHAT_TOKENS, special_tokens=True)
    model = LlamaForCausalLM.from_pretrained(path)
    ids = tok.convert_tokens_to_ids(CHAT_TOKENS)
    if max(ids) >= model.config.vocab_size:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in (model.model.embed_tokens.weight, model.lm_head.weight):
            matrix[ids] = 0.02 * torch.randn(len(ids), matrix.shape[1], generator=generator)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def build_models(root: Path) -> None:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    tok = tokenizer()
    for name, noise_seed in (("base", None), ("ft-a", 1), ("ft-b", 2), ("ft-chat", 3)):
        model = base
        if noise_seed is not None:
            model = LlamaForCausalLM(config)
            generator = torch.Generator().manual_seed(noise_seed)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
            model.load_state_dict(state)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    add_chat_tokens(root / "ft-chat", seed=4)


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out").absolute()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "models" / "ft-chat" / "config.json").exists():
        print(f"building tiny models under {work / 'models'}")
        build_models(work / "models")
    tok = PreTrainedTokenizerFast.from_pretrained(work / "models" / "base")
    prompt = tok("the quick brown fox", return_tensors="pt")
    failures = 0
    runs = [("mkstack" if r.stem.startswith("stack_") else "mkmerge", r) for r in sorted(EXAMPLES.glob("*.yml"))]
    runs += [("mkmoe", recipe) for recipe in sorted((EXAMPLES / "moe").glob("*.yml"))]
    runs += [("mkmerge", recipe) for recipe in sorted((EXAMPLES / "multistage").glob("*.yml"))]
    for tool, recipe in runs:
        out = work / f"merged-{recipe.stem}"
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", tool, str(recipe), str(out), "--overwrite", "--quiet"], cwd=work)
        if result.returncode != 0:
            print(f"{tool:8s} {recipe.stem:20s} FAILED (exit {result.returncode})")
            failures += 1
            continue
        model = AutoModelForCausalLM.from_pretrained(out)
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        text = tok.decode(generated[0][prompt["input_ids"].shape[1] :])
        print(f"{tool:8s} {recipe.stem:20s} ok in {time.perf_counter() - started:5.2f} s -> {out.name}: {text!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
