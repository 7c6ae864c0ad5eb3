"""Hub models through a local Hub (tests/hub_server.py): remote planning, lazy shards, push, failures.

Every test points HF_ENDPOINT at a server on 127.0.0.1 and uses its own HF_HOME; nothing
reaches the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, directory_files
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file
from typer.testing import CliRunner

from mkmerge.cli import merge_app, plan_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app

from mkmoe_helpers import moe_yaml
from tiny_models import read_tensors

ROOT = Path(__file__).resolve().parents[2]


def go_online(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def sharded_family(tiny_family):
    """A llama base and fine-tune saved as ~10 safetensors shards each (read-only)."""
    base, (ft1, _) = tiny_family("llama", fmt="sharded")
    return base, ft1


@pytest.fixture
def hub(tmp_path, monkeypatch, sharded_family):
    """A local Hub serving org/base and org/ft; the process is online, with a fresh cache."""
    base, ft1 = sharded_family
    with HubServer() as server:
        server.add_repo("org/base", base)
        server.add_repo("org/ft", ft1)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(variable, raising=False)
        go_online(monkeypatch)
        yield server


def run(app, *args):
    result = CliRunner().invoke(app, [*map(str, args), "--quiet"])
    assert "Traceback" not in result.output, result.output
    return result


def linear(a: str, b: str) -> str:
    return (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.75}}\ndtype: float32\n"
    )


def shards_of(model: Path) -> dict[str, str]:
    return json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]


# --- planning reads headers only ----------------------------------------------------------------


@pytest.mark.parametrize("tool", ["mkmerge plan", "mkmerge --dry-run", "mkstack --dry-run", "mkmoe --dry-run"])
def test_planning_a_hub_model_reads_headers_remotely_and_downloads_no_weights(hub, tmp_path, tool):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yml"
    if tool.startswith("mkmerge"):
        recipe.write_text(linear("org/base", "org/ft"))
        result = run(plan_app, recipe) if tool == "mkmerge plan" else run(merge_app, recipe, out, "--dry-run")
    elif tool.startswith("mkstack"):
        result = run(stack_app, out, "--slice", "org/base:0-2", "--slice", "org/ft:1-3", "--dry-run")
    else:
        recipe.write_text(moe_yaml("org/base", ["org/base", "org/ft"], gate_mode="random"))
        result = run(moe_app, recipe, out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert hub.full_downloads() == []  # no GET of a whole .safetensors file
    header_reads = hub.gets(".safetensors")
    assert header_reads and all(r is not None and r.startswith("bytes=0-") for _, r in header_reads)
    served = {n for n in hub.files("org/base") if n.endswith(".safetensors")}
    assert {p.rsplit("/", 1)[1] for p, _ in header_reads if "/org/base/" in p} == served
    assert not out.exists()
    blobs = list((tmp_path / "hf-home" / "hub").rglob("*.safetensors"))
    assert blobs == []


# --- running fetches what it needs --------------------------------------------------------------


def test_a_merge_of_hub_models_equals_the_merge_of_the_same_local_models(hub, sharded_family, tmp_path):
    base, ft1 = sharded_family
    (tmp_path / "hub.yml").write_text(linear("org/base", "org/ft"))
    (tmp_path / "local.yml").write_text(linear(str(base), str(ft1)))
    assert run(merge_app, tmp_path / "hub.yml", tmp_path / "from-hub").exit_code == 0
    assert run(merge_app, tmp_path / "local.yml", tmp_path / "from-disk").exit_code == 0
    from_hub, from_disk = read_tensors(tmp_path / "from-hub"), read_tensors(tmp_path / "from-disk")
    assert from_hub.keys() == from_disk.keys()
    for name in from_hub:
        assert torch.equal(from_hub[name], from_disk[name]), name
    a, b = read_tensors(base), read_tensors(ft1)
    for name in from_hub:  # independently: 0.25 a + 0.75 b
        torch.testing.assert_close(from_hub[name], 0.25 * a[name] + 0.75 * b[name], rtol=1e-6, atol=1e-7)
    card = (tmp_path / "from-hub" / "README.md").read_text()
    assert f"`org/base`: commit `{hub.repos['org/base'].refs['main']}`" in card
    assert f"`org/ft`: commit `{hub.repos['org/ft'].refs['main']}`" in card


def test_stacking_a_few_layers_downloads_only_the_shards_that_hold_them(hub, sharded_family, tmp_path):
    base, _ = sharded_family
    result = run(stack_app, tmp_path / "out", "--slice", "org/base:0-1")
    assert result.exit_code == 0, result.output
    weight_map = shards_of(base)
    needed = {
        shard for name, shard in weight_map.items() if not name.startswith(("model.layers.1.", "model.layers.2."))
    }
    fetched = {path.rsplit("/", 1)[1] for path in hub.full_downloads()}
    assert fetched == needed
    assert fetched < set(weight_map.values())  # some shards were never downloaded
    out = read_tensors(tmp_path / "out")
    source = read_tensors(base)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"])
    assert not any(name.startswith("model.layers.1.") for name in out)


def test_merging_starts_while_a_later_shard_is_still_downloading(hub, sharded_family, tmp_path, monkeypatch):
    """The shard holding lm_head (the last output) is served only once a first tensor is written."""
    import threading

    from mksuite.common.writing.safetensors_writer import ShardedWriter

    base, _ = sharded_family
    sha = hub.repos["org/base"].refs["main"]
    last = f"/org/base/resolve/{sha}/{shards_of(base)['lm_head.weight']}"
    first = shards_of(base)["model.embed_tokens.weight"]
    assert not last.endswith(first)
    released = hub.gates[last] = threading.Event()
    real_write = ShardedWriter.write

    def write(self, name, tensor, rows=None):
        released.set()
        return real_write(self, name, tensor, rows)

    monkeypatch.setattr(ShardedWriter, "write", write)
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    assert run(merge_app, tmp_path / "r.yml", tmp_path / "out").exit_code == 0
    assert last in hub.full_downloads()
    assert hub.gate_timed_out == []  # it was released by a written tensor, not by the gate's timeout


def test_a_shard_that_cannot_be_downloaded_mid_run_names_it_and_leaves_no_output(hub, sharded_family, tmp_path):
    base, _ = sharded_family
    sha = hub.repos["org/base"].refs["main"]
    shard = shards_of(base)["model.norm.weight"]
    path = f"/org/base/resolve/{sha}/{shard}"
    hub.fail_next[("HEAD", path)] = hub.fail_next[("GET", path)] = 100
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert shard in result.output and "org/base" in result.output
    assert not (tmp_path / "out").exists()


def test_a_hub_retry_is_reported_once(hub, sharded_family, tmp_path):
    base, _ = sharded_family
    sha = hub.repos["org/base"].refs["main"]
    path = f"/org/base/resolve/{sha}/{shards_of(base)['model.norm.weight']}"
    hub.fail_next[("GET", path)] = 1  # one 503, then served: huggingface_hub retries once
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(tmp_path / "r.yml"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in") == 1, done.stderr


def test_a_hub_model_with_a_hub_lora_adapter_is_merged_exactly(hub, sharded_family, tmp_path):
    from lora_adapters import PREFIX, adapter_config, linear_factors, write_adapter

    base, _ = sharded_family
    module = "model.layers.1.self_attn.q_proj"
    factors = linear_factors(module, 4, 32, 32, seed=7)
    write_adapter(tmp_path / "adapter", factors, adapter_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    hub.add_repo("org/adapter", tmp_path / "adapter")
    (tmp_path / "r.yml").write_text("merge_method: passthrough\nmodels:\n  - model: org/base+org/adapter\n")
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged, expected = read_tensors(tmp_path / "out"), read_tensors(base)
    a, b = factors[f"{PREFIX}{module}.lora_A.weight"], factors[f"{PREFIX}{module}.lora_B.weight"]
    expected[f"{module}.weight"] = expected[f"{module}.weight"] + (b @ a) * (8 / 4)
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`org/adapter`: commit `{hub.repos['org/adapter'].refs['main']}`" in card


def test_a_killed_hub_run_resumes_after_its_shards_arrived(hub, tmp_path):
    """The first run fingerprints shards not yet downloaded; the resumed one finds them cached."""
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    killed = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(tmp_path / "r.yml"), str(out), "--quiet", "--shard-size", "40KB"],
        env={**env, "MKSUITE_TEST_KILL_AFTER": "5"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert killed.returncode == -9, killed.stderr
    result = run(merge_app, tmp_path / "r.yml", out, "--shard-size", "40KB")
    assert result.exit_code == 0, result.output
    assert "resuming an interrupted run: 5 of" in result.output
    assert run(merge_app, tmp_path / "r.yml", tmp_path / "again", "--shard-size", "40KB").exit_code == 0
    for shard in sorted(out.glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes(), shard.name


def test_a_revision_resolves_to_its_commit_which_the_card_records(hub, sharded_family, tmp_path):
    _, ft1 = sharded_family
    dev = hub.add_repo("org/base", ft1, branch="dev")
    (tmp_path / "r.yml").write_text(linear("org/base@dev", "org/ft"))
    assert run(merge_app, tmp_path / "r.yml", tmp_path / "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`org/base@dev`: commit `{dev}`" in card
    # org/base@dev is ft1, so the merge is ft1 itself
    merged, expected = read_tensors(tmp_path / "out"), read_tensors(ft1)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)
    assert all(f"/resolve/{dev}/" in path for path in hub.full_downloads() if "/org/base/" in path)
    refs = tmp_path / "hf-home" / "hub" / "models--org--base" / "refs" / "dev"
    assert refs.read_text() == dev


def test_after_a_run_the_cache_serves_the_same_recipe_offline(hub, tmp_path, monkeypatch):
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    assert run(merge_app, tmp_path / "r.yml", tmp_path / "online").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    asked = len(hub.requests)
    assert run(merge_app, tmp_path / "r.yml", tmp_path / "offline").exit_code == 0
    assert len(hub.requests) == asked
    online, offline = read_tensors(tmp_path / "online"), read_tensors(tmp_path / "offline")
    assert all(torch.equal(online[n], offline[n]) for n in online)


# --- refusals -------------------------------------------------------------------------------------


def test_an_index_naming_a_shard_outside_the_repository_is_refused(hub, sharded_family, tmp_path, no_tensor_reads):
    base, _ = sharded_family
    files = directory_files(base)
    index = json.loads(files["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../../escape.safetensors"
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo("org/evil", files)
    (tmp_path / "r.yml").write_text(linear("org/evil", "org/ft"))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "escape.safetensors" in result.output and "outside" in result.output
    assert not any("escape" in path for path, _ in hub.gets())


def test_a_listed_file_name_leading_out_of_the_repository_is_refused(hub, sharded_family, tmp_path):
    base, _ = sharded_family
    hub.add_repo("org/evil", {**directory_files(base), "../../outside.json": b"{}"})
    (tmp_path / "r.yml").write_text(linear("org/evil", "org/ft"))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "../../outside.json" in result.output


@pytest.mark.parametrize(
    "weights, complaint",
    [
        (b"abc", "too few for a safetensors header length"),
        ((10**12).to_bytes(8, "little") + b"{}", "header length field says"),
        (
            (40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}}',
            "not valid JSON",
        ),
        ((2).to_bytes(8, "little") + b"{}" + b"tail", "the data section has 4 bytes"),
    ],
)
def test_a_damaged_remote_header_is_refused_without_downloading_the_file(hub, tmp_path, weights, complaint):
    hub.add_repo(
        "org/broken", {"config.json": b'{"architectures": ["LlamaForCausalLM"]}', "model.safetensors": weights}
    )
    (tmp_path / "r.yml").write_text(linear("org/broken", "org/ft"))
    result = run(plan_app, tmp_path / "r.yml")
    assert result.exit_code == 4, result.output
    assert complaint in result.output and "org/broken/model.safetensors" in result.output
    assert hub.full_downloads() == []


def test_an_unknown_repo_is_model_not_found_without_downloading_anything(hub, tmp_path):
    (tmp_path / "r.yml").write_text(linear("org/bsae", "org/ft"))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "org/bsae" in result.output
    assert hub.gets() == []


def test_offline_mode_without_a_cached_copy_fails_at_once_with_the_hint(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    result = run(plan_app, tmp_path / "r.yml")
    assert result.exit_code == 3, result.output
    assert "HF_HUB_OFFLINE" in result.output
    assert hub.requests == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def test_an_unreachable_hub_fails_in_seconds_with_the_hint(tmp_path):
    (tmp_path / "r.yml").write_text(linear("org/base", "org/ft"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run(
        [sys.executable, "-m", "mkmerge", "plan", str(tmp_path / "r.yml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 3, done.stderr
    assert "could not be reached" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr


# --- pushing --------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_verified_output_with_its_card_to_a_private_repo(hub, family, tmp_path):
    _, a, b = family
    (tmp_path / "r.yml").write_text(linear(str(a), str(b)))
    out = tmp_path / "out"
    result = run(merge_app, tmp_path / "r.yml", out, "--verify", "--push-to-hub", "me/merged", "--private")
    assert result.exit_code == 0, result.output
    assert hub.repos["me/merged"].private
    uploaded = hub.files("me/merged")
    assert uploaded == directory_files(out)
    assert "README.md" in uploaded and "config.json" in uploaded
    assert load_file(out / "model.safetensors").keys() == read_tensors(out).keys()


@pytest.mark.parametrize("tool", ["mkstack", "mkmoe"])
def test_push_to_hub_works_for_mkstack_and_mkmoe(hub, family, tmp_path, tool):
    base, a, b = family
    out = tmp_path / "out"
    if tool == "mkstack":
        result = run(stack_app, out, "--slice", f"{a}:0-2", "--push-to-hub", "me/stacked")
    else:
        (tmp_path / "moe.yml").write_text(moe_yaml(base, [a, b], gate_mode="random"))
        result = run(moe_app, tmp_path / "moe.yml", out, "--push-to-hub", "me/stacked")
    assert result.exit_code == 0, result.output
    assert not hub.repos["me/stacked"].private
    assert hub.files("me/stacked") == directory_files(out)


def test_a_refused_upload_exits_12_and_keeps_the_output(hub, family, tmp_path):
    _, a, b = family
    hub.refuse_writes = True
    (tmp_path / "r.yml").write_text(linear(str(a), str(b)))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out", "--push-to-hub", "someone/else")
    assert result.exit_code == 12, result.output
    assert "someone/else" in result.output and "hf upload" in result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_push_to_hub_while_offline_refuses_before_building(family, tmp_path, no_tensor_reads):
    _, a, b = family
    (tmp_path / "r.yml").write_text(linear(str(a), str(b)))
    result = run(merge_app, tmp_path / "r.yml", tmp_path / "out", "--push-to-hub", "me/merged")
    assert result.exit_code == 12, result.output
    assert "HF_HUB_OFFLINE" in result.output
    assert not (tmp_path / "out").exists()


def test_the_python_api_pushes_too_and_reports_through_notify(hub, family, tmp_path):
    import mksuite

    _, a, b = family
    lines: list[str] = []
    out = tmp_path / "out"
    mksuite.merge(linear(str(a), str(b)), out, push_to_hub="me/api", private=True, notify=lines.append)
    assert hub.repos["me/api"].private and hub.files("me/api") == directory_files(out)
    assert any("me/api" in line for line in lines)
