"""The envs honour gymnasium's contract: check_env, vector envs, wrappers, the registry and plugins."""

import copy
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from test_env_v2 import gradient_image

import deepeyes_envs
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.registry import env_id_for, load_registry_file

ENVS = ["visual_toolbox_v2", "visual_toolbox", "plain"]


@pytest.mark.parametrize("name", ENVS)
def test_check_env_passes(name):
    env = gym.make(name)
    check_env(env.unwrapped, skip_render_check=False)


def test_every_yaml_entry_is_registered():
    specs = load_registry_file()
    assert {"visual_toolbox_v2", "visual_toolbox", "plain"} <= set(specs)
    for name in specs:
        assert name in gym.registry


def test_routing_by_env_name():
    assert env_id_for(Task(question="q", answer="a", env_name="")) == "plain"
    assert env_id_for(Task(question="q", answer="a", env_name=None)) == "plain"
    assert env_id_for("visual_toolbox_v2") == "visual_toolbox_v2"
    with pytest.raises(KeyError, match="not registered"):
        env_id_for("no_such_env")


def test_import_does_not_pull_heavy_libraries():
    code = "import sys, deepeyes_envs, gymnasium as gym; gym.make('visual_toolbox_v2').reset(seed=0); " \
           "print(sorted(m for m in ('torch', 'transformers', 'ray', 'datasets', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reset_is_deterministic_per_seed():
    env = gym.make("visual_toolbox_v2")
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    np.testing.assert_array_equal(a["messages"][1]["content"][0]["image"], b["messages"][1]["content"][0]["image"])
    assert a["messages"][1]["content"][1] == b["messages"][1]["content"][1]


def scripted_turns(obs):
    return '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 200, 200]}}</tool_call>'


@pytest.mark.parametrize("vector_cls", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_vector_envs(vector_cls):
    kwargs = {"shared_memory": False} if vector_cls is gym.vector.AsyncVectorEnv else {}
    envs = vector_cls([lambda: gym.make("visual_toolbox_v2") for _ in range(2)], **kwargs)
    try:
        obs, infos = envs.reset(seed=[1, 2])
        assert len(obs) == 2 and obs[0]["messages"][0]["role"] == "system"
        obs, rewards, terminated, truncated, infos = envs.step((scripted_turns(None), "<answer>A</answer>"))
        assert list(terminated) == [False, True]
        assert obs[0]["messages"][0]["content"][1]["image"].shape == (200, 200, 3)
        assert rewards.shape == (2,)
    finally:
        envs.close()


ANSWER = "<answer>A</answer>"


def first_image(observation):
    return observation["messages"][1]["content"][0]["image"]


def test_make_vec_async_works_with_its_defaults():
    """shared_memory=True is AsyncVectorEnv's default; ConversationSpace registers Gymnasium's hooks."""
    envs = gym.make_vec("visual_toolbox_v2", num_envs=4, vectorization_mode="async")
    try:
        assert isinstance(envs, gym.vector.AsyncVectorEnv) and envs.shared_memory
        obs, _ = envs.reset(seed=[1, 2, 3, 4])
        single = gym.make("visual_toolbox_v2")
        for k, seed in enumerate([1, 2, 3, 4]):
            np.testing.assert_array_equal(first_image(obs[k]), first_image(single.reset(seed=seed)[0]))
        turns = (scripted_turns(None), ANSWER, scripted_turns(None), ANSWER)
        obs, rewards, terminated, truncated, infos = envs.step(turns)
        assert list(terminated) == [False, True, False, True] and not truncated.any() and rewards.shape == (4,)
        assert [len(o["messages"]) for o in obs] == [1, 0, 1, 0]
        assert obs[2]["messages"][0]["content"][1]["image"].shape == (200, 200, 3)
        assert list(infos["episode_summary"]["turns"][[1, 3]]) == [1, 1]
        obs, *_ = envs.step((ANSWER, ANSWER, ANSWER, ANSWER))  # envs 1 and 3 reset (next-step autoreset)
        assert [len(o["messages"]) for o in obs] == [0, 2, 0, 2]
    finally:
        envs.close()


def test_with_copy_false_the_async_observations_are_a_live_view():
    envs = gym.make_vec("visual_toolbox_v2", num_envs=2, vectorization_mode="async", vector_kwargs={"copy": False})
    try:
        view, _ = envs.reset(seed=[1, 2])
        assert view[-1]["messages"][0]["role"] == "system" and len(view[0:2]) == 2
        envs.step((scripted_turns(None), ANSWER))
        assert [len(o["messages"]) for o in view] == [1, 0]  # the same object shows the new observations
        assert copy.deepcopy(view)[0]["messages"][0]["role"] == "user"
    finally:
        envs.close()


def test_record_episode_statistics():
    env = gym.wrappers.RecordEpisodeStatistics(gym.make("visual_toolbox_v2"))
    env.reset(seed=0)
    env.step(scripted_turns(None))
    _, reward, terminated, _, info = env.step(ANSWER)
    assert terminated and info["episode"]["l"] == 2 and info["episode"]["r"] == reward
    assert info["episode_summary"]["turns"] == 2 and list(env.length_queue) == [2]
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec("visual_toolbox_v2", num_envs=2))
    envs.reset(seed=[0, 1])
    _, rewards, *_, infos = envs.step((ANSWER, scripted_turns(None)))
    assert list(infos["_episode"]) == [True, False] and infos["episode"]["r"][0] == rewards[0]


def test_time_limit_through_max_episode_steps():
    env = gym.make("visual_toolbox_v2", max_episode_steps=2)
    assert env.spec.max_episode_steps == 2
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(scripted_turns(None))
    assert not (terminated or truncated)
    _, reward, terminated, truncated, _ = env.step(scripted_turns(None))  # the env would go on; the limit ends it
    assert truncated and not terminated and reward == 0.0
    env.reset(seed=1)
    _, _, terminated, truncated, info = env.step(ANSWER)
    assert terminated and not truncated and info["end_reason"] == "answer"


def test_rgb_array_render_draws_zoom_boxes():
    env = gym.make("visual_toolbox_v2", render_mode="rgb_array")
    image = np.zeros((300, 400, 3), np.uint8)
    env.reset(options={"image": image, "question": "q", "answer": "a", "gt_boxes": [(10, 10, 60, 60)]})
    env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [100, 100, 300, 250]}}</tool_call>')
    frame = env.render()
    assert frame.shape == (300, 400, 3)
    assert tuple(frame[100, 200]) == (230, 60, 60)  # zoom box edge in the first turn colour
    assert tuple(frame[10, 30]) == (40, 200, 60)  # ground-truth box edge in green
    assert frame[200, 200].sum() == 0  # inside the box, untouched


def test_html_transcript_shows_turns_images_and_reward():
    env = gym.make("visual_toolbox_v2", render_mode="html")
    env.reset(options={"image": gradient_image(), "question": "Which colour?", "answer": "red"})
    env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 200, 200]}}</tool_call>')
    env.step("<think>red</think><answer>red</answer>")
    page = env.render()
    html = page._repr_html_()
    assert html.count("<img") == 2 and "Which colour?" in html and "<td>score</td>" in html
    assert html.index("tool_call") < html.index("&lt;answer&gt;red")


PLUGIN_SETUP = """
[metadata]
name = deepeyes-plugin-demo
version = 0.0.1

[options]
py_modules = de_plugin_demo

[options.entry_points]
deepeyes.tools =
    brightness = de_plugin_demo:BrightnessTool
deepeyes.envs =
    brightness_env = de_plugin_demo:ENV_SPEC
"""

PLUGIN_MODULE = '''
from deepeyes_envs.tools import Tool, ToolResult

class BrightnessTool(Tool):
    name = "brightness_tool"
    description = "Report the mean brightness of the image."
    parameters = {"type": "object", "properties": {}, "required": []}

    def execute(self, arguments, context):
        return ToolResult(text=f"mean brightness {context.images[0].mean():.1f}")

ENV_SPEC = {"entry_point": "deepeyes_envs.env:ToolEnv",
            "kwargs": {"tools": ["brightness_tool"], "prompt_style": "dynamic"}}
'''


@pytest.mark.slow
def test_installed_plugin_adds_an_env_and_a_tool(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "setup.cfg").write_text(textwrap.dedent(PLUGIN_SETUP))
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    (src / "de_plugin_demo.py").write_text(PLUGIN_MODULE)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    code = textwrap.dedent("""
        import numpy as np, gymnasium as gym, deepeyes_envs
        from deepeyes_envs.messages import render_qwen
        env = gym.make("brightness_env")
        obs, _ = env.reset(options={"image": np.full((64, 64, 3), 100, np.uint8), "question": "q", "answer": "a"})
        assert '"name":"brightness_tool"' in render_qwen(obs["messages"])
        obs, *_ = env.step('<tool_call>{"name": "brightness_tool", "arguments": {}}</tool_call>')
        print(render_qwen(obs["messages"]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "mean brightness 100.0" in out.stdout
    assert deepeyes_envs  # the plugin was loaded in a fresh process, not this one
