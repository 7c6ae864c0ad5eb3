"""Peak memory and wall time of mkmoe (hidden-state gates) and mkstack across model sizes.

    python benchmarks/bench_build.py --sizes 0.5b,1.1b [--repeat 1]

Uses the random Llama-shaped families of ``bench_merge.py`` (built once under ``--root``),
gives each model a small BPE tokenizer (ids below every family's vocabulary), then runs:

* ``mkmoe`` with ``gate_mode: hidden`` (base + two experts -> Mixtral): the gate vectors come
  from forward passes of the base over the prompts, streamed one decoder layer at a time, and
  every expert tensor is copied from its dense model;
* ``mkmoe`` with ``gate_mode: random`` (the same assembly without forward passes);
* ``mkstack --upscale`` SOLAR-style (n layers -> 2n - 2·overlap from one model).

Each runs as a child process; peak RSS is the kernel's ``ru_maxrss`` for it. Peak memory
should be flat across sizes: no tool holds more than the tensors (or the layer) in flight.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import run_child, warm
from model_family import build_llama_family

TEXT = "the quick brown fox jumps over the lazy dog while models merge their weights in code and language"


def add_tokenizer(model: Path) -> None:
    """A 200-token BPE tokenizer (trained here, nothing downloaded), saved beside the weights."""
    if (model / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(model)


def moe_config(models: list[Path], gate_mode: str) -> str:
    return (
        f"base_model: {models[0]}\ngate_mode: {gate_mode}\ndtype: bfloat16\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {models[1]}\n    positive_prompts: ['the quick brown fox', 'the lazy dog']\n"
        f"  - source_model: {models[2]}\n    positive_prompts: ['merge their weights', 'code and language']\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.1b")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--root", default="/tmp/mk-bench")
    args = parser.parse_args()

    root = Path(args.root)
    rows = []
    for size in args.sizes.split(","):
        models = build_llama_family(root / size, size, 3)
        for model in models:
            add_tokenizer(model)
        warm(models)
        layers = json.loads((models[0] / "config.json").read_text())["num_hidden_layers"]
        out = root / "out-build"
        commands = {}
        for gate_mode in ("hidden", "random"):
            config = root / f"moe-{gate_mode}.yml"
            config.write_text(moe_config(models, gate_mode))
            commands[f"mkmoe {gate_mode} gates"] = [sys.executable, "-m", "mkmoe", str(config), str(out), "--quiet"]
        overlap = layers // 4
        commands[f"mkstack upscale ({layers} -> {2 * (layers - overlap)})"] = [
            sys.executable, "-m", "mkstack", str(out), "--upscale", str(models[0]), "--overlap", str(overlap), "--quiet",
        ]  # fmt: skip
        runs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeat):
            for label, command in commands.items():
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault(label, []).append(run_child(command))
        shutil.rmtree(out, ignore_errors=True)
        for label, samples in runs.items():
            rows.append(
                (size, label, statistics.median(w for w, _ in samples), statistics.median(r for _, r in samples))
            )

    print(f"\n{'size':6s} {'run':34s} {'wall s':>8s} {'peak RSS MB':>12s}")
    for size, label, wall, rss in rows:
        print(f"{size:6s} {label:34s} {wall:8.2f} {rss:12.0f}")


if __name__ == "__main__":
    main()
