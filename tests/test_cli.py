"""The real ``tunix-zoo`` console script, run in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tunix_zoo.demo import DEMO_TEXT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, demo_folder):
  # The session's tiny-demo, trained once; os.environ carries tests/conftest.py's XLA
  # flags (8 devices, fast compiles) and compilation cache to the subprocesses.
  cache = tmp_path_factory.mktemp("cache")
  shutil.copytree(demo_folder, cache / demo_folder.name)
  return {**os.environ, "TUNIX_ZOO_CACHE": str(cache), "TUNIX_ZOO_QUIET": "1"}


def tunix_zoo(env, *args, check=True):
  executable = shutil.which("tunix-zoo")
  assert executable, "the console script is installed by `pip install -e .`"
  result = subprocess.run([executable, *args], env=env, capture_output=True, text=True,
                          timeout=600)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def test_run_tiny_demo_offline_continues_the_text(env):
  result = tunix_zoo(env, "run", "tiny-demo", "--max-new-tokens", "24")
  assert result.stdout.startswith("JAX is a Python library for accelerator-oriented")
  assert DEMO_TEXT.replace("\\\n", "").startswith(result.stdout.strip()[:60])
  assert "prefill" in result.stderr and "decode" in result.stderr


def test_kick_test_loss_falls(env):
  result = tunix_zoo(env, "test", "tiny-demo", "--steps", "3", "--seq-len", "32")
  assert "loss fell" in result.stdout
  losses = [float(line.split()[-1]) for line in result.stdout.splitlines()
            if line.startswith("step")]
  assert len(losses) == 3 and losses[-1] < losses[0]


def test_kick_test_of_a_preset_on_a_mesh(env):
  result = tunix_zoo(env, "test", "tiny-demo", "--load", "--mesh", "2x4", "--steps", "2",
                     "--seq-len", "16")
  assert "loss fell" in result.stdout


def test_export_writes_a_loadable_checkpoint(env, tmp_path):
  out = tmp_path / "exported"
  result = tunix_zoo(env, "export", "tiny-demo", str(out), "--out-dtype", "bfloat16")
  assert result.stdout.strip() == str(out)
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "qwen3"
  assert (out / "tokenizer.json").exists()
  again = tunix_zoo(env, "run", str(out), "--max-new-tokens", "4", "--prompt", "JAX is")
  assert again.stdout.startswith("JAX is")


def test_download_local_prints_the_folder(env, tmp_path):
  folder = tunix_zoo(env, "download", "tiny", "--source", "local", "--model-path",
                     os.path.join(env["TUNIX_ZOO_CACHE"], "tiny-demo"))
  assert folder.stdout.strip().endswith("tiny-demo")


def test_list_and_info(env):
  listing = json.loads(tunix_zoo(env, "list", "--json").stdout)
  ids = {row["config_id"] for row in listing}
  assert {"qwen3_0p6b", "gemma3_1b", "llama3p1_405b", "qwen2p5_72b", "gemma_7b"} <= ids
  info = json.loads(tunix_zoo(env, "info", "qwen3_8b", "--mesh", "1x8", "--json").stdout)
  assert info["parameters"] == 8_190_735_360
  assert info["bytes_total"] == 2 * 8_190_735_360
  # Every matmul weight splits 8 ways on tp; only norms are replicated.
  assert info["bytes_total"] / 8 <= info["bytes_per_device"] < info["bytes_total"] / 8 * 1.01
  moe = json.loads(tunix_zoo(env, "info", "qwen3_30b_a3b", "--mesh", "1x8", "--json").stdout)
  assert moe["parameters"] == pytest.approx(30.5e9, rel=0.02)
  assert moe["active_parameters"] == pytest.approx(3.3e9, rel=0.03)


def test_bad_ids_exit_2_with_a_suggestion(env):
  result = tunix_zoo(env, "info", "Qwen/Qwen4-8B", check=False)
  assert result.returncode == 2
  assert "Did you mean 'qwen3'" in result.stderr
  result = tunix_zoo(env, "info", "qwen3_8b", "--mesh", "0x8", check=False)
  assert result.returncode == 2 and "1x8" in result.stderr


def test_kick_test_with_lora_adapters_and_remat(env):
  result = tunix_zoo(env, "test", "tiny-demo", "--steps", "3", "--seq-len", "16",
                     "--lora-rank", "8", "--lora-module-path", ".*q_proj|.*v_proj",
                     "--remat", "layer")
  # tiny-demo has 2 layers: q_proj and v_proj of each get adapters.
  assert "LoRA rank 8 on 4 layers" in result.stdout
  assert "loss fell" in result.stdout


def test_kick_test_with_a_lora_regex_matching_nothing_is_a_user_error(env):
  result = tunix_zoo(env, "test", "tiny-demo", "--lora-rank", "8", "--lora-module-path", "q_proj",
                     check=False)
  assert result.returncode == 2
  assert "matches none of the model's Linear layers" in result.stderr
  assert "layers.{i}.attn.q_proj" in result.stderr


def test_info_estimates_a_lora_training_step(env):
  info = json.loads(tunix_zoo(env, "info", "qwen3_8b", "--mesh", "1x4", "--lora-rank", "32",
                              "--batch-size", "8", "--seq-len", "2048", "--remat", "layer",
                              "--json").stdout)
  training = info["training"]
  assert (training["lora_rank"], training["remat"], training["batch_size"]) == (32, "layer", 8)
  assert training["weight_bytes"] == info["bytes_per_device"]
  # AdamW keeps two moments of what it trains: the adapters only.
  assert training["optimizer_bytes"] == 2 * training["adapter_bytes"] > 0
  assert training["activation_bytes"] > 0
  assert training["total_bytes"] == sum(
      training[k] for k in ("weight_bytes", "adapter_bytes", "optimizer_bytes", "activation_bytes")
  )
