"""Asynchronous sampling with bounded staleness (``algorithm.max_staleness: k``).

Synchronous training alternates: every env runner plays its share of the batch, the slowest one sets the pace
(the long tail of multi-turn episodes), then the learners update while the runners wait. Here the runners are
kept busy instead. Work goes out in *chunks* (a runner's share of one batch: whole GRPO groups), one chunk per
idle runner, through RLlib's asynchronous actor calls; a batch is assembled from the first groups to come back,
whichever runner played them, so a runner stuck on long episodes no longer stalls the others; and the next
batch's chunks are handed out before the update starts, so sampling overlaps learning.

Each episode carries the policy version it was sampled with (the learners' update count, stamped by the env
runner from the weight sync). A group sampled ``s`` updates ago has staleness ``s``; groups older than ``k``
when they would be learned from are dropped and counted, the others go to the learner, which corrects the
loss of stale ones with a truncated importance weight (decoupled PPO, ``LLMLearner.decoupled``). Weights go
to a runner only when it is idle and behind, so a weight sync never waits for a rollout.

At ``k = 0`` nothing is handed out during an update and a batch is exactly the synchronous one: the same
tasks, split the same way over the runners, with the same seeds.

Work in flight when a checkpoint is written is not lost: the tasks of chunks not yet learned from are saved
and are the first to be played after a restore.

The sampler sees the algorithm through :class:`SamplerHost` (its env runners, its schedule, the policy version
and three of its steps); the algorithm tells the sampler of restarted runners (:meth:`AsyncSampler.forget_runners`)
and of a checkpoint's pending tasks (:meth:`AsyncSampler.set_pending_tasks`). Neither writes the other's fields.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Protocol

from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.training.batch import PackedEpisode, split_even
from deepeyes_agent.training.config import TrainConfig
from deepeyes_agent.training.health import trainable_episodes
from deepeyes_agent.training.rllib.env_runner import RunnerBatch
from deepeyes_agent.training.tasks import MixedSchedule, TaskSchedule

TAG = "deepeyes_sample"
DEPTH = 2  # asynchronous: a second chunk waits in a runner's queue, so it never idles while the driver learns
POLL_S = 0.02  # how long one look for finished chunks waits


@dataclasses.dataclass
class Chunk:
    """Tasks handed to one env runner: group ``group_base + i`` is task ``tasks[i]``."""

    tasks: list[int]
    group_base: int

    def task_of(self, group_id: int) -> int:
        return self.tasks[group_id - self.group_base]


@dataclasses.dataclass
class Arrived:
    """A chunk's finished episodes, waiting to be learned from."""

    batch: RunnerBatch
    chunk: Chunk
    groups: list[int]  # the group ids still to learn from, in order


class SamplerHost(Protocol):
    """What the sampler uses of the algorithm (``DeepEyesAlgorithm``)."""

    env_runner_group: Any  # RLlib's EnvRunnerGroup: the actors to send chunks and weights to
    schedule: TaskSchedule | MixedSchedule
    policy_version: int  # the learners' update count

    def send_weights(self, runners: Sequence[int] | None = None) -> float: ...

    def trajectories_to_keep(self, iteration: int) -> int: ...

    def record_bad_rows(self, results: Sequence[RunnerBatch], indices: Sequence[int]) -> int: ...


class AsyncSampler:
    """Keeps the env runners of ``host`` busy and assembles batches of ``rollout.prompts_per_iteration`` groups
    (see the module docstring). ``collect`` is called once per training iteration."""

    def __init__(self, host: SamplerHost, run: TrainConfig) -> None:
        self.host, self.run = host, run
        self.max_staleness = run.algorithm.max_staleness
        self.depth = DEPTH if self.max_staleness > 0 else 1  # chunks queued on one runner at most
        self.in_flight: dict[int, list[Chunk]] = {}  # env runner id -> its chunks, the playing one first
        self.arrived: list[Arrived] = []
        self.runner_version: dict[int, int] = {}  # env runner id -> the policy version it holds
        self.requeued: list[int] = []  # tasks handed out but never played (a dead runner, a restore): first again
        self.next_group = 0
        self.target_iteration, self.chunk_index = -1, 0  # the iteration chunks go out for, and how many did
        self.dropped_groups = 0  # over the run: groups too stale to learn from
        self.lost_chunks = 0  # over the run: chunks whose env runner died
        self.stats: dict[str, float] = {}  # health counts of the groups received since the last batch

    # ------------------------------------------------------------------ one batch
    def collect(self, iteration: int) -> tuple[list[PackedEpisode], list[RunnerBatch], dict[str, float]]:
        """The episodes of the next batch, the runner batches they came from, and counts (as ``collect_batch``)."""
        run = self.run
        wanted = run.rollout.prompts_per_iteration
        rounds = run.algorithm.max_sample_rounds if run.algorithm.dynamic_sampling else 1
        ahead = 1 if self.max_staleness > 0 else 0  # batches handed out beyond this one
        horizon = wanted * (1 + ahead)  # groups kept in flight or waiting
        allowance = wanted * (rounds + ahead)  # tasks this call may hand out: a batch short of groups ends
        start = time.perf_counter()
        timeout = run.resources.sample_timeout_s
        while self.drop_stale() < wanted:
            allowance -= self.launch(iteration, horizon, allowance)
            if not self.in_flight or (self.groups_ready() and time.perf_counter() - start > timeout):
                break  # as the synchronous batch does, learn from what came back; late chunks stay queued
            self.receive()
        self.stats["time/wait_s"] = time.perf_counter() - start
        episodes, results, tasks = self.take(wanted)
        stats, self.stats = self.stats, {}
        if isinstance(self.host.schedule, MixedSchedule):
            stats["data/agentic_share"] = self.host.schedule.agentic_share(tasks)
        if ahead:  # the next batch is played while the learners update on this one (no further: it would go stale)
            self.launch(iteration + 1, wanted, wanted)
        stats["async/dropped_groups"] = float(self.dropped_groups)
        stats["async/lost_chunks"] = float(self.lost_chunks)
        stats["async/queued_groups"] = float(self.groups_ready() + self.groups_in_flight())  # for the next batch
        return episodes, results, stats

    def groups_ready(self) -> int:
        return sum(len(a.groups) for a in self.arrived)

    def groups_in_flight(self) -> int:
        return sum(len(c.tasks) for chunks in self.in_flight.values() for c in chunks)

    # ------------------------------------------------------------------ handing out work
    def launch(self, iteration: int, horizon: int, allowance: int) -> int:
        """Hand tasks to the idle runners, one chunk each, a chunk at most a runner's share of a batch, until
        ``horizon`` groups are in flight or waiting (at most ``allowance`` tasks); returns how many went out.
        With every runner idle the chunks are the synchronous batch's shares."""
        healthy = self.host.env_runner_group.healthy_env_runner_ids()
        idle = sorted((i for i in healthy if len(self.in_flight.get(i, ())) < self.depth),
                      key=lambda i: len(self.in_flight.get(i, ())))  # the emptiest queues first
        groups = min(horizon - self.groups_ready() - self.groups_in_flight(), allowance)
        if not idle or groups <= 0:
            return 0
        share = -(-self.run.rollout.prompts_per_iteration // len(healthy))
        tasks = self.take_tasks(min(groups, share * len(idle)))
        chunks = split_even(tasks, min(len(idle), -(-len(tasks) // share)))
        self.sync_weights(idle[: len(chunks)])
        for runner, chunk_tasks in zip(idle, chunks, strict=False):
            self.start(runner, chunk_tasks, iteration)
        return len(tasks)

    def take_tasks(self, n: int) -> list[int]:
        """The next ``n`` tasks: requeued ones first, then the schedule's."""
        tasks, self.requeued = self.requeued[:n], self.requeued[n:]
        return tasks + self.host.schedule.take(n - len(tasks)) if len(tasks) < n else tasks

    def requeue(self, tasks: Sequence[int]) -> None:
        """Tasks handed out but never played: the first to go out again."""
        self.requeued = list(tasks) + self.requeued

    def start(self, runner: int, tasks: list[int], iteration: int) -> None:
        """Send one chunk, seeded as share ``k`` of the iteration's synchronous batch would be."""
        run = self.run
        if iteration != self.target_iteration:
            self.target_iteration, self.chunk_index = iteration, 0
        seed = derive_seed(derive_seed(run.seed, iteration, 0), self.chunk_index)
        keep = self.host.trajectories_to_keep(iteration) if self.chunk_index == 0 else 0
        chunk = Chunk(tasks=tasks, group_base=self.next_group)
        self.chunk_index += 1
        self.next_group += len(tasks)
        kwargs = {"task_indices": tasks, "split": "train", "n_per_task": run.rollout.rollouts_per_prompt,
                  "temperature": None, "seed": seed, "group_offset": chunk.group_base, "keep": keep}
        sent = self.host.env_runner_group.foreach_env_runner_async("sample", tag=TAG, kwargs=kwargs,
                                                                   remote_worker_ids=[runner])
        if sent:
            self.in_flight.setdefault(runner, []).append(chunk)
        else:  # the runner went out of service in between: its tasks wait for the next one
            self.requeue(tasks)

    def sync_weights(self, runners: Sequence[int]) -> None:
        """Give idle runners that are behind the current weights (they wait in the actors' queues before the
        chunk they are about to get)."""
        behind = [r for r in runners if self.runner_version.get(r, -1) != self.host.policy_version]
        if behind:
            self.host.send_weights(behind)
            self.runner_version.update(dict.fromkeys(behind, self.host.policy_version))

    # ------------------------------------------------------------------ results
    def receive(self) -> None:
        """Wait briefly for finished chunks and file their groups; forget the runners that died."""
        algorithm = self.run.algorithm
        for runner, batch in self.host.env_runner_group.fetch_ready_async_reqs(tags=TAG, timeout_seconds=POLL_S):
            chunk = self.in_flight[runner].pop(0)  # a runner plays its chunks in the order they were sent
            if not self.in_flight[runner]:
                del self.in_flight[runner]
            episodes, counts = trainable_episodes(batch.episodes, mask_over_turn=algorithm.mask_over_turn,
                                                  dynamic_sampling=algorithm.dynamic_sampling)
            for key, value in counts.items():
                self.count(key, value)
            self.count("data/skipped_rows", self.host.record_bad_rows([batch], chunk.tasks))
            groups = list(dict.fromkeys(e.group_id for e in episodes))
            self.arrived.append(Arrived(dataclasses.replace(batch, episodes=episodes), chunk, groups))
        healthy = set(self.host.env_runner_group.healthy_env_runner_ids())
        self.forget_runners([r for r in self.in_flight if r not in healthy])

    def forget_runners(self, runners: Sequence[int]) -> None:
        """Runners that died (or were restarted) lost what they were playing and the weights they held: their
        chunks' tasks are requeued and they get weights with their next work."""
        for runner in runners:
            chunks = self.in_flight.pop(runner, [])
            self.requeue([t for c in chunks for t in c.tasks])
            self.runner_version.pop(runner, None)
            self.lost_chunks += len(chunks)

    def count(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value)

    def drop_stale(self) -> int:
        """Drop (and count) the groups sampled more than ``max_staleness`` updates ago; returns the groups left."""
        fresh = [a for a in self.arrived if self.host.policy_version - a.batch.policy_version <= self.max_staleness]
        self.dropped_groups += self.groups_ready() - sum(len(a.groups) for a in fresh)
        self.arrived = fresh
        return self.groups_ready()

    def take(self, wanted: int) -> tuple[list[PackedEpisode], list[RunnerBatch], list[int]]:
        """Up to ``wanted`` of the waiting groups, oldest policy first: their episodes, the runner batches they
        came from, and their tasks."""
        fresh = sorted(self.arrived, key=lambda a: a.batch.policy_version)  # stable: arrival order within a version
        episodes, results, tasks, self.arrived = [], [], [], []
        for item in fresh:
            n = max(0, min(len(item.groups), wanted - len({e.group_id for e in episodes})))
            used, rest = set(item.groups[:n]), item.groups[n:]
            if used:
                part = [e for e in item.batch.episodes if e.group_id in used]
                episodes += part
                tasks += [item.chunk.task_of(g) for g in item.groups[:n]]
                results.append(dataclasses.replace(item.batch, episodes=part))
            if rest:
                rest_batch = dataclasses.replace(item.batch, samples=[], judge_stats={}, bad_rows=[])
                self.arrived.append(Arrived(rest_batch, item.chunk, rest))
        return episodes, results, tasks

    # ------------------------------------------------------------------ checkpoints
    def set_pending_tasks(self, tasks: Sequence[int]) -> None:
        """A checkpoint's :meth:`pending_tasks`, after a restore: the first to be played."""
        self.requeued = list(tasks)

    def pending_tasks(self) -> list[int]:
        """Tasks handed out but not learned from yet (in flight or waiting), to play first after a restore."""
        waiting = [a.chunk.task_of(g) for a in self.arrived for g in a.groups]
        return self.requeued + waiting + [t for chunks in self.in_flight.values() for c in chunks for t in c.tasks]
