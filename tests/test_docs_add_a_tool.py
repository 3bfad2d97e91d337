"""docs/add-a-tool.md runs as written, and its example tool (image_contrast_tool) behaves.

The page's code blocks are executed, so the docs cannot drift from the code. ``run_markdown`` is
shared with test_docs_pages.py; its conventions for fenced blocks:

* a first line ``# file: NAME`` writes the block to ``NAME`` under a temporary folder (yaml, modules);
* a first line ``# excerpt of PATH`` must appear verbatim in the repository file ``PATH``;
* every other ``python`` block runs, in page order, in one namespace, with the folder as cwd.
"""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import deepeyes_envs
from deepeyes_envs.registry import load_registry_file
from deepeyes_envs.tools import ToolContext, ToolError, make_tool, registered_tools

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(page: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of docs/``page``."""
    return FENCE.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))


def run_markdown(page: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Write, check and run the page's blocks (see the module docstring); return the namespace."""
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    namespace: dict = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    ran = 0
    for lang, body in code_blocks(page):
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            target = folder / first.removeprefix("# file: ")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body, encoding="utf-8")
        elif first.startswith("# excerpt of "):
            source = (ROOT / first.removeprefix("# excerpt of ")).read_text(encoding="utf-8")
            assert rest in source, f"{page}: the excerpt of {first[13:]} no longer matches the file"
        elif lang == "python":
            exec(compile(body, f"docs/{page}", "exec"), namespace)  # noqa: S102 - the docs are ours
            ran += 1
    assert ran, f"{page} has no runnable python block"
    return namespace


def test_add_a_tool_page_runs(tmp_path, monkeypatch):
    namespace = run_markdown("add-a-tool.md", tmp_path, monkeypatch)
    assert "visual_toolbox_contrast" in deepeyes_envs.registered_envs()
    assert namespace["record"]["name"] == "image_contrast_tool"


def test_page_shows_the_shipped_class():
    excerpts = [b for _, b in code_blocks("add-a-tool.md") if b.startswith("# excerpt of deepeyes_envs/tools/")]
    assert len(excerpts) == 1 and "class ContrastTool(Tool):" in excerpts[0]


# --- the tool itself ---------------------------------------------------------------------------


def context(*images: np.ndarray, allow_image_index: bool = False, strict: bool = True) -> ToolContext:
    return ToolContext(images=list(images), seen_sizes=[(28, 28)] * len(images),
                       allow_image_index=allow_image_index, strict=strict)


def grey(values: list[int]) -> np.ndarray:
    """A 1 x N image whose channels all hold ``values``."""
    return np.repeat(np.array(values, np.uint8)[None, :, None], 3, axis=2)


def test_registered_but_not_offered_by_any_built_in_env():
    assert "image_contrast_tool" in registered_tools()
    for name, spec in load_registry_file().items():
        assert "image_contrast_tool" not in spec["kwargs"].get("tools", []), name
    obs, info = gym.make("visual_toolbox").reset(seed=0)
    assert "image_contrast_tool" not in deepeyes_envs.render_qwen(obs["messages"])
    assert "image_contrast_tool" not in info["tools"]


def test_factor_one_is_identity_and_leaves_the_input_alone():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    before = image.copy()
    (out,) = make_tool("image_contrast_tool")({"factor": 1}, context(image)).images
    assert out.dtype == np.uint8 and out is not image
    np.testing.assert_array_equal(out, before)
    np.testing.assert_array_equal(image, before)


def test_contrast_moves_values_from_the_mean_and_clips():
    result = make_tool("image_contrast_tool")({"factor": 3}, context(grey([0, 100, 200, 100])))
    assert result.info["mean_grey"] == 100.0
    assert result.images[0][0, :, 1].tolist() == [0, 100, 255, 100]  # 100 -/+ 300, clipped


def test_factor_below_one_flattens():
    image = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    (out,) = make_tool("image_contrast_tool")({"factor": 0.25}, context(image)).images
    assert out.std() < 0.3 * image.std()


def test_mean_uses_luma_weights():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    assert make_tool("image_contrast_tool")({"factor": 1}, context(red)).info["mean_grey"] == pytest.approx(59.8)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"factor": 0}, "factor must be above 0 and at most 10, got 0"),
    ({"factor": -2}, "factor must be above 0"),
    ({"factor": 10.5}, "at most 10"),
    ({"factor": float("nan")}, "must be finite"),
    ({"factor": float("inf")}, "must be finite"),
    ({"factor": "2"}, "must be a number, got string"),
    ({"factor": True}, "must be a number, got boolean"),
    ({"factor": [2]}, "must be a number, got array"),
    ({}, "missing the required argument 'factor'"),
    ({"factor": 2, "bbox_2d": [0, 0, 5, 5]}, "unexpected argument(s) ['bbox_2d']"),
    ({"factor": 2, "image_index": 1.5}, "must be an integer"),
])
def test_bad_arguments_are_tool_errors(arguments, message):
    with pytest.raises(ToolError) as err:
        make_tool("image_contrast_tool")(arguments, context(grey([10, 20])))
    assert message in str(err.value)


def test_image_index_only_where_the_env_allows_it():
    first, second = grey([10, 20]), grey([50, 150])
    tool = make_tool("image_contrast_tool")
    assert tool({"factor": 2, "image_index": 1}, context(first, second)).info["image_index"] == 0
    picked = tool({"factor": 2, "image_index": 1}, context(first, second, allow_image_index=True))
    assert picked.info["image_index"] == 1 and picked.images[0][0, :, 0].tolist() == [0, 200]
    with pytest.raises(ToolError, match="image_index 2 does not exist"):
        tool({"factor": 2, "image_index": 2}, context(first, second, allow_image_index=True))


def test_bad_call_in_an_episode_is_an_observation_and_the_episode_goes_on():
    env = gym.make("visual_toolbox", tools=["image_zoom_in_tool", "image_contrast_tool"])
    env.reset(options={"image": np.full((64, 64, 3), 90, np.uint8), "question": "q", "answer": "a"})
    obs, reward, terminated, truncated, info = env.step({"name": "image_contrast_tool", "arguments": {"factor": 0}})
    assert not (terminated or truncated) and "factor must be above 0" in info["error"]
    assert "Error: factor must be above 0" in deepeyes_envs.render_qwen_observation(obs["messages"])
    obs, *_, info = env.step({"name": "image_contrast_tool", "arguments": {"factor": 2}})
    assert info["error"] is None and info["tool_calls"][0]["ok"]
