"""Is zooming necessary and sufficient for the zoom run's tasks? The evidence, measured on the pretrained base.

The zoom run (configs/zoom_cpu.yaml) asks for the colour of the plus sign among x marks in a black frame placed
anywhere in a 224 px image, at a pixel budget of 56x56 px per image. This probe shows that the answer cannot be
read from the whole image and can be from the env's zoom on the frame, three ways, each on held-out tasks of the
run's own family:

- **the base's answer**: the pretrained base, asked the question as a plain perception question about one view;
- **frozen eyes + linear head**: a linear classifier on the mean of the view's visual tokens, the tower frozen
  as the run keeps it (the control the first probe of this script lacked: its tower kept training at 1e-3 and
  was wiped within ~50 steps);
- **eyes trained on the view**: the tower itself trained (with the head) on that view, so that "cannot be
  read" does not just mean "was never taught to read": the full view stays near chance even then.

Chance is 1 in 4 colours::

    python scripts/zoom_probe.py                       # the cached pretrained base (built on first use)
    python scripts/zoom_probe.py --model DIR --n 400 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from PIL import Image

from deepeyes_agent.policy.chat import VisionTokenizer
from deepeyes_agent.policy.loading import QwenVLImageProcessor, load_model, load_processor
from deepeyes_agent.policy.pretrain import answer_hits, pretrained_tiny_base
from deepeyes_envs.perception import MARK_SIDE, ZOOM_TASKS, perception_task
from deepeyes_envs.scripted import padded_box
from deepeyes_envs.synthetic import TOY_COLORS, toy_task


def views(n: int, seed: int, zoomed: bool) -> list[tuple[np.ndarray, str]]:
    """The run's tasks (the frame anywhere, 13 px marks) as (image, answer): whole, or cropped where the cold
    start's demonstrations zoom (the frame's own box, ``sft.zoom_margin: 0``)."""
    out = []
    for i in range(n):
        task = toy_task(seed, i, ZOOM_TASKS)
        image = task.load_images()[0]
        if zoomed:
            x1, y1, x2, y2 = (round(v) for v in padded_box(task.gt_boxes[0], image.shape[1], image.shape[0], 0.0))
            image = np.ascontiguousarray(image[y1:y2, x1:x2])
        out.append((image, task.answer))
    return out


def base_accuracy(model: torch.nn.Module, processor: QwenVLImageProcessor, data: list[tuple[np.ndarray, str]]) -> float:
    """The base's exact greedy answers to the marks question about each view alone."""
    template = perception_task(0, 0, "mark", lambda w, h: (w, h))
    tasks = [dataclasses.replace(template, images=(image,), answer=answer, task_id=f"probe-{i}")
             for i, (image, answer) in enumerate(data)]
    return float(np.mean(answer_hits(model, processor, tasks)))


def readout_accuracy(model: torch.nn.Module, processor: QwenVLImageProcessor, train: list, test: list, epochs: int,
                     train_tower: bool) -> float:
    """Held-out accuracy of a linear head on the mean of each view's visual tokens (and, with ``train_tower``,
    of the tower trained with it, AdamW 1e-3, batches of 64)."""
    def encode(data: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = processor.image_processor(images=[Image.fromarray(im) for im, _ in data], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"], torch.tensor([TOY_COLORS.index(a) for _, a in data])

    visual = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(TOY_COLORS))
    visual.requires_grad_(train_tower)
    params = [*head.parameters(), *(visual.parameters() if train_tower else [])]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    (px, grids, labels), (tpx, tgrids, tlabels) = encode(train), encode(test)
    per = int(grids[0].prod())

    def logits(pixels: torch.Tensor, grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        patches = torch.cat([pixels[i * per:(i + 1) * per] for i in idx.tolist()])
        tokens = model.model.get_image_features(patches, grid[idx]).pooler_output
        return head(torch.stack([t.mean(0) for t in tokens]))

    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(64):
            loss = torch.nn.functional.cross_entropy(logits(px, grids, batch), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = logits(tpx, tgrids, torch.arange(len(test))).argmax(-1)
    return float((predicted == tlabels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a local model dir (default: the cached pretrained base)")
    parser.add_argument("--n", type=int, default=2000, help="training views of the two readouts")
    parser.add_argument("--n-test", type=int, default=300, help="held-out views (all three measures)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the two readouts")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model_dir = args.model or str(pretrained_tiny_base())
    processor = load_processor(model_dir)
    vision = VisionTokenizer(processor)
    print(f"zoom run's tasks: the frame anywhere, {MARK_SIDE} px marks, images seen at {vision.min_pixels}.."
          f"{vision.max_pixels} pixels (chance {1 / len(TOY_COLORS):.2f}); base {model_dir}")
    print(f"{'view':<14}{'image':>9}{'base answer':>14}{'frozen eyes':>13}{'eyes trained':>14}{'s':>6}")
    for name, zoomed in (("full view", False), ("zoomed crop", True)):
        start = time.perf_counter()
        train, test = views(args.n, 7, zoomed), views(args.n_test, 1_000_003, zoomed)
        base = base_accuracy(load_model(model_dir), processor, test)
        frozen = readout_accuracy(load_model(model_dir), processor, train, test, args.epochs, train_tower=False)
        trained = readout_accuracy(load_model(model_dir), processor, train, test, args.epochs, train_tower=True)
        shape = "x".join(map(str, test[0][0].shape[:2]))
        print(f"{name:<14}{shape:>9}{base:>14.3f}{frozen:>13.3f}{trained:>14.3f}{time.perf_counter() - start:>6.0f}",
              flush=True)


if __name__ == "__main__":
    main()
