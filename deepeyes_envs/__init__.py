"""deepeyes_envs: Gymnasium environments where vision-language models think with images.

Importing the package registers every env of envs_registry.yaml (and of installed plugins) with
gymnasium, so ``gym.make("visual_toolbox_v2")`` works right after ``import deepeyes_envs``.
It never imports torch, transformers or ray.
"""

from .data.tasks import BadRow, Task, TaskError, TaskImageError
from .env import ToolEnv
from .judges import Judge, JudgeRequest, Verdict, make_judge
from .messages import render_qwen, render_qwen_observation
from .registry import env_id_for, make_for_task, register_all, register_env, registered_envs
from .tools import Tool, ToolContext, ToolError, ToolResult, register_tool

register_all()

__all__ = [
    "BadRow", "Judge", "JudgeRequest", "Task", "TaskError", "TaskImageError", "Tool", "ToolContext", "ToolEnv",
    "ToolError", "ToolResult", "Verdict", "env_id_for", "make_for_task", "make_judge", "register_all",
    "register_env", "register_tool", "registered_envs", "render_qwen", "render_qwen_observation",
]
