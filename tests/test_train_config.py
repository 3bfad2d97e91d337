"""The typed training config (pydantic): defaults, files, overrides, and errors that say what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deepeyes_agent.settings import leaf_settings
from deepeyes_agent.training.config import ConfigError, TrainConfig, describe, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_has_a_help_text_and_a_default():
    keys = leaf_settings(TrainConfig)
    assert len(keys) > 60
    missing = [k for k, f in keys.items() if not f.description]
    assert not missing, f"settings without help: {missing}"
    table = describe()
    assert "`rollout.temperature`" in table and "`optim.lr`" in table
    docs = (ROOT / "docs" / "training.md").read_text()
    assert table in docs, "docs/training.md's settings table is stale: paste describe()'s output (train.py --describe)"


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["model.build_tiny=true", "rollout.temperature=0.7", "optim.lr=1e-5",
                             "algorithm.clip_ratio_high=null", "data.options={difficulty: 0.5}", "iterations=3"])
    assert cfg.rollout.temperature == 0.7 and isinstance(cfg.rollout.temperature, float)
    assert cfg.optim.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; the float field accepts it
    assert cfg.algorithm.clip_ratio_high is None
    assert cfg.data.options == {"difficulty": 0.5}
    assert cfg.iterations == 3


def test_overrides_reach_into_dict_settings_and_replace_them_whole(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {build_tiny: true}\ndata: {options: {frame_layout: center, n_colors: 4}}\n")
    cfg = load_config(path, ["data.options.frame_layout=quadrants"])
    assert cfg.data.options == {"frame_layout": "quadrants", "n_colors": 4}
    assert load_config(path, ["data.options={n_colors: 3}"]).data.options == {"n_colors": 3}


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="did you mean 'rollout.temperature'"):
        load_config(None, ["model.build_tiny=true", "rollout.temprature=1.0"])
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(None, ["model.build_tiny=true", "optim.lrr=1.0"])


def test_wrong_types_and_bad_combinations_are_errors():
    with pytest.raises(ConfigError, match="rollout.temperature: Input should be a valid number.*'hot'"):
        load_config(None, ["model.build_tiny=true", "rollout.temperature=hot"])
    with pytest.raises(ConfigError, match="iterations: Input should be a valid integer"):
        load_config(None, ["model.build_tiny=true", "iterations=2.5"])
    with pytest.raises(ConfigError, match="algorithm.advantage: Input should be 'grpo', 'dr_grpo'.*'ppo2'"):
        load_config(None, ["model.build_tiny=true", "algorithm.advantage=ppo2"])
    with pytest.raises(ConfigError, match="data.kind: .*must be one of"):
        load_config(None, ["model.build_tiny=true", "data.kind=toys"])
    with pytest.raises(ConfigError, match="the processor's geometry"):
        load_config(None, ["model.build_tiny=true", "env.kwargs={max_pixels: 3136}"])
    with pytest.raises(ConfigError, match="group baseline"):
        load_config(None, ["model.build_tiny=true", "rollout.rollouts_per_prompt=1"])
    with pytest.raises(ConfigError, match="resources.learner_sharding: Input should be 'none' or 'fsdp2'"):
        load_config(None, ["model.build_tiny=true", "resources.learner_sharding=fsdp"])
    with pytest.raises(ConfigError, match="algorithm.vf_clip: Input should be greater than 0"):
        load_config(None, ["model.build_tiny=true", "algorithm.advantage=gae", "algorithm.vf_clip=0"])
    with pytest.raises(ConfigError, match="algorithm.lam: Input should be less than or equal to 1"):
        load_config(None, ["model.build_tiny=true", "algorithm.advantage=gae", "algorithm.lam=1.5"])
    # PPO needs no group: one rollout per task is fine, and the value clip can be switched off
    ppo = load_config(None, ["model.build_tiny=true", "algorithm.advantage=gae", "rollout.rollouts_per_prompt=1",
                             "algorithm.vf_clip=null"])
    assert ppo.algorithm.vf_clip is None and ppo.algorithm.vf_coef == 0.5
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [])


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  build_tiny: true\nrollout:\n  max_token: 5\n")
    with pytest.raises(ConfigError, match="rollout.max_token.*did you mean 'rollout.max_tokens'"):
        load_config(path)


@pytest.mark.parametrize("name", ["tiny_cpu", "zoom_cpu", "zoom_when_needed_cpu", "deepeyes_7b"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    if name == "deepeyes_7b":  # docs/deepeyes.md, the training recipe
        assert (cfg.rollout.prompts_per_iteration, cfg.rollout.rollouts_per_prompt) == (256, 16)
        assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
        assert cfg.algorithm.clip_ratio_low == 0.2 and cfg.algorithm.loss_agg == "token-mean"
        assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.entropy_coef == 0.0
        assert cfg.env.kwargs["max_turns"] == 5 and cfg.rollout.max_tokens == 10240
        assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
        assert cfg.rollout.engine == "vllm" and cfg.rollout.judge["type"] == "llm"


def test_train_py_reports_config_errors(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["rollout.n_per_prompt=4"]) == 2
    assert "did you mean 'rollout.rollouts_per_prompt'" in capsys.readouterr().err


def test_describing_the_settings_does_not_load_torch():
    probe = ("import runpy, sys\nsys.argv = ['train.py', '--describe']\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "`algorithm.advantage`" in out.stdout and out.stdout.rstrip().endswith("TORCH False")
