"""ToolEnv: one multi-turn episode of a vision-language model answering a question with tools.

``reset`` shows the model the question and image(s); each ``step`` takes one assistant turn, runs
the tool calls in it and answers with what the tools returned; the episode ends on an answer, a turn
without a tool call, an empty or cut-off reply, or after ``max_turns`` generations. The reward is 0
until the last step, which carries the outcome reward from the env's judge.

One class serves every registered env; the flavour comes from its keyword arguments (see
envs_registry.yaml): ``visual_toolbox_v2`` reproduces DeepEyes exactly, ``visual_toolbox`` reads
boxes in the frame of the image the model saw and generates its prompt from the tools' schemas.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import gymnasium as gym
import numpy as np

from . import prompts
from .data.tasks import Task, TaskSource, as_task_source
from .images import (
    MAX_DECODED_PIXELS,
    MAX_PIXELS,
    MIN_PIXELS,
    PATCH_FACTOR,
    check_pixel_budget,
    seen_size,
    to_rgb_array,
)
from .judges import Judge
from .judges import make_judge as _make_judge
from .messages import (
    IM_END,
    Message,
    image_part,
    message,
    parts_from_placeholder_text,
    render_qwen_observation,
    strip_end_of_turn,
    text_part,
)
from .parsing import ParsedTurn, ToolCall, parse_turn
from .rewards import EpisodeOutcome, grounding_iou, score_episodes
from .spaces import AgentTurnSpace, ConversationSpace
from .tools import Tool, ToolContext, ToolError, make_tool

logger = logging.getLogger(__name__)

PROMPT_STYLES = ("deepeyes_v2", "dynamic", "plain")
# Where a box's numbers are measured: the original image's pixels (DeepEyes checkpoints), the pixels of
# the image the model saw (Qwen2/2.5-VL), or thousandths of that image's width and height (Qwen3-VL).
COORDINATE_FRAMES = ("original", "seen", "relative_1000")


class ToolEnv(gym.Env):
    """A Gymnasium env over tasks with images and tools. See the module docstring and docs/env.md."""

    metadata = {"render_modes": ["rgb_array", "html"], "render_fps": 1}

    def __init__(
        self,
        *,
        tools: Sequence[str] = ("image_zoom_in_tool",),
        advertised_tools: Optional[Sequence[str]] = None,
        tool_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        prompt_style: str = "dynamic",
        coordinate_frame: str = "seen",
        crop_of_crop: bool = False,
        strict: bool = True,
        max_turns: int = 5,
        max_calls_per_turn: int = 3,
        task_source: Any = None,
        judge: Any = "rule",
        defer_reward: bool = False,
        call_cost: Optional[float] = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        image_factor: int = PATCH_FACTOR,
        max_image_pixels: int = MAX_DECODED_PIXELS,
        max_action_chars: int = 200_000,
        render_mode: Optional[str] = None,
    ):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        if coordinate_frame not in COORDINATE_FRAMES:
            raise ValueError(f"coordinate_frame must be one of {COORDINATE_FRAMES}, got {coordinate_frame!r}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        check_pixel_budget(image_factor, min_pixels, max_pixels)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.tool_names = tuple(tools)
        self.advertised_tools = tuple(self.tool_names if advertised_tools is None else advertised_tools)
        # Options apply wherever the env makes the tool (a task may bring its own tool list), so they
        # are checked here for every named tool, offered or not: a typo fails at construction.
        self.tool_options = {name: dict(opts) for name, opts in (tool_options or {}).items()}
        self._tools = {name: self._make_tool(name) for name in (*self.tool_options, *self.tool_names)}
        self.prompt_style = prompt_style
        self.coordinate_frame = coordinate_frame
        self.crop_of_crop = crop_of_crop
        self.strict = strict
        self.max_turns = max_turns
        self.max_calls_per_turn = max_calls_per_turn if strict else 1
        self.task_source: TaskSource = resolve_task_source(task_source)
        self.judge: Judge = _make_judge(judge)
        self.defer_reward = defer_reward
        if call_cost is not None and not 0.0 <= call_cost <= 0.8:
            raise ValueError(f"call_cost must be None (DeepEyes' tool bonus) or within [0, 0.8], got {call_cost}")
        self.call_cost = call_cost
        self.min_pixels, self.max_pixels, self.image_factor = min_pixels, max_pixels, image_factor
        self.max_image_pixels = max_image_pixels
        self.render_mode = render_mode
        self.observation_space = ConversationSpace()
        self.action_space = AgentTurnSpace(max_length=max_action_chars)
        self._reset_state(None)

    # -- episode state -----------------------------------------------------------------------
    def _reset_state(self, task: Optional[Task]) -> None:
        self.task = task
        self.messages: list[Message] = []
        self.images: list[np.ndarray] = []
        self.seen_sizes: list[tuple[int, int]] = []
        self.offsets: list[Optional[tuple[float, float]]] = []  # image i's top-left in the original image
        self.zoom_boxes: list[tuple[float, float, float, float]] = []  # in original-image pixels
        self.turn = 0
        self.n_image_observations = 0
        self._response_chunks: list[str] = []
        self.reward_parts: Optional[dict[str, Any]] = None
        self._done = task is None

    def _add_image(self, image: np.ndarray, offset: Optional[tuple[float, float]]) -> None:
        image.flags.writeable = False  # crops are views of it: nobody may change the original's pixels
        self.images.append(image)
        height, width = image.shape[:2]
        self.seen_sizes.append(seen_size(width, height, self.min_pixels, self.max_pixels, self.image_factor))
        self.offsets.append(offset)

    # -- reset ---------------------------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        super().reset(seed=seed)
        task = self._task_from_options(options or {})
        self._reset_state(task)
        for tool in self._tools.values():
            tool.reset()
        images = task.load_images(max_pixels=self.max_image_pixels)  # TaskImageError names the task and image
        if not images:
            raise task.error(f"task {task.task_id or task.question[:40]!r} has no image", field="images")
        for image in images:
            self._add_image(image, (0.0, 0.0) if not self.images else None)
        prompt = self._prompt_messages(task)
        self.messages.extend(prompt)
        return {"messages": tuple(prompt)}, self._reset_info()

    def _task_from_options(self, options: dict[str, Any]) -> Task:
        if "task" in options:
            return options["task"]
        if "image" in options or "question" in options:
            missing = [k for k in ("image", "question", "answer") if k not in options]
            if missing:
                raise ValueError(f"reset(options=...) with an image needs 'image', 'question' and 'answer'; "
                                 f"missing {missing}")
            image = to_rgb_array(options["image"], name="options['image']", max_pixels=self.max_image_pixels)
            return Task(question=options["question"], answer=str(options["answer"]), images=(image,),
                        options=options.get("choices"), gt_boxes=tuple(options.get("gt_boxes", ())),
                        data_source=options.get("data_source", ""))
        return self.task_source.sample(self.np_random)

    def _prompt_messages(self, task: Task) -> list[Message]:
        tools = self._tools_for(task)
        if task.prompt is not None and self.prompt_style != "dynamic":
            return self._verbatim_prompt(task)
        question = f"\n{task.question}"
        if self.prompt_style == "deepeyes_v2":
            return [message("system", prompts.SYSTEM_PROMPT_V2),
                    message("user", image_part(self.images[0]), question + prompts.USER_PROMPT_V2)]
        if self.prompt_style == "plain" or not tools:
            return [message("system", prompts.PLAIN_SYSTEM_PROMPT),
                    message("user", image_part(self.images[0]), question + prompts.PLAIN_USER_PROMPT)]
        frame = self.coordinate_frame
        system = prompts.dynamic_system_prompt((self._tools[t].schema_for_frame(frame) for t in self._advertised(task)),
                                               frame)
        user_parts = [p for i, img in enumerate(self.images) for p in (self._image_label(i), image_part(img)) if p]
        return [message("system", system), message("user", *user_parts, question + self._user_prompt(task))]

    def _verbatim_prompt(self, task: Task) -> list[Message]:
        """A DeepEyes row's own prompt, with its ``<image>`` placeholders bound to the task images."""
        out, remaining = [], list(self.images)
        for entry in task.prompt:
            n = entry["content"].count("<image>")
            out.append({"role": entry["role"],
                        "content": parts_from_placeholder_text(entry["content"], remaining[:n])})
            remaining = remaining[n:]
        if remaining:
            raise ValueError(f"task {task.task_id!r}: prompt has fewer <image> placeholders than images")
        return out

    def _tools_for(self, task: Task) -> tuple[str, ...]:
        if task.tools is None:
            return self.tool_names
        unknown = [t for t in task.tools if t not in self._tools]
        for name in unknown:
            self._tools[name] = self._make_tool(name)
        return tuple(task.tools)

    def _make_tool(self, name: str) -> Tool:
        return make_tool(name, **self.tool_options.get(name, {}))

    def _user_prompt(self, task: Task) -> str:
        if self.prompt_style == "deepeyes_v2":
            return prompts.USER_PROMPT_V2
        advertised = self._advertised(task)
        return prompts.dynamic_user_prompt(advertised) if advertised else prompts.PLAIN_USER_PROMPT

    def _advertised(self, task: Task) -> list[str]:
        """The tools the prompt lists: a task's own tool list is advertised whole."""
        return [t for t in self._tools_for(task) if t in self.advertised_tools or task.tools is not None]

    def _image_label(self, index: int) -> str:
        """Images are numbered in the text only where the model can refer to them (crop of crop)."""
        return f"Image {index}:" if self.crop_of_crop and self.prompt_style == "dynamic" else ""

    def _reset_info(self) -> dict[str, Any]:
        width, height = self.images[0].shape[1], self.images[0].shape[0]
        return {"task_id": self.task.task_id, "data_source": self.task.data_source,
                "image_size": (width, height), "seen_size": self.seen_sizes[0],
                "coordinate_frame": self.coordinate_frame, "max_turns": self.max_turns,
                "tools": self._tools_for(self.task)}

    # -- step ------------------------------------------------------------------------------------
    def step(self, action: Any):
        if self._done:
            raise RuntimeError("the episode is over (or never started): call reset() before step()")
        text, finish_reason, warnings = self._action_text(action)
        self.turn += 1
        content = strip_end_of_turn(text)
        self.messages.append(message("assistant", content))
        self._response_chunks.append(content + IM_END)
        info: dict[str, Any] = {"turn": self.turn, "finish_reason": finish_reason, "warnings": warnings,
                                "tool_calls": [], "error": None}
        end, parsed = self._end_reason(text, finish_reason, info)
        if end is not None:
            return self._finish(end, info)
        obs_messages = self._run_tools(parsed, info)
        self.messages.extend(obs_messages)
        self._response_chunks.append(render_qwen_observation(obs_messages))
        return {"messages": tuple(obs_messages)}, 0.0, False, False, info

    def _action_text(self, action: Any) -> tuple[str, Optional[str], list[str]]:
        """Normalise an action to (text, finish_reason, warnings)."""
        warnings: list[str] = []
        finish_reason = None
        if isinstance(action, dict) and "name" in action:
            if not isinstance(action.get("arguments"), dict):
                raise TypeError("a structured tool call needs {'name': str, 'arguments': dict}")
            action = ToolCall(name=str(action["name"]), arguments=action["arguments"]).to_text()
        elif isinstance(action, dict):
            finish_reason = action.get("finish_reason")
            action = action.get("text")
        if isinstance(action, (bytes, bytearray)):
            decoded = bytes(action).decode("utf-8", errors="replace")
            if "\ufffd" in decoded:
                warnings.append("the turn was not valid UTF-8; undecodable bytes were replaced with U+FFFD")
            action = decoded
        if not isinstance(action, str):
            raise TypeError(f"an action is a str, bytes, {{'text': ...}} or {{'name', 'arguments'}}, "
                            f"got {type(action).__name__}")
        clean = action.encode("utf-8", errors="replace").decode("utf-8")
        if clean != action:
            warnings.append("the turn held characters that cannot be encoded as UTF-8; they were replaced")
        return clean, finish_reason, warnings

    def _end_reason(self, text: str, finish_reason: Optional[str],
                    info: dict[str, Any]) -> tuple[Optional[tuple], Optional[ParsedTurn]]:
        """((terminated, truncated, reason) when this turn ends the episode, else None; the parsed turn)."""
        if len(text) > self.action_space.max_length:
            info["error"] = f"turn of {len(text)} characters exceeds the limit of {self.action_space.max_length}"
            return (False, True, "turn_too_long"), None
        if finish_reason == "length":
            return (False, True, "length"), None
        if not text.strip():
            return (True, False, "empty_turn"), None
        parsed = parse_turn(text, strict=self.strict)
        info["parsed"] = parsed.kind
        if parsed.kind == "answer":
            info["answer"] = parsed.answer
            return (True, False, "answer"), parsed
        if parsed.kind == "no_tool_call":
            return (True, False, "no_tool_call"), parsed
        if self.turn >= self.max_turns:
            return (False, True, "max_turns"), parsed
        return None, parsed

    def _run_tools(self, parsed: ParsedTurn, info: dict[str, Any]) -> list[Message]:
        if parsed.kind == "invalid":
            info["error"] = parsed.error
            return [self._error_observation(parsed.error)]
        calls = parsed.calls[: self.max_calls_per_turn]
        responses = [self._run_call(call, info) for call in calls]
        if len(parsed.calls) > len(calls):
            responses.append([text_part(f"Error: only {self.max_calls_per_turn} tool calls per turn are run; "
                                        f"{len(parsed.calls) - len(calls)} were ignored")])
        if not self.strict:
            (parts,) = responses
            return [message("user", *parts)]
        wrapped = [p for r in responses for p in (text_part("<tool_response>"), *r, text_part("</tool_response>\n"))]
        return [message("user", *wrapped, self._user_prompt(self.task).lstrip("\n"))]

    def _run_call(self, call: ToolCall, info: dict[str, Any]) -> list:
        record: dict[str, Any] = {"name": call.name, "arguments": call.arguments, "ok": False, "error": None}
        info["tool_calls"].append(record)
        try:
            tool = self._tool(call.name)
            result = tool(call.arguments, self._context())
        except ToolError as exc:
            return self._call_failed(record, info, str(exc))
        except Exception as exc:  # a broken tool must not kill the episode: the model reads the error
            logger.debug("tool %s raised on %r", call.name, call.arguments, exc_info=True)
            return self._call_failed(record, info, f"{type(exc).__name__}: {exc}")
        record.update(ok=True, **result.info)
        self._record_zoom(record)
        parts: list = []
        base_index = len(self.images)
        for k, image in enumerate(result.images):
            self._add_image(image, self._offset_of(record))
            self.n_image_observations += 1
            parts.extend(p for p in (self._image_label(base_index + k), image_part(image)) if p)
        if result.text:
            parts.append(text_part(result.text))
        if self.strict:
            return parts
        return [text_part("<tool_response>"), *parts, text_part(prompts.USER_PROMPT_V2 + "</tool_response>")]

    def _tool(self, name: str) -> Tool:
        if name not in self._tools_for(self.task):
            raise ToolError(f"Unknown tool name: {name}")
        return self._tools[name]

    def _call_failed(self, record: dict[str, Any], info: dict[str, Any], error: str) -> list:
        record["error"] = error
        info["error"] = info["error"] or error
        return [text_part(f"Error: {error}")]

    def _error_observation(self, error: str) -> Message:
        if self.strict:
            return message("user", text_part(f"<tool_response>Error: {error}</tool_response>\n"),
                           self._user_prompt(self.task).lstrip("\n"))
        return message("user", text_part(f"Error: {error}"))

    def _context(self) -> ToolContext:
        return ToolContext(images=self.images, seen_sizes=self.seen_sizes, coordinate_frame=self.coordinate_frame,
                           allow_image_index=self.crop_of_crop, strict=self.strict, task=self.task)

    def _offset_of(self, record: dict[str, Any]) -> Optional[tuple[float, float]]:
        """Where a tool's new image sits in the original image: known for crops of placed images only."""
        parent = self.offsets[record["image_index"]] if "crop_pixels" in record else None
        if parent is None:
            return None
        return (parent[0] + record["crop_pixels"][0], parent[1] + record["crop_pixels"][1])

    def _record_zoom(self, record: dict[str, Any]) -> None:
        """Add the zoom box in original-image pixels, and its IoU against ground truth, to ``record``."""
        if "bbox_image" not in record:
            return
        offset = self.offsets[record["image_index"]]
        if offset is None:  # a crop of a rotated image has no place in the original
            return
        x1, y1, x2, y2 = record["bbox_image"]
        box = (x1 + offset[0], y1 + offset[1], x2 + offset[0], y2 + offset[1])
        record["bbox_original"] = list(box)
        record["iou"] = grounding_iou(box, self.task.gt_boxes)
        self.zoom_boxes.append(box)

    # -- the end -----------------------------------------------------------------------------------
    def _finish(self, end: tuple, info: dict[str, Any]):
        terminated, truncated, reason = end
        self._done = True
        info["end_reason"] = reason
        outcome = EpisodeOutcome(response_text="".join(self._response_chunks), task=self.task,
                                 n_image_observations=self.n_image_observations, call_cost=self.call_cost)
        info["episode_summary"] = self.episode_summary()
        if self.defer_reward:
            info["outcome"] = outcome
            return {"messages": ()}, 0.0, terminated, truncated, info
        parts = score_episodes([outcome], self.judge)[0]
        self.reward_parts = info["reward_parts"] = parts.as_dict()
        return {"messages": ()}, float(parts.score), terminated, truncated, info

    def episode_summary(self) -> dict[str, Any]:
        ious = [r for r in (grounding_iou(b, self.task.gt_boxes) for b in self.zoom_boxes) if r is not None]
        return {"turns": self.turn, "image_observations": self.n_image_observations,
                "zoom_boxes": [list(b) for b in self.zoom_boxes],
                "mean_iou": float(np.mean(ious)) if ious else None}

    @property
    def response_text(self) -> str:
        """Everything after the prompt as the model's context holds it (Qwen chat text)."""
        return "".join(self._response_chunks)

    def close(self) -> None:
        """Close every tool (the code tool's sandbox workers among them); the env may be reset again after."""
        for tool in self._tools.values():
            tool.close()
        super().close()

    # -- rendering ---------------------------------------------------------------------------------
    def render(self):
        from .render import draw_boxes, transcript_html

        if self.task is None:
            return None
        if self.render_mode == "rgb_array":
            return draw_boxes(self.images[0], self.zoom_boxes, self.task.gt_boxes)
        if self.render_mode == "html":
            return transcript_html(self.messages, self.zoom_boxes, self.task, self.reward_parts)
        return None


def resolve_task_source(spec: Any) -> TaskSource:
    """None: synthetic V*-like tasks (so ``gym.make`` works with no data); a mapping: the keyword arguments
    of a ``SyntheticTaskSource`` (how a registry yaml picks a synthetic family); a str or Path: a DeepEyes
    parquet file; otherwise a TaskSource or a list of tasks."""
    if spec is None or isinstance(spec, Mapping):
        from .synthetic import SyntheticTaskSource

        return SyntheticTaskSource(**{"n": 1000, "seed": 0, **(spec or {})})
    if isinstance(spec, (str, os.PathLike)):
        from .data.parquet import load_deepeyes_parquet

        return load_deepeyes_parquet(spec)
    return as_task_source(spec)
