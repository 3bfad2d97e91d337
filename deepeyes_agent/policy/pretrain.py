"""A pretrained tiny base: the tiny Qwen2.5-VL taught to see and to name what it sees, never to call a tool.

A real VLM starts RL with eyes that read what is large enough and words for it; a random tiny model does not,
and RL cannot teach both at once in minutes (docs/training.md, "Thinking with images on a CPU"). So the tiny
model is pretrained, offline and reproducibly, on synthetic perception questions (``deepeyes_envs.perception``:
colours, shapes, marks big enough to read, where a frame is, as a box in the frame the model sees), in two
stages:

1. **eyes**: the vision tower and its merger, with a linear head on the mean of each image's visual tokens, learn
   to classify the answer word (a plain supervised image classifier, as vision towers are pretrained) and, with
   a small head on all of an image's visual tokens, to regress where the frame of a locate image is (a position
   objective: without it the tokens carry too little of where things are for the language model to ground);
2. **words**: with the eyes frozen, the language model learns to answer each question in the answer format
   (``<answer>...</answer>``), the next-token loss on the answer turn only.

The result is a standard Hugging Face directory with a model card (``README.md``) and ``pretraining.json``
(settings, held-out accuracy per family, and locate accuracy per placement of the frame).
:func:`pretrained_tiny_base` caches it by a hash of its settings, so a second build is a cache hit::

    python -m deepeyes_agent.policy pretrain-tiny OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer, collate
from deepeyes_agent.policy.loading import QwenVLImageProcessor, load_model, load_processor
from deepeyes_agent.policy.logprobs import model_inputs, sampling_logits, token_logprobs
from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl
from deepeyes_agent.settings import Section, setting
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.images import seen_size
from deepeyes_envs.messages import image_part, message
from deepeyes_envs.perception import locate_task, perception_tasks
from deepeyes_envs.prompts import PLAIN_SYSTEM_PROMPT, PLAIN_USER_PROMPT
from deepeyes_envs.rewards import box_centre_inside, box_iou

# Bump when the pretraining code changes what it produces: the cache key includes it.
RECIPE_VERSION = 7
DEFAULT_CACHE = Path("~/.cache/deepeyes/tiny-bases")
Progress = Callable[[str], None]


class PretrainSettings(Section):
    """Everything the pretrained base depends on (its cache key)."""

    seed: int = setting(0, "Seed of the random model, its tokenizer, the data order and the perception tasks.")
    min_pixels: int = setting(3136, "Pixel budget the base is pretrained and saved with (56x56 px: 4 visual tokens).")
    max_pixels: int = setting(3136, "Upper pixel budget (equal to min_pixels: every image seen at one size).")
    families: tuple[str, ...] = setting(("color", "shape", "mark", "locate", "locate", "locate"),
                                        "Perception families of the words stage (deepeyes_envs.perception), "
                                        "cycled: writing a box takes more steps than a word.")
    eyes_families: tuple[str, ...] = setting(("mark", "locate", "mark", "shape", "mark", "color", "mark", "mark"),
                                             "The eyes stage's mix, cycled: marks read off centre take the tiny "
                                             "tower the most examples, then frames to locate and shapes.")
    eyes_locate_weight: float = setting(50.0, "Weight of the eyes' position objective (the frame's centre, smooth L1 "
                                              "in fractions of the image) beside the classification loss.")
    data_seed: int = setting(20_260_401, "Seed of the perception tasks, apart from every RL task seed.")
    n_eyes: int = setting(16000, "Training images of the eyes stage.")
    n_train: int = setting(19200, "Training questions of the words stage.")
    n_test: int = setting(400, "Held-out questions (each stage) for the model card.")
    eyes_epochs: int = setting(24, "Passes of the eyes stage's classification over its images without a frame "
                                   "to locate.")
    eyes_locate_epochs: int = setting(4, "Passes over all its images after that, the position objective added.")
    eyes_lr: float = setting(1e-3, "AdamW learning rate of the eyes stage.")
    words_steps: int = setting(1800, "Optimizer steps of the words stage (eyes frozen).")
    words_lr: float = setting(2e-3, "AdamW learning rate of the words stage.")
    batch_size: int = setting(32, "Questions per step of the words stage.")
    eyes_batch_size: int = setting(64, "Images per step of the eyes stage.")

    def key(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_tiny_base(settings: PretrainSettings | None = None, cache_dir: str | os.PathLike | None = None,
                         progress: Progress = print) -> Path:
    """The pretrained tiny base for ``settings``, built once per settings hash under ``cache_dir`` (default
    ``$DEEPEYES_CACHE/tiny-bases`` or ``~/.cache/deepeyes/tiny-bases``); later calls return the cached one."""
    settings = settings or PretrainSettings()
    root = Path(cache_dir or (Path(os.environ["DEEPEYES_CACHE"]) / "tiny-bases" if "DEEPEYES_CACHE" in os.environ
                              else DEFAULT_CACHE)).expanduser()
    final = root / f"tiny-qwen2_5_vl-base-{settings.key()}"
    if (final / "pretraining.json").is_file():
        progress(f"pretrained tiny base: cache hit {final}")
        return final
    tmp = root / f"tmp-{settings.key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_pretrained_tiny(tmp, settings, progress)
    if (final / "pretraining.json").is_file():  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def build_pretrained_tiny(out: str | os.PathLike, settings: PretrainSettings, progress: Progress = print) -> Path:
    """Build the random tiny model into ``out`` and pretrain it there (see the module docstring)."""
    start = time.perf_counter()
    out = build_tiny_qwen2_5_vl(out, seed=settings.seed, min_pixels=settings.min_pixels,
                                max_pixels=settings.max_pixels)
    processor = load_processor(out)
    model = load_model(out)
    vision = VisionTokenizer(processor)

    def tasks(seed_offset: int, n: int, families: Sequence[str]) -> tuple[list[Task], list[Task]]:
        made = perception_tasks(settings.data_seed + seed_offset, n + settings.n_test,
                                lambda w, h: seen_size(w, h, vision.min_pixels, vision.max_pixels,
                                                       vision.patch_size * vision.merge_size), tuple(families))
        return made[:n], made[n:]

    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        eyes = train_eyes(model, processor, *tasks(0, settings.n_eyes, settings.eyes_families), settings,
                          generator, progress)
        words = train_words(model, processor, *tasks(1, settings.n_train, settings.families), settings, generator,
                            progress)
        located = locate_by_placement(model, processor, settings)
    model.save_pretrained(out)
    report = {"settings": settings.model_dump(mode="json"), "recipe_version": RECIPE_VERSION,
              "eyes_accuracy": eyes, "answer_accuracy": words, "locate": located,
              "seconds": time.perf_counter() - start}
    (Path(out) / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(out) / "README.md").write_text(model_card(report))
    progress(f"pretrained tiny base in {report['seconds']:.0f} s: held-out answer accuracy "
             + ", ".join(f"{k} {v:.2f}" for k, v in words.items()))
    return Path(out)


# ------------------------------------------------------------------------------------------ stage 1: eyes
def train_eyes(model: torch.nn.Module, processor: QwenVLImageProcessor, train: Sequence[Task], test: Sequence[Task],
               settings: PretrainSettings, generator: torch.Generator, progress: Progress) -> dict[str, float]:
    """The vision tower + merger as a classifier of the answer word (a linear head on the mean of each image's
    visual tokens) and, for ``locate`` images, a regressor of the frame's centre (a linear head on all of the
    image's visual tokens, so that where the frame is stays in them for the language model to read out).
    Held-out per family: classification accuracy, and for ``locate`` the share of predicted centres inside the
    frame."""
    words = sorted({w for t in train if "answer_space" in t.extra for w in t.extra["answer_space"]})
    encode = _image_encoder(processor, [*train, *test])
    hidden = model.config.text_config.hidden_size
    located = [t for t in train if "frame_center" in t.extra]  # all of one size: one token count
    n_tokens = int(encode(located[:1])[1].prod()) // processor.image_processor.merge_size ** 2 if located else 1
    # Linear heads: what they read must be plain in the visual tokens for the language model to read it too.
    heads = torch.nn.ModuleDict({"classify": torch.nn.Linear(hidden, len(words)),
                                 "locate": torch.nn.Linear(n_tokens * hidden, 2)})

    def outputs(batch: Sequence[Task]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pixels, grids = encode(batch)
        tokens = model.model.get_image_features(pixels, grids).pooler_output
        cls = [t.mean(0) for t, task in zip(tokens, batch, strict=True) if "answer_space" in task.extra]
        pos = [t.flatten() for t, task in zip(tokens, batch, strict=True) if "frame_center" in task.extra]
        return (heads["classify"](torch.stack(cls)) if cls else None,
                heads["locate"](torch.stack(pos)) if pos else None)

    def loss_of(batch: Sequence[Task]) -> torch.Tensor:
        cls, pos = outputs(batch)
        loss = torch.zeros(())
        if cls is not None:
            labels = torch.tensor([words.index(t.answer) for t in batch if "answer_space" in t.extra])
            loss = loss + torch.nn.functional.cross_entropy(cls, labels)
        if pos is not None:  # centres as fractions of the image; smooth L1 with a knee at 1 px of 56
            centres = torch.tensor([t.extra["frame_center"] for t in batch if "frame_center" in t.extra])
            loss = loss + settings.eyes_locate_weight * torch.nn.functional.smooth_l1_loss(pos, centres, beta=0.02)
        return loss

    optimizer = torch.optim.AdamW([*model.model.visual.parameters(), *heads.parameters()], lr=settings.eyes_lr,
                                  weight_decay=0.0)
    # Classification first, the position objective after: trained together from the start, the regression's
    # gradients took the tiny tower's capacity and it never learnt to read a mark off centre (docs/training.md).
    classified = [t for t in train if "answer_space" in t.extra]
    phases = [classified] * settings.eyes_epochs + [list(train)] * settings.eyes_locate_epochs
    model.train()
    for epoch, images in enumerate(phases):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(settings.eyes_batch_size):
            loss = loss_of([images[i] for i in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        progress(f"eyes epoch {epoch + 1}/{len(phases)}: loss {float(loss.detach()):.3f}")
    model.eval()
    hits = []
    with torch.no_grad():
        for b in range(0, len(test), 64):
            chunk = test[b:b + 64]
            cls, pos = outputs(chunk)
            cls_hits = iter([] if cls is None else cls.argmax(-1).tolist())
            pos_hits = iter([] if pos is None else pos.tolist())
            for task in chunk:
                if "answer_space" in task.extra:
                    hits.append(words[next(cls_hits)] == task.answer)
                else:
                    hits.append(_centre_inside(next(pos_hits), task))
    return _per_family(test, hits)


def _centre_inside(centre: Sequence[float], task: Task) -> bool:
    """Whether a centre given as fractions of the image lies inside the task's frame."""
    x, y = (v * task.images[0].size[0] for v in centre)  # square toy images
    return box_centre_inside((x, y, x, y), task.gt_boxes)


def _image_encoder(processor: QwenVLImageProcessor, tasks: Sequence[Task]) -> Callable:
    """Tasks -> (pixel_values, image_grid_thw) of their first images, each processed once and kept."""
    processed = {}
    for task in tasks:
        out = processor.image_processor(images=[Image.fromarray(task.load_images()[0])], return_tensors="pt")
        processed[task.task_id] = (out["pixel_values"], out["image_grid_thw"])

    def encode(batch: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [processed[t.task_id] for t in batch]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])

    return encode


# ------------------------------------------------------------------------------------------ stage 2: words
def short_answer(answer: str) -> str:
    """The answer turn of a perception question: the answer format alone, no thought. Thinking before acting is
    what the cold start and RL teach; a base whose every answer began with the same thought would enter RL with
    that thought's first token fixed, and the decision to zoom would start there at probability zero."""
    return f"<answer>{answer}</answer>"


def question_context(processor: QwenVLImageProcessor, task: Task, vision: VisionTokenizer) -> EpisodeContext:
    """A perception question as the plain (tool-free) prompt of the envs renders it."""
    image = task.load_images()[0]
    messages = (message("system", PLAIN_SYSTEM_PROMPT),
                message("user", image_part(image), f"\n{task.question}" + PLAIN_USER_PROMPT))
    return EpisodeContext(processor, messages, max_prompt_tokens=None, vision=vision)


def train_words(model: torch.nn.Module, processor: QwenVLImageProcessor, train: Sequence[Task], test: Sequence[Task],
                settings: PretrainSettings, generator: torch.Generator, progress: Progress) -> dict[str, float]:
    """Next-token loss on the answer turn of each question, the eyes frozen; held-out exact greedy answers per
    family."""
    vision = VisionTokenizer(processor)
    episodes = []
    for task in train:
        ctx = question_context(processor, task, vision)
        ctx.append_written(short_answer(task.answer), ends_turn=True)
        episodes.append(ctx)
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.words_lr, weight_decay=0.0)
    model.train()
    for step in range(settings.words_steps):
        picks = torch.randint(len(episodes), (settings.batch_size,), generator=generator).tolist()
        batch = collate([episodes[i] for i in picks])
        mask = batch["loss_mask"].bool()
        loss = -token_logprobs(model, batch, 1.0, vision.vision_token_ids)[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == settings.words_steps:
            progress(f"words step {step + 1}/{settings.words_steps}: loss {float(loss.detach()):.3f}")
    model.model.visual.requires_grad_(True)
    model.eval()
    return _per_family(test, answer_hits(model, processor, test))


@torch.no_grad()
def answer_hits(model: torch.nn.Module, processor: QwenVLImageProcessor, tasks: Sequence[Task]) -> list[bool]:
    """Whether greedy decoding would write each question's whole answer turn (``<answer>``, the right answer, the
    end of turn): under teacher forcing, the most likely token is the answer turn's at every step."""
    vision = VisionTokenizer(processor)
    hits = []
    for start in range(0, len(tasks), 64):
        contexts = []
        for task in tasks[start:start + 64]:
            ctx = question_context(processor, task, vision)
            ctx.append_written(short_answer(task.answer), ends_turn=True)
            contexts.append(ctx)
        batch = collate(contexts)
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
        best = sampling_logits(logits, 1.0, vision.vision_token_ids).argmax(-1)
        right = (best == batch["input_ids"][:, 1:]) | (batch["loss_mask"][:, 1:] == 0)
        hits += right.all(dim=1).tolist()
    return hits


LOCATE_PLACEMENTS = (("centre", "center"), ("quadrants", "quadrants"), ("anywhere", "random"))


@torch.no_grad()
def locate_by_placement(model: torch.nn.Module, processor: QwenVLImageProcessor, settings: PretrainSettings
                        ) -> dict[str, dict[str, float]]:
    """Greedy locate answers on held-out frames of each placement: the exact box, its IoU with the frame, and
    whether its centre lies inside the frame (what a zoom needs), all in the frame the model sees."""
    vision = VisionTokenizer(processor)

    def seen(w: int, h: int) -> tuple[int, int]:
        return seen_size(w, h, vision.min_pixels, vision.max_pixels, vision.patch_size * vision.merge_size)

    out = {}
    for name, layout in LOCATE_PLACEMENTS:
        exact, ious, inside = [], [], []
        for i in range(settings.n_test // 4):
            task = locate_task(settings.data_seed + 3, i, seen, layout)
            written = parse_box(greedy_answer(model, question_context(processor, task, vision)))
            truth = task.extra["seen_box"]
            exact.append(written == truth)
            ious.append(box_iou(written, truth) if written else 0.0)
            inside.append(bool(written) and box_centre_inside(written, [truth]))
        out[name] = {"exact": float(np.mean(exact)), "iou": float(np.mean(ious)),
                     "centre_inside": float(np.mean(inside))}
    return out


def greedy_answer(model: torch.nn.Module, ctx: EpisodeContext, max_new_tokens: int = 24) -> str:
    batch = collate([ctx])
    out = model.generate(**model_inputs(batch), max_new_tokens=max_new_tokens, do_sample=False)
    return ctx.decode(out[0, batch["input_ids"].shape[1]:].tolist())


def parse_box(text: str) -> list[int] | None:
    """The first four whole numbers inside the answer's first brackets, as a box; None if it has fewer or they are
    not a box."""
    listed = re.search(r"\[([^\[\]]*)\]", text)
    numbers = [int(v) for v in re.findall(r"\d+", listed.group(1))[:4]] if listed else []
    return numbers if len(numbers) == 4 and numbers[0] < numbers[2] and numbers[1] < numbers[3] else None


def _per_family(tasks: Sequence[Task], hits: Sequence[bool]) -> dict[str, float]:
    families: dict[str, list[bool]] = {}
    for task, hit in zip(tasks, hits, strict=True):
        families.setdefault(task.extra["kind"].removeprefix("perception_"), []).append(bool(hit))
    return {family: float(np.mean(values)) for family, values in sorted(families.items())}


def model_card(report: dict) -> str:
    """The README.md of a pretrained base: what it was trained on, how, and how well."""
    s = report["settings"]
    located = "\n".join(f"| {name} | {v['exact']:.2f} | {v['iou']:.2f} | {v['centre_inside']:.2f} |"
                        for name, v in report.get("locate", {}).items())
    rows = "\n".join(f"| {family} | {report['eyes_accuracy'].get(family, float('nan')):.2f} | {acc:.2f} |"
                     for family, acc in report["answer_accuracy"].items())
    return f"""# Tiny Qwen2.5-VL, pretrained on synthetic perception

A 2-layer, 128-wide Qwen2.5-VL with a 2-block vision tower (built by `deepeyes_agent.policy.tiny`), pretrained
offline by `deepeyes_agent.policy.pretrain` (recipe version {report['recipe_version']}, {report['seconds']:.0f} s).

- **Data**: synthetic perception questions (`deepeyes_envs.perception`, seeds from {s['data_seed']}): one image
  and one short answer each, no tool call anywhere, and no family whose answer can only be read through a zoom.
- **Images**: seen at {s['min_pixels']}..{s['max_pixels']} pixels (the saved processor budget).
- **Stage 1, eyes**: the vision tower and merger with a linear head on the mean of each image's visual tokens,
  classifying the answer word, on {s['n_eyes']} images ({", ".join(s['eyes_families'])}, cycled), {s['eyes_epochs']}
  epochs at lr {s['eyes_lr']}; then {s['eyes_locate_epochs']} epochs with a linear head on all the visual tokens of
  locate images added, regressing the frame's centre (weight {s['eyes_locate_weight']}).
- **Stage 2, words**: eyes frozen, the language model trained on the answer turn (`<answer>...</answer>`) of
  {s['n_train']} questions
  ({", ".join(s['families'])}), {s['words_steps']} steps of {s['batch_size']} at lr {s['words_lr']}.

Held-out accuracy ({s['n_test']} questions; answers greedy and exact; for locate, the eyes column is the share of
the eyes' predicted centres inside the frame):

| family | eyes (stage 1) | answer (stage 2) |
|---|---|---|
{rows}

Locating the frame by placement ({s['n_test'] // 4} held-out images each; greedy boxes in the seen frame):

| placement | exact box | IoU | box centre inside the frame |
|---|---|---|---|
{located}
"""
