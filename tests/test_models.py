"""The tiny Qwen2.5-VL builder, offline loading and the image-only processor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepeyes_agent.policy.loading import QwenVLImageProcessor, load_policy, load_processor
from deepeyes_agent.policy.tiny import TAG_TOKENS, build_tiny_qwen2_5_vl
from deepeyes_envs.messages import QWEN_SPECIAL_TOKENS

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def test_saved_files_are_standard(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert vision["out_hidden_size"] == text["hidden_size"]
    tok_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert pre["max_pixels"] == pre["size"]["longest_edge"]
    assert (tiny_model_dir / "tokenizer.json").is_file()


def test_build_is_deterministic_given_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen2_5_vl(tmp_path / "again", seed=0)
    other = build_tiny_qwen2_5_vl(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_load_policy_offline(policy, tiny_model_dir: Path) -> None:
    model, processor = policy
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert isinstance(processor, QwenVLImageProcessor)
    assert not hasattr(processor, "video_processor")  # the slot that would import torchvision
    assert model.dtype == torch.float32 and not model.training
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert model.config.image_token_id == processor.image_token_id


def test_load_options(tiny_model_dir: Path) -> None:
    model, processor = load_policy(tiny_model_dir, dtype="bfloat16", attn_implementation="eager",
                                   max_pixels=8 * 28 * 28)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    image = np.zeros((500, 500, 3), dtype=np.uint8)
    grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])["image_grid_thw"]
    assert int(np.prod(grid[0])) // 4 <= 8


def test_missing_directory_never_reaches_a_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        load_policy("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(FileNotFoundError):
        load_processor(tmp_path)


def test_tokenizer_has_qwen_tokens_as_single_tokens(policy) -> None:
    tokenizer = policy.processor.tokenizer
    assert 1800 <= len(tokenizer) <= 2100
    for token in QWEN_SPECIAL_TOKENS + TAG_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tokenizer.decode(ids) == token
    text = '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}}\n</tool_call>'
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>"


def test_chat_template_matches_env_renderer(policy) -> None:
    from deepeyes_envs.messages import image_part, message, render_qwen

    image = np.zeros((40, 40, 3), dtype=np.uint8)
    messages = [message("system", "sys"), message("user", image_part(image), "What?"), message("assistant", "ok")]
    templated = policy.processor.tokenizer.apply_chat_template(
        [{"role": m["role"], "content": list(m["content"])} for m in messages], tokenize=False,
        add_generation_prompt=True)
    assert templated == render_qwen(messages)


def test_build_tiny_command(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "cmd"
    result = subprocess.run([sys.executable, "-m", "deepeyes_agent.policy", "build-tiny", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "built tiny Qwen2.5-VL" in result.stdout
    model, processor = load_policy(out)
    assert model.config.model_type == "qwen2_5_vl"
