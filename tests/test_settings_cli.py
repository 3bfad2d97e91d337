"""Command lines built from settings sections, and the one judge setting that training, evaluation and selection
share: options carry the field's type, choices, help and default; an option left out leaves the section's
default; bad values are the same errors a config file gets."""

from __future__ import annotations

import argparse
import json
from typing import Literal, Optional

import pytest

from deepeyes_agent.offline import evaluate, selection
from deepeyes_agent.settings import (
    ConfigError,
    JudgeSetting,
    Section,
    add_section_arguments,
    judge_setting,
    judge_text,
    section_from_arguments,
    setting,
)
from deepeyes_agent.training.config import load_config
from deepeyes_envs.judges import LLMJudge, make_judge


class Probe(Section):
    k: int = setting(2, "Rollouts per 100% of the batch.", ge=1)
    temperature: float = setting(1.0, "Sampling temperature.")
    shuffle: bool = setting(True, "Shuffle the options.")
    combine: Literal["all", "any"] = setting("all", "How rules combine.")
    band: Optional[tuple[float, float]] = setting((0.0, 0.5), "Difficulty band.")
    max_turns: Optional[int] = setting(None, "Turn cap.")
    env_kwargs: dict = setting({}, "Env keyword arguments.")
    judge: JudgeSetting = judge_setting()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe")
    add_section_arguments(parser, Probe)
    return parser


def _probe(*argv: str) -> Probe:
    return section_from_arguments(Probe, _parser().parse_args(argv))


def test_every_field_is_an_option_with_its_help_and_default():
    text = " ".join(_parser().format_help().split())  # argparse wraps lines
    for flag, shown in [("--k K", "Rollouts per 100% of the batch. (default: 2)"),
                        ("--temperature TEMPERATURE", "Sampling temperature. (default: 1.0)"),
                        ("--shuffle, --no-shuffle", "Shuffle the options. (default: True)"),
                        ("--combine {all,any}", "How rules combine. (default: all)"),
                        ("--band BAND BAND", "Difficulty band. (default: 0.0 0.5)"),
                        ("--no-band", "set band to null"),
                        ("--max-turns MAX_TURNS", "Turn cap. (default: null)"),
                        ("--env-kwargs YAML", "Env keyword arguments. (default: {})"),
                        ("--judge YAML", "Judge spec: 'rule', 'llm'")]:
        assert f"{flag} {shown}" in text, (flag, shown)
    assert "on_failure: fallback} (docs/judge.md). (default: rule)" in text
    assert "--no-max-turns" not in text  # None is already its default


def test_options_left_out_keep_the_sections_defaults():
    assert vars(_parser().parse_args([])) == {}
    assert _probe() == Probe()


def test_options_are_typed_by_the_fields():
    probe = _probe("--k", "3", "--temperature", "0.5", "--no-shuffle", "--combine", "any", "--no-band",
                   "--max-turns", "4", "--env-kwargs", '{"tools": []}', "--judge", "{type: llm, model: m}")
    assert probe == Probe(k=3, temperature=0.5, shuffle=False, combine="any", band=None, max_turns=4,
                          env_kwargs={"tools": []}, judge={"type": "llm", "model": "m"})
    assert _probe("--band", "0.1", "0.9").band == (0.1, 0.9)


def test_bad_values_are_the_config_files_errors(capsys):
    with pytest.raises(ConfigError, match=r"^k: Input should be greater than or equal to 1 \(got 0\)$"):
        _probe("--k", "0")
    with pytest.raises(ConfigError, match="env_kwargs: Input should be a valid dictionary"):
        _probe("--env-kwargs", "[1, 2]")
    for argv, message in [(["--combine", "some"], "invalid choice: 'some'"),
                          (["--k", "two"], "invalid int value: 'two'"),
                          (["--env-kwargs", "{tools: ["], "is not YAML or JSON"),
                          (["--band", "0", "1", "--no-band"], "not allowed with argument")]:
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
        assert message in capsys.readouterr().err


SPEC = {"type": "llm", "base_url": "http://127.0.0.1:1/v1", "model": "judge-7b", "on_failure": "raise"}
SPEC_TEXT = '{type: llm, base_url: "http://127.0.0.1:1/v1", model: judge-7b, on_failure: raise}'


def _eval_args(*argv: str) -> argparse.Namespace:
    return evaluate.build_parser().parse_args(["--endpoint", "http://x/v1", "--benchmark", "synthetic:1",
                                               "--out", "o", *argv])


def _selection_args(*argv: str) -> argparse.Namespace:
    return selection.build_parser().parse_args(["--endpoint", "http://x/v1", "--data", "d", "--out", "o", *argv])


def test_the_judge_is_written_the_same_way_in_training_evaluation_and_selection():
    train = load_config(None, ["model.build_tiny=true", f"rollout.judge={SPEC_TEXT}"]).rollout.judge
    evaluation = evaluate.config_from_arguments(_eval_args("--judge", SPEC_TEXT), {}).judge
    selecting = section_from_arguments(selection.SelectionConfig, _selection_args("--judge", SPEC_TEXT)).judge
    assert train == evaluation == selecting == SPEC
    judge = make_judge(train)
    assert isinstance(judge, LLMJudge) and judge.base_url == SPEC["base_url"] and judge.on_failure == "raise"
    assert evaluate.config_from_arguments(_eval_args("--judge", "llm"), {}).judge == "llm"
    assert evaluate.EvalConfig(judge=SPEC).model_dump(mode="json")["judge"] == SPEC  # what run.json records


def test_a_bad_judge_spec_is_one_error_everywhere(capsys):
    with pytest.raises(ConfigError, match="rollout.judge: .*unknown judge type 'oracle'"):
        load_config(None, ["model.build_tiny=true", "rollout.judge=oracle"])
    with pytest.raises(ConfigError, match="rollout.judge: .*unexpected keyword argument 'url'"):
        load_config(None, ["model.build_tiny=true", "rollout.judge={type: llm, url: x}"])
    with pytest.raises(ConfigError, match="judge: .*a judge spec is a name or a mapping"):
        evaluate.config_from_arguments(_eval_args("--judge", "3"), {})
    assert evaluate.main(["--endpoint", "http://127.0.0.1:1/v1", "--benchmark", "synthetic:1", "--out", "o",
                          "--judge", "oracle"]) == 2
    assert "evaluate: judge: Value error, not a judge spec: unknown judge type 'oracle'" in capsys.readouterr().err
    assert selection.main(["--endpoint", "http://127.0.0.1:1/v1", "--data", "d", "--out", "o",
                           "--judge", "{type: llm, on_failure: ignore}"]) == 2
    assert "selection: judge: Value error, not a judge spec: on_failure must be" in capsys.readouterr().err


def test_evaluation_asks_its_rules_first_and_an_llm_judge_falls_back_unless_told_otherwise():
    assert evaluate.EvalConfig().make_judge().llm is None  # 'rule': what the rules leave undecided scores 0
    llm = evaluate.EvalConfig(judge="llm").make_judge().llm
    assert isinstance(llm, LLMJudge) and llm.on_failure == "fallback"
    assert evaluate.EvalConfig(judge=SPEC).make_judge().llm.on_failure == "raise"


def test_evaluation_options_go_over_the_runs_settings():
    run = {"max_turns": 5, "max_tokens": 64, "env": "visual_toolbox_v2", "env_kwargs": {"prompt_style": "x"}}
    assert evaluate.config_from_arguments(_eval_args(), run).max_turns == 5
    given = evaluate.config_from_arguments(_eval_args("--max-turns", "3", "--env-kwargs", "{tools: []}"), run)
    assert given.max_turns == 3 and given.max_tokens == 64
    assert given.env_kwargs == {"prompt_style": "x", "tools": []}  # on top of the run's, not instead
    assert evaluate.config_from_arguments(_eval_args("--synthetic-size", "320", "240"), {}).synthetic_size == (320, 240)


def test_selection_rules_and_measuring_come_from_their_sections():
    args = _selection_args("--no-band", "--plain-max", "0.25", "--tools-help", "--combine", "any", "--k", "2",
                           "--min-image-side", "40")
    assert section_from_arguments(selection.SelectionRules, args) == selection.SelectionRules(
        band=None, plain_max=0.25, tools_help=True, combine="any")
    config = section_from_arguments(selection.SelectionConfig, args)
    assert (config.k, config.min_image_side, config.judge) == (2, 40, "rule")
    assert section_from_arguments(selection.SelectionRules, _selection_args("--no-plain-max")).plain_max is None
    assert section_from_arguments(selection.SelectionRules, _selection_args()) == selection.SelectionRules()
    with pytest.raises(ConfigError, match=r"band: .*low < high, got \(0.5, 0.1\)"):
        section_from_arguments(selection.SelectionRules, _selection_args("--band", "0.5", "0.1"))


@pytest.mark.parametrize("command", [evaluate, selection], ids=["evaluate", "selection"])
def test_help_runs_and_shows_every_sections_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        command.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sections = [evaluate.EvalConfig] if command is evaluate else [selection.SelectionConfig, selection.SelectionRules]
    for section in sections:
        for name, info in section.model_fields.items():
            assert f"--{name.replace('_', '-')}" in text and " ".join(info.description.split()) in text, name
    assert "(default: rule)" in text


def test_reports_write_the_judge_as_the_user_does():
    assert judge_text("rule") == "rule"
    spec = {"type": "llm", "base_url": "http://127.0.0.1:8001/v1", "model": "judge"}
    assert json.loads(judge_text(spec)) == spec  # JSON, not a Python repr with single quotes
