"""Sweep: tiny models of many model types through merge and stack, one table row per type.

For each type: a base and two seeded fine-tunes are built with the installed transformers,
then (a) linear ft1:1 + ft2:0 must reproduce ft1's logits exactly, (b) ties and (c) slerp
must load and run, (d) stacking ft1 layers [0,4) + ft2 layers [1,4) through mkstack must
load with depth 7, and the same recipe through mkmerge must write the same config and tensors.
(e) moe: mkmoe builds a MoE of two copies of the base, whose logits must equal the base's
(within 1e-5), or refuses the type cleanly (exit 5: no MoE class fits it) for "n/a".
(f) expand: block expansion of ft1 (``mkstack --expand --every 2``) must compute exactly ft1's logits.

    python scripts/sweep_architectures.py [model_type ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox",
    "gptj", "gpt_bigcode", "falcon", "stablelm", "starcoder2", "cohere", "cohere2", "olmo", "olmo2", "granite",
    "glm", "glm4", "exaone", "exaone4", "smollm3", "seed_oss", "ernie4_5", "mixtral", "qwen2_moe", "qwen3_moe",
    "olmoe", "granitemoe", "phimoe", "glm4_moe", "deepseek_v3", "gpt_oss", "mamba",
    "gemma3", "mistral3", "qwen2_vl", "qwen2_5_vl",
)  # fmt: skip
TOKENS = [1, 5, 9, 17, 33, 65, 7, 3]


def _load(path: Path):
    import torch

    from arch_models import model_class

    config = json.loads((path / "config.json").read_text())
    model = model_class(config["model_type"]).from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits


def _merge(recipe: str, out: Path, app) -> None:
    from typer.testing import CliRunner

    recipe_path = out.with_suffix(".yml")
    recipe_path.write_text(recipe)
    result = CliRunner().invoke(app, [str(recipe_path), str(out), "--quiet"])
    if result.exit_code != 0:
        raise RuntimeError(f"exit {result.exit_code}: {' '.join(result.output.split())[:160]}")


def _depth(path: Path) -> int:
    from mksuite.common.arch.registry import choose_architecture
    from mksuite.common.loading import open_model

    files = open_model(path)
    return choose_architecture(files.config, files.tensors.names()).num_layers(files.config)


def sweep_type(model_type: str, root: Path) -> dict[str, str]:
    """One row: each check's outcome ("ok" or a short reason)."""
    import torch

    from mkmerge.cli import merge_app
    from mkstack.cli import stack_app

    from arch_models import build_type_model

    row: dict[str, str] = {}
    base = build_type_model(model_type, root / "base", layers=4)
    ft1 = build_type_model(model_type, root / "ft1", seed=1, base=base)
    ft2 = build_type_model(model_type, root / "ft2", seed=2, base=base)
    models = f"models:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 0.0}}\n"
    checks = {
        "linear": f"merge_method: linear\n{models}dtype: float32\n",
        "ties": f"merge_method: ties\nbase_model: {base}\n{models.replace('weight: 0.0', 'weight: 0.5')}"
        "parameters: {density: 0.5}\ndtype: float32\n",
        "slerp": f"merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
        "parameters: {t: 0.5}\ndtype: float32\n",
    }
    for name, recipe in checks.items():
        row[name] = _attempt(lambda name=name, recipe=recipe: _check_merge(name, recipe, root / name, ft1, merge_app))
    stack = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 4]\n"
        f"  - sources:\n      - model: {ft2}\n        layer_range: [1, 4]\ndtype: float32\n"
    )

    def check_stack() -> str:
        _merge(stack, root / "stack", stack_app)
        _merge(stack, root / "stack_mkmerge", merge_app)
        if _depth(root / "stack") != 7:
            return f"depth {_depth(root / 'stack')}"
        same_config = json.loads((root / "stack" / "config.json").read_text()) == json.loads(
            (root / "stack_mkmerge" / "config.json").read_text()
        )
        if not same_config:
            return "mkmerge config differs"
        logits = _logits(_load(root / "stack"))
        return "ok" if torch.isfinite(logits).all() else "non-finite logits"

    row["stack"] = _attempt(check_stack)
    row["moe"] = _attempt(lambda: check_moe(base, root / "moe"))
    return row


def check_moe(base: Path, out: Path) -> str:
    """MoE assembly: two copies of the base as experts must reproduce the base; "n/a" when refused."""
    import torch

    from mkmoe.config import parse_moe_config
    from mkmoe.run import run_moe
    from mksuite.common.build import BuildOptions
    from mksuite.common.errors import ArchitectureError

    text = f"base_model: {base}\ngate_mode: random\nexperts_per_token: 2\nexperts:\n"
    text += f"  - source_model: {base}\n  - source_model: {base}\ndtype: float32\n"
    try:
        plan, _ = run_moe(parse_moe_config(text, allow_identical_experts=True), out, BuildOptions(overwrite=True))
    except ArchitectureError as error:
        # a type no MoE output fits, or a base that is already a Mixture of Experts: nothing to assemble
        not_applicable = "no MoE output architecture" in str(error) or "already a Mixture of Experts" in str(error)
        return "n/a" if error.exit_code == 5 and not_applicable else f"refused: {error}"[:90]
    moe, dense = _logits(_load(out)), _logits(_load(base))
    if not torch.allclose(moe, dense, atol=1e-5, rtol=0):
        return f"{plan.arch.key}: logits differ by {(moe - dense).abs().max().item():.1e}"
    return "ok"


def check_expand(root: Path) -> str:
    """``mkstack OUT --expand ft1 --every 2`` on the sweep's ft1: the inserted layers are identities,
    so the expanded model's logits must equal ft1's bit for bit."""
    import torch
    from typer.testing import CliRunner

    from mkstack.cli import stack_app

    ft1, out = root / "ft1", root / "expand"
    result = CliRunner().invoke(stack_app, [str(out), "--expand", str(ft1), "--every", "2", "--quiet"])
    if result.exit_code != 0:
        return f"exit {result.exit_code}: {' '.join(result.output.split())[:120]}"
    if _depth(out) != 6:
        return f"depth {_depth(out)}"
    expanded, original = _logits(_load(out)), _logits(_load(ft1))
    if torch.equal(expanded, original):
        return "ok"
    return f"logits differ by {(expanded - original).abs().max().item():.2g}"


def _check_merge(name: str, recipe: str, out: Path, ft1: Path, app) -> str:
    import torch

    _merge(recipe, out, app)
    merged = _logits(_load(out))
    if name == "linear" and not torch.equal(merged, _logits(_load(ft1))):
        return "logits differ from ft1"
    return "ok" if torch.isfinite(merged).all() else "non-finite logits"


def vlm_merge_check(model_type: str, root: Path) -> str:
    """The VLM-merge column: a vision-language model merged with its text-only twin.

    linear VLM:0 + twin:1 must load as the VLM and give the twin's logits (to 1e-6; its
    language weights taken by role, vision tower and projector from the VLM); "n/a" for a
    type that is no VLM or whose language model has no text-only class.
    """
    import torch
    from transformers.models.auto import modeling_auto

    from mkmerge.cli import merge_app

    from arch_models import model_class
    from vlm_models import build_text_twin, build_vlm, load_any, text_logits

    if model_type not in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "n/a"
    vlm = build_vlm(model_type, root / "vlm", seed=0)
    text_type = json.loads((vlm / "config.json").read_text()).get("text_config", {}).get("model_type")
    if text_type is None or model_class(text_type) is None:
        return "n/a"
    twin = build_text_twin(vlm, root / "twin", seed=1)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {vlm}\n    parameters: {{weight: 0.0}}\n"
        f"  - model: {twin}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    )
    _merge(recipe, root / "vlm_merge", merge_app)
    merged = load_any(root / "vlm_merge")
    if type(merged) is not type(load_any(vlm)):
        return f"output is {type(merged).__name__}"
    # Exact for most; PaliGemma runs its language model through another attention path (rounding).
    same = torch.allclose(text_logits(merged, TOKENS), text_logits(load_any(twin), TOKENS), rtol=0, atol=1e-6)
    return "ok" if same else "logits differ from the twin"


def _attempt(check) -> str:
    try:
        return check()
    except Exception as error:  # the sweep reports every failure and carries on
        if "--debug" in sys.argv:
            traceback.print_exc()
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"


def main(types: list[str]) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    columns = ("linear", "ties", "slerp", "stack", "moe", "expand", "vlm merge")
    print(f"transformers {transformers.__version__}")
    print("| model_type | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    failures = 0
    for model_type in types:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = sweep_type(model_type, Path(tmp))
                row["expand"] = _attempt(lambda tmp=tmp: check_expand(Path(tmp)))
            except Exception as error:
                row = {c: f"build failed: {type(error).__name__}" for c in columns}
            row["vlm merge"] = _attempt(lambda t=model_type, d=Path(tmp) / "vlm": vlm_merge_check(t, d))
        failures += sum(row[c] not in ("ok", "n/a") for c in columns)
        print(f"| {model_type} | " + " | ".join(row[c] for c in columns) + " |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    chosen = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(chosen or list(DEFAULT_TYPES)))
