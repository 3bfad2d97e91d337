"""Task sources, routing and multiple-choice text; the package stays free of heavy imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deepeyes_envs.data.tasks import (
    ConcatTaskSource,
    ListTaskSource,
    Task,
    TaskSource,
    as_task_source,
    env_name_of,
    format_multiple_choice,
    option_letter,
)


def _tasks(n: int, prefix: str = "q") -> list[Task]:
    return [Task(question=f"{prefix}{i}", answer=str(i)) for i in range(n)]


def test_list_source_indexing_and_errors():
    src = ListTaskSource(_tasks(3))
    assert isinstance(src, TaskSource) and len(src) == 3
    assert src[0].question == "q0" and src[-1].question == "q2" and src[np.int64(1)].question == "q1"
    with pytest.raises(IndexError):
        src[3]
    with pytest.raises(IndexError):
        src[-4]
    with pytest.raises(TypeError):
        src["0"]
    with pytest.raises(TypeError):
        ListTaskSource(["not a task"])
    with pytest.raises(IndexError, match="empty"):
        ListTaskSource([]).sample(np.random.default_rng(0))


def test_sampling_is_decided_by_the_callers_rng_and_covers_all_rows():
    src = ListTaskSource(_tasks(5))
    draws = [src.sample(np.random.default_rng(1)).question for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    assert {src.sample(rng).question for _ in range(200)} == {f"q{i}" for i in range(5)}


def test_concat_source_maps_indices_across_parts():
    src = ConcatTaskSource([ListTaskSource(_tasks(2, "a")), ListTaskSource([]), ListTaskSource(_tasks(3, "b"))])
    assert len(src) == 5
    assert [t.question for t in src] == ["a0", "a1", "b0", "b1", "b2"]
    assert src[2].question == "b0" and src[-1].question == "b2"


def test_as_task_source_wraps_lists_and_passes_sources_through():
    src = ListTaskSource(_tasks(2))
    assert as_task_source(src) is src
    wrapped = as_task_source(_tasks(2))
    assert isinstance(wrapped, TaskSource) and wrapped[1].question == "q1"


def test_env_name_routing_treats_none_and_empty_as_the_plain_env():
    assert env_name_of(Task(question="q", answer="a")) == "visual_toolbox_v2"
    assert env_name_of(Task(question="q", answer="a", env_name="")) == ""
    assert env_name_of(Task(question="q", answer="a", env_name=None)) == ""  # type: ignore[arg-type]


def test_multiple_choice_text():
    text = format_multiple_choice("Which colour?", ["red", "blue"])
    assert text.splitlines() == [
        "Which colour?",
        "(A) red",
        "(B) blue",
        "Answer with the option's letter from the given choices directly.",
    ]
    assert option_letter(25) == "Z"
    with pytest.raises(ValueError):
        option_letter(26)


def test_importing_the_package_and_loaders_pulls_in_no_heavy_dependency():
    code = (
        "import sys, deepeyes_envs, deepeyes_envs.synthetic\n"
        "import deepeyes_envs.data.check, deepeyes_envs.data.hf, deepeyes_envs.data.mixing, deepeyes_envs.data.parquet\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
