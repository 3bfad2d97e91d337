"""Where does the toy zoom stretch fail: in seeing the marks, or in carrying what is seen to the answer?

A diagnostic for the zoom stretch (docs/training.md, "The zoom variant"), in two parts.

Eyes: the policy's vision tower plus a linear head is trained, as a plain classifier, to name the plus sign's
colour from (a) the whole image and (b) the crop the scripted agent zooms on, both at the env's pixel budget.
If (b) is read and (a) is not, the task needs the zoom and the tower can use it.

Policy (``--policy-steps N``): the whole policy is trained on teacher-forced scripted episodes (prompt, zoom
call, crop, answer) with the loss on the answer's colour token only, and its held-out answer accuracy is
printed every 25 steps, once from the random vision tower and once from the tower the eyes part trained on
crops (pretrained, as a real VLM's tower is)::

    python scripts/zoom_probe.py                                # eyes only: tiny model, quadrant layout
    python scripts/zoom_probe.py --layout center --policy-steps 200
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from deepeyes_agent.policy.loading import load_model, load_processor
from deepeyes_agent.policy.logprobs import last_hidden_state
from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl
from deepeyes_agent.training.batch import PackedEpisode, collate_episodes
from deepeyes_agent.training.config import EnvConfig
from deepeyes_agent.training.demonstrations import demonstrations
from deepeyes_agent.training.losses import sft_loss
from deepeyes_envs.scripted import padded_box
from deepeyes_envs.synthetic import TOY_COLORS, SyntheticTaskSource, ToyConfig, toy_task


def views(config: ToyConfig, n: int, zoomed: bool) -> tuple[list[np.ndarray], torch.Tensor]:
    """The first ``n`` tasks' images (whole, or cropped to the scripted zoom box) and answer indices."""
    images, labels = [], []
    for i in range(n):
        task = toy_task(0, i, config)
        image = task.load_images()[0]
        if zoomed:
            x1, y1, x2, y2 = (int(round(v)) for v in padded_box(task.gt_boxes[0], image.shape[1], image.shape[0]))
            image = image[y1:y2, x1:x2]
        images.append(image)
        labels.append(TOY_COLORS.index(task.answer))
    return images, torch.tensor(labels)


def train_reader(visual: torch.nn.Module, processor, images: list[np.ndarray], labels: torch.Tensor,
                 epochs: int, n_test: int) -> list[float]:
    """Train ``visual`` (in place) plus a linear head on ``images``; held-out accuracy after each epoch."""
    enc = processor.image_processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    pixels, grids = enc["pixel_values"], enc["image_grid_thw"]
    per_image = int(grids[0].prod())
    visual.train()
    head = torch.nn.Linear(visual.merger.mlp[-1].out_features * per_image // visual.spatial_merge_size**2,
                           len(TOY_COLORS))
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-3)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        patches = torch.cat([pixels[i * per_image:(i + 1) * per_image] for i in idx.tolist()])
        out = visual(patches, grid_thw=grids[idx])
        return head(getattr(out, "pooler_output", out).reshape(len(idx), -1))

    n_train = len(images) - n_test
    test = torch.arange(n_train, len(images))
    accuracies = []
    for _ in range(epochs):
        for batch in torch.randperm(n_train).split(64):
            loss = torch.nn.functional.cross_entropy(logits(batch), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracies.append(float((logits(test).argmax(-1) == labels[test]).float().mean()))
    return accuracies


def answer_episodes(config: ToyConfig, processor, n: int, budget: int) -> tuple[list[PackedEpisode], list[int],
                                                                               list[int]]:
    """Scripted zoom-then-answer episodes in the env of configs/tiny_zoom_cpu.yaml, with the loss on the
    answer's colour token only; its positions and the answer indices."""
    env = EnvConfig(env_id="visual_toolbox", kwargs={"max_turns": 3, "prompt_style": "plain",
                                                     "min_pixels": budget, "max_pixels": budget})
    tasks = SyntheticTaskSource(n, seed=0, kind="toy_zoom", frame_layout=config.frame_layout,
                                frame_size=config.frame_size)
    colour_ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in TOY_COLORS]
    episodes, positions, labels = [], [], []
    for ctx in demonstrations([tasks[i] for i in range(n)], env, processor, max_total_tokens=1024):
        episode = PackedEpisode.from_context(ctx)
        position = max(i for i, t in enumerate(episode.token_ids) if t in colour_ids)
        episode.loss_mask = [int(i == position) for i in range(len(episode))]
        episodes.append(episode)
        positions.append(position)
        labels.append(colour_ids.index(episode.token_ids[position]))
    return episodes, positions, labels


def train_policy_answers(model: torch.nn.Module, episodes: list[PackedEpisode], positions: list[int],
                         labels: list[int], colour_ids: list[int], steps: int, n_test: int) -> list[float]:
    """Answer-token SFT of the whole policy (batch 16, AdamW 1e-3); held-out answer accuracy every 25 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    n_train = len(episodes) - n_test
    accuracies = []
    for step in range(steps):
        model.train()
        batch = collate_episodes([episodes[i] for i in rng.choice(n_train, 16, replace=False)])
        loss, _ = sft_loss(model, batch, (), normalizer=float(batch["loss_mask"].sum()))  # one answer token each
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 25 == 0:
            accuracies.append(_answer_accuracy(model, episodes, positions, labels, colour_ids,
                                               range(n_train, len(episodes))))
    return accuracies


@torch.no_grad()
def _answer_accuracy(model, episodes, positions, labels, colour_ids, indices) -> float:
    model.eval()
    hits = []
    for chunk in np.array_split(np.asarray(list(indices)), max(1, len(indices) // 50)):
        hidden = last_hidden_state(model, collate_episodes([episodes[i] for i in chunk]))
        hits += [int(model.lm_head(hidden[k, positions[i] - 1])[colour_ids].argmax()) == labels[i]
                 for k, i in enumerate(chunk)]
    return float(np.mean(hits))


def _row(name: str, values: list[float], seconds: float, extra: str = "") -> str:
    return f"{name:<34}{extra:>10}  " + "".join(f"{v:>7.3f}" for v in values) + f"{seconds:>6.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local Qwen-VL dir (default: build the tiny one)")
    parser.add_argument("--layout", default="quadrants", help="toy zoom frame_layout: random, quadrants, center")
    parser.add_argument("--frame-size", type=int, default=44)
    parser.add_argument("--budget", type=int, default=3136, help="pixels per image (56x56 in tiny_zoom_cpu)")
    parser.add_argument("--n", type=int, default=3000, help="training images (and policy episodes)")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--policy-steps", type=int, default=0, help="also probe the policy (0: eyes only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = ToyConfig(kind="zoom", frame_layout=args.layout, frame_size=args.frame_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_qwen2_5_vl(tmp))
        processor = load_processor(model_dir, min_pixels=args.budget, max_pixels=args.budget)
        print(f"toy zoom, layout {args.layout}, frame {args.frame_size} px, {args.budget} px per image "
              f"(chance {1 / len(TOY_COLORS):.2f})")
        print(f"eyes: vision tower + linear head, held-out accuracy per epoch\n{'view':<34}{'image':>10}")
        eyes, final = {}, {}
        for name, zoomed in (("full view", False), ("zoomed crop", True)):
            start = time.perf_counter()
            eyes[name] = load_model(model_dir)
            images, labels = views(config, args.n + args.n_test, zoomed)
            accuracy = train_reader(eyes[name].model.visual, processor, images, labels, args.epochs, args.n_test)
            final[name] = accuracy[-1]
            shape = "x".join(map(str, images[0].shape[:2]))
            print(_row(name, accuracy, time.perf_counter() - start, shape), flush=True)
        print(f"zoomed / full view accuracy after {args.epochs} epochs: "
              f"{final['zoomed crop'] / max(final['full view'], 1e-9):.2f}x")
        if args.policy_steps:
            print("policy: answer-token SFT on scripted zoom episodes, held-out accuracy every 25 steps")
            episodes, positions, labels = answer_episodes(config, processor, args.n + args.n_test, args.budget)
            colour_ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in TOY_COLORS]
            for name, model in (("random tower", load_model(model_dir)),
                                ("tower pretrained on crops", eyes["zoomed crop"])):
                start = time.perf_counter()
                accuracy = train_policy_answers(model, episodes, positions, labels, colour_ids, args.policy_steps,
                                                args.n_test)
                print(_row(name, accuracy, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
