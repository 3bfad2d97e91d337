"""Micro-batches that keep FSDP2 learners in lockstep.

Under FSDP2 every sharded unit all-gathers its parameters when its forward starts and reduce-scatters its
gradients after its backward, and these collectives pair up across learners in the order they are issued.
Two things in a learner's share of a batch can break that order, and either one makes training hang:

- learners with different numbers of micro-batches (a minibatch of 5 episodes on 2 learners is 3 + 2);
- a micro-batch without images on one learner while another's has images: the vision tower's blocks run
  only for micro-batches with pixels (text-only samples of mixed data, or a learner whose share is empty).

:func:`lockstep_micro_batches` pads both away. Every learner runs the largest micro-batch count of the step
(one all-reduce), and a micro-batch with no image gets the *vision filler*: a prompt-only episode holding
one smallest image, all loss mask 0. It changes no loss, gradient or metric (they are taken over loss-mask-1
tokens, and the normalizer comes from the driver); it only makes the vision tower run where it must.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from deepeyes_agent.policy.chat import EpisodeContext
from deepeyes_agent.policy.loading import QwenVLImageProcessor
from deepeyes_agent.training.batch import PackedEpisode, micro_batches
from deepeyes_envs.messages import image_part, message

FILLER_TASK_ID = "<vision filler>"


def vision_filler(processor: QwenVLImageProcessor) -> PackedEpisode:
    """A prompt-only episode with one small grey image: no token of it is trained on."""
    image = np.full((28, 28, 3), 128, dtype=np.uint8)
    ctx = EpisodeContext(processor, [message("user", image_part(image), "")], max_prompt_tokens=None)
    n = len(ctx)
    return dataclasses.replace(PackedEpisode.from_context(ctx, task_id=FILLER_TASK_ID),
                               advantages=[0.0] * n, values=[0.0] * n, returns=[0.0] * n)


def is_filler(episode: PackedEpisode) -> bool:
    return episode.task_id == FILLER_TASK_ID


def lockstep_micro_batches(episodes: Sequence[PackedEpisode], size: int, filler: PackedEpisode,
                           device: torch.device | str = "cpu") -> list[list[PackedEpisode]]:
    """``micro_batches(episodes, size)``, padded to the step's largest count across learners, with the
    filler in every micro-batch that has no image (fillers go last; see the module docstring).

    A collective: every learner must call it at the same point of the step (``device``: the process group's,
    cuda for nccl).
    """
    chunks = micro_batches(episodes, size)
    count = torch.tensor([len(chunks)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    chunks += [[] for _ in range(int(count) - len(chunks))]
    return [chunk if any(ep.image_grid_thw for ep in chunk) else [*chunk, filler] for chunk in chunks]
