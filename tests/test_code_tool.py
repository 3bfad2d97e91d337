"""python_tool and the visual_code env: code in, text and images out; every bad input is an observation.

The attacks of issue 13, part 5, go through ``env.step`` as a model would send them, most of them twice:
as an honest-looking program (stopped with a clear message, often by the import allow-list), and past
the allow-list (``np.__builtins__["__import__"]``), where the sandbox itself stops them.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from test_docs_add_a_tool import run_markdown

import deepeyes_envs
from deepeyes_envs.demo import play
from deepeyes_envs.messages import message_images
from deepeyes_envs.sandbox import Limits
from deepeyes_envs.tools import ToolContext, ToolError, make_tool

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"python_tool": {"cpu_s": 1, "wall_s": 30}}  # a generous wall clock: CPU limits must fire first
BYPASS = 'import numpy as np\nimp = np.__builtins__["__import__"]\n'  # around the allow-list


@pytest.fixture(scope="module")
def env():
    env = gym.make("visual_code", tool_options=OPTIONS)
    yield env
    env.close()


def image() -> np.ndarray:
    out = np.full((120, 160, 3), 90, np.uint8)
    out[20:50, 30:90] = (220, 30, 30)
    return out


def reset(env) -> None:
    env.reset(options={"image": image(), "question": "How many red pixels?", "answer": str(30 * 60)})


def code_call(code) -> dict:
    return {"name": "python_tool", "arguments": {"code": code}}


def texts(obs) -> str:
    return "".join(p["text"] for m in obs["messages"] for p in m["content"] if p["type"] == "text")


def test_visual_code_is_registered_with_a_prompt_from_both_schemas(env):
    obs, info = env.reset(seed=0)
    prompt = deepeyes_envs.render_qwen(obs["messages"])
    assert info["tools"] == ("image_zoom_in_tool", "python_tool")
    assert '"name":"python_tool"' in prompt and '"name":"image_zoom_in_tool"' in prompt and "show(image)" in prompt
    assert env.unwrapped.task.extra["kind"] == "count" and "dots" in env.unwrapped.task.question
    checked = gym.make("visual_code")
    check_env(checked.unwrapped)
    checked.close()


def test_prints_and_images_come_back_and_later_calls_use_them(env):
    reset(env)
    obs, reward, terminated, truncated, info = env.step(code_call(
        "import numpy as np\nred = (arrays[0] == (220, 30, 30)).all(axis=2)\nprint(int(red.sum()), 'red pixels')\n"
        "show(images[0].crop((20, 10, 100, 60)))"))
    assert not (terminated or truncated) and info["error"] is None
    record = info["tool_calls"][0]
    assert record["ok"] and record["status"] == "ok" and record["images_shown"] == 1
    (crop,) = message_images(obs["messages"])
    assert crop.shape == (50, 80, 3) and (crop[10:40, 10:70] == (220, 30, 30)).all()
    assert "Image 1:" in texts(obs) and "1800 red pixels" in texts(obs)
    # a zoom into the code's image, then code that reads both earlier results by index
    obs, *_, info = env.step({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 70, 45], "image_index": 1}})
    assert info["tool_calls"][0]["ok"]
    obs, *_, info = env.step(code_call("print([a.shape for a in arrays])"))
    assert "[(120, 160, 3), (50, 80, 3), " in texts(obs), texts(obs)
    *_, terminated, _, info = env.step("<answer>1800</answer>")
    assert terminated and info["reward_parts"]["acc"] == 1.0 and info["reward_parts"]["tool"] == 1.0


def test_no_output_is_said_and_errors_keep_the_printed_text(env):
    reset(env)
    obs, *_, info = env.step(code_call("x = 1"))
    assert info["error"] is None and "printed nothing and showed no image" in texts(obs)
    obs, *_, info = env.step(code_call("print('step 1 done')\n1 / 0"))
    assert "ZeroDivisionError: division by zero" in info["error"] and "Printed before it stopped:\nstep 1 done" in texts(obs)
    assert 'File "<code>", line 2' in info["error"] and "sandbox/execution.py" not in info["error"]


SECRET = "/tmp/deepeyes-code-tool-test-secret.txt"

BAD_CALLS = [
    ("syntax error", "print('unclosed", "SyntaxError: unterminated string literal"),
    ("infinite loop", "while True:\n    pass", "more than 1 s of CPU time"),
    ("huge allocation", "import numpy as np\nnp.ones((50000, 50000))", "Unable to allocate 18.6 GiB"),
    ("huge allocation, pure Python", "x = [0] * (1 << 31)", "MemoryError\n(the sandbox's memory limit is 1024 MiB)"),
    ("fork bomb", BYPASS + "os = imp('os')\nwhile True:\n    os.fork()", "allows 8 processes and threads"),
    ("read /etc/passwd", "print(open('/etc/passwd').read())", "No such file or directory: '/etc/passwd'"),
    ("read the secret", f"print(open({SECRET!r}).read())", "No such file or directory"),
    ("read the project", f"print(open({str(ROOT / 'README.md')!r}).read())", "No such file or directory"),
    ("write outside", f"open({str(ROOT / 'pwned.txt')!r}, 'w').write('x')", "No such file or directory"),
    ("write to /", "open('/pwned.txt', 'w').write('x')", "Read-only file system"),
    ("open a socket", "import socket", "module 'socket' is not available here"),
    ("connect past the allow-list", BYPASS + "s = imp('socket').socket()\ns.connect(('127.0.0.1', 22))",
     "Network is unreachable"),
    ("os.system", "import os\nos.system('id')", "module 'os' is not available here"),
    ("os.system past the allow-list", BYPASS + "print(imp('os').system('cat /etc/passwd'))", None),
    ("subprocess past the allow-list", BYPASS + "imp('subprocess').run(['id'])", "No such file or directory: 'id'"),
    ("ctypes", "import ctypes", "module 'ctypes' is not available here"),
    ("ctypes past the allow-list", BYPASS + "imp('ctypes').string_at(0)", "killed by SIGSEGV"),
    ("a module that is not allowed", "import scipy.ndimage", "module 'scipy.ndimage' is not available here"),
    ("a relative import", "from . import secrets", "relative imports are not available here"),
    ("print 100 MB", "print('x' * 100_000_000)", "printed more than 16384 bytes and was stopped"),
    ("a 20000x20000 image", "from PIL import Image\nshow(Image.new('L', (20000, 20000)))",
     "show() got a 20000x20000 image (400000000 pixels); the limit is 16777216 pixels"),
    ("a 20000x20000 view", "import numpy as np\nshow(np.broadcast_to(np.uint8(0), (20000, 20000, 3)))",
     "the limit is 16777216 pixels"),
    ("not an image", "show({'pixels': [1, 2, 3]})", "show() takes a PIL image or a numpy array, got dict"),
    ("not pixels", "import numpy as np\nshow(np.random.rand(8, 8, 3))", "uint8 (or bool) pixels, got float64"),
    ("sys.exit", "raise SystemExit(3)", "SystemExit: 3"),
]


@pytest.mark.parametrize(("what", "code", "expected"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_code_is_an_observation_and_the_env_keeps_working(env, what, code, expected):
    Path(SECRET).write_text("the answer is 42")
    reset(env)
    obs, _, terminated, truncated, info = env.step(code_call(code))
    assert not (terminated or truncated)
    if expected is None:  # os.system ran, but there is no shell and no file: exit status 127
        assert info["error"] is None and "32512" in texts(obs)
    else:
        assert expected in info["error"], info["error"]
        assert "Error: " in texts(obs) and expected in texts(obs)
    assert "the answer is 42" not in texts(obs) and "root:" not in texts(obs)
    assert not (ROOT / "pwned.txt").exists() and not Path("/pwned.txt").exists()
    obs, *_, info = env.step(code_call("print('still here')"))
    assert info["error"] is None and "still here" in texts(obs)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"code": 42}, "python_tool argument 'code' must be a string, got number"),
    ({"code": ["print(1)"]}, "must be a string, got array"),
    ({"code": None}, "must be a string, got null"),
    ({}, "python_tool is missing the required argument 'code'"),
    ({"code": "  \n"}, "code is empty"),
    ({"code": "x = 1\n" * 5000}, "code of 30000 characters exceeds the limit of 20000"),
    ({"code": "print(1)", "timeout": 100}, "unexpected argument(s) ['timeout']"),
])
def test_bad_arguments(env, arguments, message):
    reset(env)
    *_, terminated, _, info = env.step({"name": "python_tool", "arguments": arguments})
    assert not terminated and message in info["error"], info["error"]


def test_a_tool_call_written_as_text_with_bad_json_types(env):
    reset(env)
    *_, info = env.step('<tool_call>{"name": "python_tool", "arguments": {"code": 3.5}}</tool_call>')
    assert "must be a string, got number" in info["error"]
    *_, info = env.step('<tool_call>{"name": "python_tool", "arguments": {"code": "print(\'\\udcff\')"}}</tool_call>')
    assert "code is not valid text" in info["error"]  # a lone surrogate, escaped in the JSON


def test_tool_directly_and_its_options():
    tool = make_tool("python_tool", cpu_s=2, max_output_bytes=100)
    try:
        assert tool.limits == Limits(cpu_s=2, max_output_bytes=100)
        context = ToolContext(images=[image()], seen_sizes=[(160, 120)], strict=True)
        result = tool({"code": "print(arrays[0][25, 40].tolist())"}, context)
        assert result.text == "[220, 30, 30]\n" and result.images == () and result.info["status"] == "ok"
        with pytest.raises(ToolError, match="printed more than 100 bytes"):
            tool({"code": "print('y' * 200)"}, context)
    finally:
        tool.close()
    with pytest.raises(ValueError, match="cpu_s must be a positive number, got 0"):
        make_tool("python_tool", cpu_s=0)
    with pytest.raises(ValueError, match="tool 'python_tool' does not accept the options \\['cpus'\\]"):
        make_tool("python_tool", cpus=2)
    with pytest.raises(KeyError, match="no tool named 'no_such_tool'"):
        gym.make("visual_code", tool_options={"no_such_tool": {}})


def test_the_demo_solves_counting_tasks_with_code():
    rows, pages = play("visual_code", episodes=3, seed=0)
    assert [r["acc"] for r in rows] == [1.0, 1.0, 1.0] and all(r["reward"] == 2.0 for r in rows)
    assert all(r["turns"] == 2 for r in rows)
    assert all(page.count("<img") >= 2 for page in pages)  # the task image and the code's mask


def test_code_tool_page_runs(tmp_path, monkeypatch):
    namespace = run_markdown("code-tool.md", tmp_path, monkeypatch)
    assert json.loads(namespace["result"].output)["red"] == 1800
