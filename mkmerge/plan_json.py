"""The machine-readable plan: a :class:`PlanReport` as one JSON document.

JSON schema ``mkmerge-plan/1`` (sizes in bytes, layer ranges inclusive, 0-based)::

    {
      "schema": "mkmerge-plan/1",
      "recipe": "recipe.yml" | null,
      "method": "ties",
      "inputs": [{"label": "base", "reference": "org/model", "path": "/local/dir",
                  "architecture": "LlamaForCausalLM", "layers": 32, "dtypes": ["bfloat16"],
                  "tensors": 291, "bytes": 14483464192, "is_base": true}, ...],
      "output": {"architecture": "LlamaForCausalLM", "layers": 32, "config_from": "base",
                 "dtypes": ["bfloat16"], "tensors": 291, "bytes": 14483464192},
      "config": {"from": "base", "changes": {"num_hidden_layers": {"from": 32, "to": 48}, ...}},
      "pre_weights":  [{"tensor": "model.embed_tokens.weight", "computed_as": "ties(base, A, B)"}],
      "layer_groups": [{"layers": [0, 31], "tensors_each": 9,
                        "computed_as": [{"what": "ties(base, A, B)", "tensors": 9}]}],
      "post_weights": [...same as pre_weights...],
      "tensors": [{"name": ..., "section": "pre" | "layer" | "post", "layer": 0 | null,
                   "dtype": "bfloat16", "shape": [4096, 4096], "bytes": ..., "shard": "model-00001-of-00003.safetensors",
                   "method": "ties", "computed_as": "ties(base, A, B)", "row_blocks": 1, "statistics_passes": 0,
                   "parameters": {"normalize": true, ...},
                   "inputs": [{"model": "A", "tensor": ..., "layer": 0 | null, "dtype": ..., "shape": [...],
                               "is_base": false, "parameters": {"weight": 0.5, "density": 0.5}}, ...]}, ...],
      "shards": [{"file": "model-00001-of-00003.safetensors", "tensors": 120, "bytes": ...}],
      "unused_inputs": [{"model": "B", "tensors": 18, "bytes": ..., "summary": "layers 2–3 (all 9 tensors each)",
                         "layers": [{"layers": [2, 3], "tensors_each": 9, "complete": true,
                                     "tensors": ["model.layers.*.mlp.up_proj.weight", ...]}],
                         "other": ["lm_head.weight"], "names": [every unused stored name]}],
      "memory": {"predicted_peak_bytes": ..., "baseline_bytes": ..., "read_bytes": ...,
                 "working_bytes": ..., "write_bytes": ..., "retained_bytes": ..., "peak_tensor": ...,
                 "prefetch_bytes": ..., "write_queue_bytes": ..., "compute_workers": 16, "device": "cpu"}
    }

``mkstack --dry-run --json`` prints this document (``"tool": "mkstack"``) with a
``layer_map``; ``mkmoe --dry-run --json`` prints the same ``inputs``, ``output``, ``config``,
``tensors`` and ``shards`` keys for the MoE it would build (mkmoe/plan_json.py). Every
document has ``"tool"``. A multi-stage dry run prints ``{"schema": "mkmerge-plan/1", "stages": [{"document": 1,
"name": "soup" | null, "out": ..., "depends_on": [...], "status": "reused" | "planned" |
"waits", "plan": <the document above> | null}]}`` (mkmerge/plan_view.py).

Input labels are described in mkmerge/plan_report.py.
"""

from __future__ import annotations

from mkmerge.memory_estimate import MemoryEstimate
from mkmerge.plan_report import PlanReport, TensorPlan
from mkmerge.plan_unused import UnusedTensors
from mksuite.common.plan_document import SCHEMA

__all__ = ["SCHEMA", "report_json"]


def report_json(report: PlanReport, tool: str = "mkmerge") -> dict:
    """The ``mkmerge-plan/1`` document (see the module docstring)."""
    return {
        "schema": SCHEMA,
        "tool": tool,
        "recipe": report.recipe,
        "method": report.method,
        "inputs": [
            {
                "label": i.label,
                "reference": i.reference,
                "path": i.path,
                "architecture": i.architecture,
                "layers": i.layers,
                "dtypes": list(i.dtypes),
                "tensors": i.tensors,
                "bytes": i.nbytes,
                "is_base": i.is_base,
            }  # fmt: skip
            for i in report.inputs
        ],
        "output": {
            "architecture": report.architecture,
            "layers": report.layers,
            "config_from": report.config_from,
            "dtypes": list(report.output_dtypes),
            "tensors": len(report.tensors),
            "bytes": report.output_bytes,
        },
        "config": {"from": report.config_from, "changes": dict(report.config_changes)},
        "pre_weights": [_weight_json(t) for t in report.section("pre")],
        "layer_groups": [
            {
                "layers": [g.first, g.last],
                "tensors_each": g.tensors_each,
                "computed_as": [{"what": s.describe(g.first, g.last), "tensors": n} for s, n in g.pattern],
            }
            for g in report.groups
        ],
        "post_weights": [_weight_json(t) for t in report.section("post")],
        "tensors": [_tensor_json(t) for t in report.tensors],
        "shards": [{"file": s.file, "tensors": s.tensors, "bytes": s.nbytes} for s in report.shards],
        "unused_inputs": [_unused_json(u) for u in report.unused],
        "memory": _memory_json(report.memory, report.device),
    }


def _weight_json(tensor: TensorPlan) -> dict:
    return {"tensor": tensor.name, "computed_as": tensor.signature.describe(tensor.layer, tensor.layer)}


def _tensor_json(tensor: TensorPlan) -> dict:
    return {
        "name": tensor.name,
        "section": tensor.section,
        "layer": tensor.layer,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "bytes": tensor.nbytes,
        "shard": tensor.shard,
        "method": tensor.signature.method,
        "computed_as": tensor.signature.describe(tensor.layer, tensor.layer),
        "row_blocks": tensor.row_blocks,
        "statistics_passes": tensor.statistics_passes,
        "parameters": dict(tensor.parameters),
        "inputs": [
            {
                "model": i.label,
                "tensor": i.tensor,
                "layer": i.layer,
                "dtype": i.dtype,
                "shape": list(i.shape),
                "is_base": i.is_base,
                "parameters": dict(i.parameters),
            }  # fmt: skip
            for i in tensor.inputs
        ],
    }


def _unused_json(unused: UnusedTensors) -> dict:
    return {
        "model": unused.label,
        "tensors": len(unused.names),
        "bytes": unused.nbytes,
        "summary": unused.describe(),
        "layers": [
            {
                "layers": [run.first, run.last],
                "tensors_each": len(run.templates),
                "complete": run.complete,
                "tensors": list(run.templates),
            }
            for run in unused.layers
        ],
        "other": list(unused.others),
        "names": list(unused.names),
    }


def _memory_json(memory: MemoryEstimate, device: str) -> dict:
    return {
        "predicted_peak_bytes": memory.peak_bytes,
        "baseline_bytes": memory.baseline_bytes,
        "read_bytes": memory.read_bytes,
        "working_bytes": memory.working_bytes,
        "write_bytes": memory.write_bytes,
        "retained_bytes": memory.retained_bytes,
        "peak_tensor": memory.peak_tensor,
        "prefetch_bytes": memory.prefetch_bytes,
        "write_queue_bytes": memory.write_queue_bytes,
        "compute_workers": memory.compute_workers,
        "device": device,
    }
