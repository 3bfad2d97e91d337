"""The learner: RLlib's ``TorchLearner`` computing the losses of ``losses.py`` over packed episodes.

One optimizer step, as it runs on every learner at once::

    for each micro-batch of my shard:   loss = rl_loss(...) / global normalizer;  loss.backward()
                                        # (+ vf_coef * value loss with PPO's critic, same forward)
    all-reduce (sum) the gradients over learners         # data parallel, gloo on CPU, nccl on GPU
    clip the global gradient norm;  AdamW step

Data parallelism is an explicit gradient all-reduce after accumulation rather than RLlib's
``TorchDDPRLModule`` wrapper: micro-batches have different lengths and counts, the loss is normalised over
the whole step (all learners), and one all-reduce per optimizer step is all DDP would do under
``no_sync`` anyway. Parameters start identical (rank 0 broadcasts them) and stay identical because every
learner applies the same summed gradient.

With ``resources.learner_sharding: fsdp2`` (and 2+ learners) the model is instead sharded with PyTorch FSDP2
(``fully_shard`` on every decoder layer and vision block, then on the backbone, the LM head and the value
head): FSDP2 reduce-scatters the summed gradients itself, once per optimizer step (gradient sync is off for
all but the last micro-batch), and ``clip_grad_norm_`` works on the sharded (DTensor) gradients. RLlib reads
the module and optimizer state from one learner only, so the algorithm first has every learner gather the
full (unsharded) state (``stage_full_state``, a collective); learner 0 then hands out that full state, so
checkpoints and weight syncs look exactly as without sharding. The learners' micro-batches are padded to run
in lockstep (``lockstep.py``), and the KL reference, if any, is sharded like the policy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from torch.distributed.tensor import DTensor, distribute_tensor

from deepeyes_agent.policy.chat import VisionTokenizer
from deepeyes_agent.policy.loading import load_model, load_processor
from deepeyes_agent.policy.logprobs import shard_aware_scoring
from deepeyes_agent.training.batch import PackedEpisode, collate_episodes, micro_batches
from deepeyes_agent.training.lockstep import is_filler, lockstep_micro_batches, vision_filler
from deepeyes_agent.training.losses import LossSettings, rl_loss, sampled_token_stats, sft_loss


class LLMLearner(TorchLearner):
    """A learner for Qwen-VL policies trained from multi-turn trajectories."""

    # ------------------------------------------------------------------ set-up
    def build(self) -> None:
        run = self.config.deepeyes
        torch.set_num_threads(run.resources.torch_threads)
        super().build()
        # The tokens sampling never draws, from the tokenizer as the rollouts take them: logprobs agree only if
        # both sides leave out the same ones.
        self._processor = load_processor(run.model.path, min_pixels=run.model.min_pixels,
                                         max_pixels=run.model.max_pixels)
        self.suppress_token_ids = VisionTokenizer(self._processor).vision_token_ids
        self.ref_model: torch.nn.Module | None = None
        self._sft_optimizer: torch.optim.Optimizer | None = None
        self._filler: PackedEpisode | None = None
        if self.world_size > 1 and not self.sharded:  # same start everywhere, whatever each process loaded
            for p in self.trainable_parameters:
                dist.broadcast(p.data, src=0)
        if run.algorithm.kl_coef:
            self.snapshot_reference()
        self.stage_full_state(with_optimizer=False)  # FSDP2: RLlib reads learner 0's weights after the build

    def _make_modules_ddp_if_necessary(self) -> None:
        """No DDP wrapper: gradients are all-reduced explicitly after accumulation (see the module doc)."""

    @property
    def sharded(self) -> bool:
        """FSDP2 mode: ``resources.learner_sharding == "fsdp2"`` with 2+ learners."""
        return self.config.deepeyes.resources.learner_sharding == "fsdp2" and self.world_size > 1

    def _shard_module(self) -> None:
        """Same start everywhere (rank 0 broadcasts), then FSDP2 per layer and at the roots (the optimizer
        must be built afterwards: ``fully_shard`` replaces the parameters by DTensors)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        rl_module = self.module[DEFAULT_MODULE_ID]
        for p in rl_module.parameters():
            dist.broadcast(p.data, src=0)
        self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._fsdp_roots = _shard_qwen_vl(self.model, self._mesh)
        if rl_module.value_head is not None:
            self._fsdp_roots.append(fully_shard(rl_module.value_head, mesh=self._mesh, reshard_after_forward=True))
        for sharded in rl_module.modules():  # every FSDP unit (these two settings do not recurse)
            if isinstance(sharded, FSDPModule):
                sharded.set_gradient_divide_factor(1.0)  # sum, as the all-reduce: the loss is globally normalised
                sharded.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)

    def _gradient_sync(self, enabled: bool) -> None:
        if self.sharded:
            for root in self._fsdp_roots:
                root.set_requires_gradient_sync(enabled)

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        optim = self.config.deepeyes.optim
        if optim.vision_lr_scale == 0:  # frozen eyes: no gradients, nothing of the tower in the optimizer
            self.model.model.visual.requires_grad_(False)
        if self.sharded and not getattr(self, "_fsdp_roots", None):
            self._shard_module()
        groups = self.parameter_groups(optim.lr)
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay)
        self.register_optimizer(module_id=module_id, optimizer=optimizer,
                                params=[p for g in groups for p in g["params"]], lr_or_lr_schedule=optim.lr)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups: the vision tower (patch embedding, blocks and merger) at
        ``optim.vision_lr_scale`` times the learning rate, everything else at it. The scale is stored in each
        group (``lr_scale``), so it is saved with the optimizer in checkpoints and ``_step`` keeps applying it.

        Why a scale of its own: Adam turns the tower's small gradients into full-size steps, so at a text
        model's learning rate a pretrained tower is wiped within tens of steps (docs/training.md). At a scale of
        1 there is one group, as before the setting existed, so checkpoints of that time still restore."""
        scale = self.config.deepeyes.optim.vision_lr_scale
        trainable = self.trainable_parameters
        if scale == 1.0:
            return [{"params": trainable, "lr": lr, "lr_scale": 1.0}]
        vision = {id(p) for p in self.model.model.visual.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in vision], "lr": lr, "lr_scale": 1.0},
                  {"params": [p for p in trainable if id(p) in vision], "lr": lr * scale, "lr_scale": scale}]
        return [g for g in groups if g["params"]]

    @property
    def model(self) -> torch.nn.Module:
        return self.module[DEFAULT_MODULE_ID].model

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Everything the RL optimizer trains: the policy and, with PPO, its value head."""
        return [p for p in self.module[DEFAULT_MODULE_ID].parameters() if p.requires_grad]

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.world_size > 1 else 0

    def snapshot_reference(self) -> None:
        """Freeze a copy of the current policy as the KL reference (after any SFT warm start).

        Under FSDP2 (a collective) the reference is rebuilt from the gathered full weights and sharded like the
        policy, so it costs each learner one shard too; its forward runs the same units in the same order. The
        full copy is assembled in CPU memory; ``fully_shard`` moves only this learner's shard to its device.
        """
        if not self.sharded:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            return
        model_cfg = self.config.deepeyes.model
        full = {k: _full(v.detach()).to("cpu") for k, v in self.model.state_dict().items()}
        ref = load_model(model_cfg.path, dtype=model_cfg.dtype, attn_implementation=model_cfg.attn_implementation)
        ref.load_state_dict(full, strict=True)
        del full
        self.ref_model = ref.eval().requires_grad_(False)
        _shard_qwen_vl(self.ref_model, self._mesh)

    def _micro_batches(self, episodes: Sequence[PackedEpisode]) -> list[list[PackedEpisode]]:
        """My micro-batches of a step; under FSDP2 padded to lockstep with the other learners (``lockstep``)."""
        run = self.config.deepeyes
        if not self.sharded:
            return micro_batches(episodes, run.algorithm.micro_batch_size)
        if self._filler is None:
            self._filler = vision_filler(self._processor)
        return lockstep_micro_batches(episodes, run.algorithm.micro_batch_size, self._filler, self.device)

    @property
    def loss_settings(self) -> LossSettings:
        run = self.config.deepeyes
        a = run.algorithm
        return LossSettings(temperature=run.rollout.temperature, clip_ratio_low=a.clip_ratio_low,
                            clip_ratio_high=a.clip_ratio_high, clip_ratio_c=a.clip_ratio_c, loss_agg=a.loss_agg,
                            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
                            vf_coef=a.vf_coef, vf_clip=a.vf_clip)

    def compute_loss_for_module(self, *, module_id: str, config: Any = None, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> torch.Tensor:
        """RLlib's loss hook: the clipped policy loss (+ KL, - entropy, + value loss) of one collated micro-batch.

        ``batch`` is ``collate_episodes`` output plus ``normalizer`` (the step's global token count);
        ``fwd_out`` (``hidden``, with a critic ``values``) comes from the module's ``forward_train``; the LM head
        (of the policy, and of the KL reference) scores the generated tokens only. Metrics go to ``_loss_metrics``.
        """
        settings = self.loss_settings
        ref_logprobs = None
        if settings.kl_coef != 0.0:
            with torch.no_grad():
                ref_logprobs, _ = sampled_token_stats(self.ref_model, batch, settings.temperature,
                                                      self.suppress_token_ids)
        loss, self._loss_metrics = rl_loss(self.model.lm_head, fwd_out["hidden"], batch, settings,
                                           self.suppress_token_ids, float(batch["normalizer"]), ref_logprobs,
                                           fwd_out.get("values"))
        return loss

    # ------------------------------------------------------------------ one optimizer step
    def _all_reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        if self.world_size == 1 or self.sharded:  # FSDP2 has reduce-scattered them in the last backward
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def _step(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], lr: float,
              clip: float) -> float:
        self._all_reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if math.isfinite(float(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def update_from_packed(self, minibatches: Sequence[tuple[Sequence[PackedEpisode], float]], lr: float,
                           epochs: int = 1) -> dict[str, float]:
        """Policy-gradient updates: one optimizer step per (my shard of a minibatch, global normalizer).

        Every learner must receive the same number of minibatches (collective calls pair up).
        Returns metrics summed over my tokens, plus the step's gradient norms. ``logprob_gap_*`` compare the
        engine's recorded logprobs with this forward's in the first step only, before any update: both score
        the same tokens with the same weights, so a gap above ~1e-3 means rollout and training disagree
        (weights not synced, other image preprocessing, low-precision drift).
        """
        run = self.config.deepeyes
        optimizer = self.get_optimizer(DEFAULT_MODULE_ID)
        params = self.trainable_parameters
        self._clear_staged_state()
        totals: dict[str, float] = {}
        if run.algorithm.max_staleness > 0:
            minibatches = [(self.decoupled(episodes, totals), normalizer) for episodes, normalizer in minibatches]
        self.model.train()
        grad_norms = []
        for _ in range(epochs):
            for episodes, normalizer in minibatches:
                optimizer.zero_grad(set_to_none=True)
                chunks = self._micro_batches(episodes)
                for i, chunk in enumerate(chunks):
                    self._gradient_sync(i == len(chunks) - 1)  # FSDP2: one reduce-scatter per step
                    batch = collate_episodes(chunk, device=self.device)
                    batch["normalizer"] = normalizer
                    fwd_out = self.module[DEFAULT_MODULE_ID].forward_train(batch)
                    loss = self.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=self.config,
                                                        batch=batch, fwd_out=fwd_out)
                    loss.backward()
                    metrics = dict(self._loss_metrics)
                    gap_max = metrics.pop("logprob_gap_max")
                    gap_sum = metrics.pop("logprob_gap_sum")
                    if not grad_norms:  # the first step: the weights the engine sampled with
                        totals["logprob_gap_max"] = max(totals.get("logprob_gap_max", 0.0), gap_max)
                        totals["logprob_gap_sum"] = totals.get("logprob_gap_sum", 0.0) + gap_sum
                        totals["logprob_gap_tokens"] = totals.get("logprob_gap_tokens", 0.0) + metrics["tokens"]
                    for k, v in metrics.items():
                        totals[k] = totals.get(k, 0.0) + v
                grad_norms.append(self._step(optimizer, params, lr, run.optim.grad_clip))
        self.model.eval()
        self._weights_seq_no += 1  # RLlib's own update count is the policy version: weight syncs carry it
        totals["grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        totals["optimizer_steps"] = float(len(grad_norms))
        totals["policy_version"] = float(self._weights_seq_no)
        return totals

    def decoupled(self, episodes: Sequence[PackedEpisode], totals: dict[str, float]) -> list[PackedEpisode]:
        """Asynchronous training: my episodes, those sampled with an older policy than mine made decoupled-PPO
        ready. Their ``logprobs`` become the current (proximal) policy's, scored here before any step, and
        their ``is_weights`` the truncated ratio min(pi_proximal / pi_behaviour, ``algorithm.is_truncation``)
        per token; fresh episodes pass unchanged. Every learner scores all of its micro-batches, so sharded
        learners stay in lockstep; counts of stale tokens and truncated weights go to ``totals``."""
        settings, cap = self.loss_settings, self.config.deepeyes.algorithm.is_truncation
        out = []
        self.model.eval()
        with torch.no_grad():
            for chunk in self._micro_batches(episodes):
                batch = collate_episodes(chunk, device=self.device)
                proximal, _ = sampled_token_stats(self.model, batch, settings.temperature, self.suppress_token_ids)
                ratio = torch.exp(proximal - batch["old_logprobs"]).cpu()
                proximal = proximal.cpu()
                for b, ep in enumerate(chunk):
                    if is_filler(ep):
                        continue
                    if ep.policy_version >= self._weights_seq_no:
                        out.append(ep)
                        continue
                    n, mask = len(ep), torch.tensor(ep.loss_mask, dtype=torch.bool)
                    weights = torch.where(mask, ratio[b, :n].clamp(max=cap), torch.ones(n))
                    totals["stale_tokens"] = totals.get("stale_tokens", 0.0) + float(mask.sum())
                    totals["is_weight_sum"] = totals.get("is_weight_sum", 0.0) + float(weights[mask].sum())
                    totals["is_truncated"] = totals.get("is_truncated", 0.0) + float((ratio[b, :n][mask] > cap).sum())
                    out.append(dataclasses.replace(ep, logprobs=proximal[b, :n].tolist(), is_weights=weights.tolist()))
        return out

    def critic_values(self, episodes: Sequence[PackedEpisode]) -> list[list[float]]:
        """PPO: the value head's per-token values of my episodes under the current (pre-update) model.

        A backbone forward without gradients or LM head; the GAE advantages and value targets of the update
        are computed from these on the driver.
        """
        module = self.module[DEFAULT_MODULE_ID]
        out: list[list[float]] = []
        for chunk in self._micro_batches(episodes):
            values = module.compute_values(collate_episodes(chunk, device=self.device)).cpu()
            out.extend(values[b, :len(ep)].tolist() for b, ep in enumerate(chunk) if not is_filler(ep))
        return out

    def sft_update(self, episodes: Sequence[PackedEpisode], normalizer: float, lr: float) -> dict[str, float]:
        """One supervised step on demonstrations (its own AdamW, so RL starts with a fresh optimizer state)."""
        run = self.config.deepeyes
        if self._sft_optimizer is None:  # the same groups as RL: a frozen or slow tower stays so
            self._sft_optimizer = torch.optim.AdamW(self.parameter_groups(lr), lr=lr, weight_decay=0.0)
        params = [p for g in self._sft_optimizer.param_groups for p in g["params"]]
        self.model.train()
        self._clear_staged_state()
        totals: dict[str, float] = {}
        chunks = self._micro_batches(episodes)
        for i, chunk in enumerate(chunks):
            self._gradient_sync(i == len(chunks) - 1)
            batch = collate_episodes(chunk, device=self.device)
            loss, metrics = sft_loss(self.model, batch, self.suppress_token_ids, normalizer)
            loss.backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
        totals["grad_norm"] = self._step(self._sft_optimizer, params, lr, run.optim.grad_clip)
        self.model.eval()
        return totals

    def finish_sft(self) -> None:
        """Drop the SFT optimizer; snapshot the warm-started policy as the KL reference if one is used."""
        self._sft_optimizer = None
        if self.config.deepeyes.algorithm.kl_coef:
            self.snapshot_reference()

    def parameter_checksum(self) -> list[float]:
        """Sum of every parameter tensor, in order: equal lists mean (numerically) identical learners."""
        return [float(_full(p.detach()).double().sum()) for p in self.trainable_parameters]

    # ------------------------------------------------------------------ full state under FSDP2
    def stage_full_state(self, with_optimizer: bool = True) -> None:
        """FSDP2: gather the full module state, and for checkpoints the optimizer's (every learner must call
        this, in step); learner 0 keeps it for RLlib's ``get_state``, which asks learner 0 only. Weight syncs
        skip the optimizer: its moments are twice the model's size. A no-op without sharding."""
        if not self.sharded:
            return
        rl_module = self.module[DEFAULT_MODULE_ID]
        full = {k: _full(v.detach()).to("cpu", copy=True) for k, v in rl_module.full_module_state().items()}
        optim = None
        if with_optimizer:
            optim = {name: _full_optimizer_state(opt.state_dict())
                     for name, opt in self.get_optimizers_for_module(DEFAULT_MODULE_ID)}
        rl_module.staged_state = full if self.rank == 0 else None
        self._staged_optimizer_state = optim if self.rank == 0 else None

    def _clear_staged_state(self) -> None:
        self.module[DEFAULT_MODULE_ID].staged_state = None
        self._staged_optimizer_state = None

    def _get_optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return super()._get_optimizer_state()
        from ray.rllib.utils.numpy import convert_to_numpy

        if getattr(self, "_staged_optimizer_state", None) is None:
            raise RuntimeError("FSDP2: call stage_full_state(with_optimizer=True) on every learner before reading "
                               "the optimizer state")
        return {name: {"module_id": DEFAULT_MODULE_ID, "state": convert_to_numpy(state)}
                for name, state in self._staged_optimizer_state.items()}

    def _set_optimizer_state(self, state: dict[str, Any]) -> None:
        super()._set_optimizer_state(state)
        if not self.sharded:
            return
        self._staged_optimizer_state = None
        for _, optimizer in self.get_optimizers_for_module(DEFAULT_MODULE_ID):  # full tensors -> my shards
            for p, p_state in optimizer.state.items():
                for k, v in list(p_state.items()):
                    if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim():
                        p_state[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)

    def node_and_rank(self) -> tuple[str, int, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), self.rank, self.world_size


def _shard_qwen_vl(model: torch.nn.Module, mesh: Any) -> list[torch.nn.Module]:
    """FSDP2 on every vision block and decoder layer, then on the backbone and the LM head, which the forward
    calls separately (``losses.forward_with_values``, then ``policy.logprobs.token_stats``) and so are roots
    each; returns the roots. The LM head is used through its ``score_tokens`` method, not its forward, so that
    method is registered with FSDP2 (``shard_aware_scoring``).

    Roots reshard after their forward too (FSDP2 keeps a root gathered by default): a root left gathered by a
    forward without gradients (PPO's critic pass before the update) made the next backward lose most of its
    gradients (the embeddings' and the value head's): the step's gradient norm was 3.40 instead of 4.34.
    """
    from torch.distributed.fsdp import fully_shard

    backbone = model.model
    for block in list(backbone.visual.blocks) + list(backbone.language_model.layers):
        fully_shard(block, mesh=mesh)
    roots = [fully_shard(root, mesh=mesh, reshard_after_forward=True) for root in (backbone, model.lm_head)]
    shard_aware_scoring(model.lm_head)
    return roots


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full (all-gathered: a collective) tensor; other tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {**state_dict, "state": {i: {k: _full(v).detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                                        for k, v in s.items()}
                                    for i, s in state_dict["state"].items()}}
