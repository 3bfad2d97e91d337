"""Can a policy's vision tower read the toy zoom task, from the full view and from the zoomed crop?

A diagnostic for the zoom stretch (docs/training.md, "The zoom variant"): it separates seeing from the rest
of the policy. The vision tower plus a linear head is trained, as a plain classifier, to name the plus
sign's colour from (a) the whole image and (b) the crop the scripted agent zooms on, both at the env's pixel
budget. If (b) is read and (a) is not, the task needs the zoom and the tower can use it; a policy that still
answers at chance then fails elsewhere (choosing the box, or carrying the crop's tokens to its answer)::

    python scripts/zoom_probe.py                              # the tiny model, quadrant layout, 56x56 budget
    python scripts/zoom_probe.py --model DIR --layout random --epochs 12
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from deepeyes_agent.models import build_tiny_qwen2_5_vl, load_model, load_processor
from deepeyes_envs.scripted import padded_box
from deepeyes_envs.synthetic import TOY_COLORS, ToyConfig, toy_task


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


def train_reader(model_dir: str, images: list[np.ndarray], labels: torch.Tensor, budget: int, epochs: int,
                 n_test: int, seed: int = 0) -> list[float]:
    """Held-out accuracy after each epoch of training the vision tower + a linear head on ``images``."""
    torch.manual_seed(seed)
    processor = load_processor(model_dir, min_pixels=budget, max_pixels=budget)
    enc = processor.image_processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    pixels, grids = enc["pixel_values"], enc["image_grid_thw"]
    per_image = int(grids[0].prod())
    visual = load_model(model_dir).model.visual.train()
    merge = visual.spatial_merge_size ** 2
    head = torch.nn.Linear(visual.merger.mlp[-1].out_features * per_image // merge, len(TOY_COLORS))
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-3)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        patches = torch.cat([pixels[i * per_image:(i + 1) * per_image] for i in idx.tolist()])
        out = visual(patches, grid_thw=grids[idx])
        out = getattr(out, "pooler_output", out)
        return head(out.reshape(len(idx), -1))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local Qwen-VL dir (default: build the tiny one)")
    parser.add_argument("--layout", default="quadrants", help="toy zoom frame_layout: random, quadrants, center")
    parser.add_argument("--frame-size", type=int, default=44)
    parser.add_argument("--budget", type=int, default=3136, help="pixels per image (56x56 in tiny_zoom_cpu)")
    parser.add_argument("--n", type=int, default=3000, help="training images")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = ToyConfig(kind="zoom", frame_layout=args.layout, frame_size=args.frame_size)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_qwen2_5_vl(tmp))
        rows = []
        for name, zoomed in (("full view", False), ("zoomed crop", True)):
            start = time.perf_counter()
            images, labels = views(config, args.n + args.n_test, zoomed)
            accuracy = train_reader(model_dir, images, labels, args.budget, args.epochs, args.n_test)
            rows.append((name, images[0].shape, accuracy, time.perf_counter() - start))
    print(f"toy zoom, layout {args.layout}, frame {args.frame_size} px, {args.budget} px per image; "
          f"held-out accuracy of vision tower + linear head (chance {1 / len(TOY_COLORS):.2f})")
    print(f"{'view':<13}{'image':>14}  " + "".join(f"{'ep ' + str(e + 1):>7}" for e in range(args.epochs))
          + f"{'s':>6}")
    for name, shape, accuracy, seconds in rows:
        print(f"{name:<13}{'x'.join(map(str, shape[:2])) + ' px':>14}  " + "".join(f"{a:>7.3f}" for a in accuracy)
              + f"{seconds:>6.0f}")
    full, zoom = rows[0][2][-1], rows[1][2][-1]
    print(f"zoomed / full view accuracy after {args.epochs} epochs: {zoom / max(full, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
