"""Stage 2 of TAG: GRPO with format, answer and AU-grounding rewards.

Each training step takes a batch of prompts (face + question, with the detector's references from
the datamodule's ``rl`` stage), samples G completions per prompt with the shared `VLMWrapper`,
scores them (`rewards.py`), turns the rewards into group-relative advantages and takes
`num_iterations` optimizer steps of the clipped policy loss on those rollouts.

Options, names and semantics follow TRL 1.16's ``GRPOTrainer`` so settings carry over:
``num_generations``, ``max_completion_length``, ``temperature``, ``top_p``, ``scale_rewards``
(group | batch | none; Bessel-corrected std, + 1e-4), ``loss_type`` (grpo | bnpo | dr_grpo | dapo),
``epsilon`` / ``epsilon_high``, ``beta`` (k3 KL to the reference; 0 skips the reference pass),
``num_iterations`` (μ, with the old log-probs kept from the first pass),
``mask_truncated_completions``, ``max_grad_norm``, ``log_completions``, ``num_completions_to_print``.
The two pure functions, `group_advantages` and `policy_loss`, are the maths.

Where this differs from TRL, and why:

- a group never spans ranks: each rank samples all G completions of its own prompts, so group
  statistics need no communication; batch-wide figures (``scale_rewards="batch"``, the ``dapo``
  token count, the logged statistics) are gathered over ranks, so 2 ranks compute what 1 does;
- a batch's rollouts are one `generate` call (`rollout.RolloutEngine`), and a function of (``rollout_seed``,
  step, image): each prompt's group draws from its own seed, so a resumed run, or the same batch split over
  ranks, samples the same completions (up to floating-point differences between batch shapes, which move a
  draw only when it falls within rounding of a token boundary);
- one Lightning step is one batch of rollouts and its μ optimizer steps, so a checkpoint never
  falls between a rollout and its updates; there is one step axis, optimizer steps: `max_steps`
  and checkpoint intervals count them (and must be multiples of μ), and every log (CSV,
  TensorBoard, ``completions.csv``) is at the optimizer step the batch's rollouts were sampled at;
- the reference model is the policy GRPO started from (TAG's stage 2 regularises towards the SFT
  model): with LoRA, the trained weights (adapters, projector) as they were at the start, put back for
  the reference pass; without LoRA, a frozen copy of the starting policy. TRL switches a PEFT model's
  adapters off instead, which after `init_from` an SFT checkpoint anchors the KL term to the model
  before SFT.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from tag_lightning.answers.grammar import PER_STEP
from tag_lightning.errors import BadValue, UserError, describe
from tag_lightning.grounding.rewards import DEFAULT_WEIGHTS, check_weights, score
from tag_lightning.models.checkpoints import check_fits, network_weights, read_checkpoint
from tag_lightning.models.module import VLMModule
from tag_lightning.models.rollout import RolloutConfig
from tag_lightning.models.sampling import seed_of
from tag_lightning.models.vlm import VLMWrapper

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's: added to the std the advantages are divided by


# ---------------------------------------------------------------------------------------------
# The maths


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """Group-relative advantages: each reward minus its group's mean, divided by a std (+1e-4).

    `rewards` (N,) hold N = prompts x `group_size` rewards, each prompt's group contiguous.
    ``group``: divide by the group's std; ``batch``: by the std of all N; ``none``: do not divide.
    Standard deviations are Bessel-corrected, as in TRL.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise BadValue(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    if group_size < 2:
        raise BadValue(f"a group of {group_size} has no advantage to compute (its std is undefined): "
                         "groups compare at least 2 completions")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = rewards - grouped.mean(dim=1).repeat_interleave(group_size)
    if scale_rewards == "none":
        return advantages
    std = rewards.std().expand_as(rewards) if scale_rewards == "batch" else grouped.std(dim=1).repeat_interleave(
        group_size)
    return advantages / (std + STD_EPS)


def shuffled_within_groups(values: Tensor, group_size: int, keys: Sequence[str]) -> Tensor:
    """`values` (N,) with each group's entries put in a random order, group g's drawn from `keys[g]` alone.

    A reward shuffled so is paid to a random completion of its group instead of the one it scored: each
    group holds the same rewards (the same mean and std, so advantages of the same sizes), but what a
    completion is paid no longer depends on what it says; its expected pay is its group's mean. The order
    is uniform, the identity included: were a completion never paid its own reward (a derangement), a good
    one would expect less than its group's mean, a signal against it.
    """
    grouped = values.view(-1, group_size)
    if len(keys) != len(grouped):
        raise ValueError(f"{len(keys)} keys for {len(grouped)} groups")
    orders = [torch.randperm(group_size, generator=torch.Generator().manual_seed(seed_of(key))) for key in keys]
    return torch.stack([group[order] for group, order in zip(grouped, orders)]).reshape(-1) if keys else values


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    batch_size: int | None = None,
    batch_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate loss (+ β k3 KL) of completions' tokens, aggregated as `loss_type` says.

    Tensors are (N, T) over completion tokens, `mask` 1 where a token counts; `advantages` are (N,).
    Per token: ``-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) + β·KL``, ρ = exp(logp - old_logp) and
    KL = exp(ref - logp) - (ref - logp) - 1. Aggregation: ``grpo`` averages each sequence's
    tokens, then the sequences; ``bnpo`` averages all tokens of the batch; ``dr_grpo`` sums and
    divides by N x `max_completion_length`; ``dapo`` sums and divides by `num_items_in_batch`
    (the tokens of the whole generation batch over all ranks, divided by the number of ranks;
    default: this batch's tokens). Stats: ``kl`` (masked mean; 0 when β = 0) and ``clip_ratio``
    (share of tokens whose ratio was clipped in the direction of their advantage).

    When the rows are a micro-batch of a step, `batch_size` and `batch_tokens` give the step's
    completions and counted tokens (default: these rows'): every aggregation then divides by the
    step's figures, so the micro-batches' losses add up to the step's loss, and the gradient does
    not depend on how the step is split.
    """
    if loss_type not in LOSS_TYPES:
        raise BadValue(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1.0)
    rows = per_token.size(0) if batch_size is None else batch_size
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / rows
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / (tokens if batch_tokens is None else max(batch_tokens, 1.0))
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise BadValue("loss_type dr_grpo divides by max_completion_length: give it")
        loss = (per_token * mask).sum() / (rows * max_completion_length)
    else:
        loss = (per_token * mask).sum() / (tokens if num_items_in_batch is None else max(num_items_in_batch, 1.0))
    was_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    stats = {
        "kl": 0.0 if kl is None else float((kl.detach() * mask).sum() / tokens),
        "clip_ratio": float((was_clipped.to(mask.dtype) * mask).sum() / tokens),
    }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# The module


@dataclass
class Rollouts:
    """One batch's sampled completions, N = prompts x G rows, each prompt's group contiguous."""

    step: int  # the optimizer step they were sampled at
    images: list  # (H, W, 3) uint8 arrays, one per row
    prompts: list[str]
    token_ids: list[Tensor]
    texts: list[str]
    truncated: Tensor  # (N,) bool: no end token within max_completion_length
    rewards: Tensor  # (N,) weighted totals paid (`shuffled_rewards` in their group's drawn order)
    reward_parts: dict[str, Tensor]  # "<name>" -> (N,) values, "<name>/<part>" -> (N,) parts
    image_names: list[str]
    labels: list[str]
    seconds: float  # generating them


class GRPOModule(VLMModule):
    """GRPO on the TAG rewards, with TRL 1.16's option names (see the module doc).

    Args:
        network: the VLM wrapper to train, the same class SFT trains.
        optimizer: optimizer factory, called with the trainable parameters.
        scheduler: learning-rate scheduler factory (stepped every optimizer step), or None.
        init_from: an SFT (or GRPO) training checkpoint whose trained weights the policy starts
            from; None starts from the model folder as it is. Refused if it was trained with
            another model set-up.
        rewards: weight of each reward by name (`tag_lightning.grounding.rewards.REWARDS`); only these are
            computed.
        shuffled_rewards: rewards paid to a random completion of the same group instead of the one they
            score (`shuffled_within_groups`): a control with the reward's spread, group by group, and no tie
            to what an answer says (`configs/ablation/shuffled_grounding.yaml`). Logged figures stay the
            rewards each completion earned.
        num_generations: G, completions sampled per prompt (>= 2: advantages compare them).
        max_completion_length: most tokens sampled per completion.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1.0: the whole distribution).
        scale_rewards: divide advantages by the std of the ``group``, the ``batch``, or ``none``.
        loss_type: token aggregation: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (TRL's default).
        epsilon: lower clipping bound of the ratio, 1 - epsilon.
        epsilon_high: upper clipping bound, 1 + epsilon_high; None: epsilon.
        beta: weight of the k3 KL to the reference model; 0 skips the reference entirely.
        num_iterations: μ, optimizer steps per batch of rollouts (old log-probs kept from the first).
        mask_truncated_completions: leave completions that hit max_completion_length out of the loss.
        max_grad_norm: clip the gradient norm to this before each step; None: no clipping.
        micro_batch_size: completions per forward/backward pass (gradients accumulate; the update is the
            same for any value, see `policy_loss`); None: all.
        log_completions: write sampled completions with their rewards to ``completions.csv`` in
            the log folder (and as text to TensorBoard) every step.
        num_completions_to_print: completions per step written there.
        rollout_seed: base of the rollout seeds (a function of it, the step and the image); not
            ``seed``, which the datamodule's shuffling already names.
        max_new_tokens: longest greedy answer in validation, test and prediction.
        occlusion_test: in `tag test`, also run the evidence-necessity test (see `VLMModule`).
        occlusion_seed: seed of its random regions.
        sampled_answers, sampled_temperature, sampled_seed: in `tag test`, also score sampled answers
            per image (see `VLMModule`).
        rollout: how rollouts and answers are generated: KV cache, compiled decode step, sampling copy
            of the weights (`rollout.RolloutConfig`); None: its defaults.
    """

    def __init__(
        self,
        network: VLMWrapper,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        rewards: dict[str, float] | None = None,
        shuffled_rewards: list[str] | None = None,
        num_generations: int = 8,
        max_completion_length: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        scale_rewards: str = "group",
        loss_type: str = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        max_grad_norm: float | None = 1.0,
        micro_batch_size: int | None = None,
        log_completions: bool = True,
        num_completions_to_print: int = 8,
        rollout_seed: int = 0,
        max_new_tokens: int = 256,
        occlusion_test: bool = False,
        occlusion_seed: int = 0,
        sampled_answers: int = 0,
        sampled_temperature: float = 1.0,
        sampled_seed: int = 0,
        rollout: RolloutConfig | None = None,
    ) -> None:
        super().__init__(network, optimizer, scheduler, max_new_tokens, occlusion_test, occlusion_seed,
                         sampled_answers, sampled_temperature, sampled_seed, rollout)
        _check_options(num_generations, max_completion_length, temperature, top_p, scale_rewards, loss_type,
                       epsilon, epsilon_high, beta, num_iterations, micro_batch_size)
        self.reward_weights = check_weights(DEFAULT_WEIGHTS if rewards is None else rewards)
        self.shuffled_rewards = _check_shuffled(shuffled_rewards or [], self.reward_weights)
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.scale_rewards = scale_rewards
        self.loss_type = loss_type
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta = beta
        self.num_iterations = num_iterations
        self.mask_truncated_completions = mask_truncated_completions
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.log_completions = log_completions
        self.num_completions_to_print = num_completions_to_print
        self.rollout_seed = rollout_seed
        self.automatic_optimization = False  # μ optimizer steps per batch of rollouts
        self.reference = None  # a frozen copy of the starting policy, made when beta > 0 without LoRA
        self._start_weights: list[Tensor] | None = None  # the trained weights at the start, when beta > 0 with LoRA
        self._warned_nothing_counted = False
        if init_from is not None:
            self._start_from(init_from)

    def _start_from(self, path: str) -> None:
        try:
            checkpoint = read_checkpoint(path, mmap=True)  # its weights only are read: not its optimizer states
        except OSError as err:
            raise UserError(f"model.init_args.init_from: {describe(err)}; give the SFT run's checkpoint (e.g. "
                            "its checkpoints/last.ckpt), or --model.init_args.init_from=null to start from the "
                            "model folder's own weights") from None
        check_fits(checkpoint, self.network.config, f"init_from {path}")
        self.network.load_trainable_state_dict(network_weights(checkpoint))
        self.started_from = str(Path(path).resolve())
        # The format the start was trained to write (runs before the option existed wrote per_step).
        self.started_trace_format = (checkpoint.get("datamodule_hyper_parameters") or {}).get("trace_format", PER_STEP)
        rank_zero_info(f"GRPO starts from {path} (step {checkpoint.get('global_step', '?')} of its run)")

    # -- one step axis: optimizer steps -----------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._check_step_counts()
            self._check_trace_format()

    def _check_trace_format(self) -> None:
        """Refuse to reward a format the starting checkpoint was not trained to write: every answer would
        be a format error, and GRPO would learn nothing from its rollouts."""
        asked = getattr(self.trainer.datamodule, "trace_format", None)
        if self.started_from is None or asked is None or asked == self.started_trace_format:
            return
        raise UserError(f"data.trace_format is {asked}, but init_from {self.started_from} was trained on "
                        f"{self.started_trace_format} traces: set --data.trace_format={self.started_trace_format}, "
                        f"or start from an SFT run on {asked} traces")

    def _check_step_counts(self) -> None:
        """`max_steps` and checkpoint intervals count optimizer steps, and Lightning checks them after each
        batch of rollouts, which takes μ of them: each must be a multiple of μ to be met exactly."""
        counts = {"trainer.max_steps": self.trainer.max_steps}
        for callback in self.trainer.checkpoint_callbacks:
            counts[f"{type(callback).__name__}'s every_n_train_steps"] = callback._every_n_train_steps
        for name, count in counts.items():
            if count > 0 and count % self.num_iterations:
                lower = count - count % self.num_iterations
                fits = " or ".join(str(n) for n in (lower, lower + self.num_iterations) if n > 0)
                raise UserError(f"{name} is {count} optimizer steps, not a multiple of num_iterations "
                                f"({self.num_iterations}): each batch of rollouts takes {self.num_iterations} "
                                f"optimizer steps, so {count} cannot be met exactly; use {fits}")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Log this batch at the optimizer step its rollouts are sampled at, as `completions.csv` does.

        Lightning's loggers count batches (`_batches_that_stepped`, one per batch whatever the
        optimizer steps taken); with μ > 1 those would be a second step axis beside `global_step`.
        """
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def configure_model(self) -> None:
        """The reference (beta > 0): a frozen copy of the starting policy in full fine-tuning, made before any
        sharding; with LoRA, a copy of the trained weights as they start (sharded as they are)."""
        full = self.network.config.lora is None
        if self.beta != 0.0 and full and self.reference is None:
            self.reference = copy.deepcopy(self.network.model).requires_grad_(False).eval()
        super().configure_model()
        if self.reference is not None and self.device_mesh is not None:
            self.shard(self.reference)
        if self.beta != 0.0 and not full and self._start_weights is None:
            self._start_weights = [parameter.detach().clone() for parameter in self._trained_parameters()]

    # -- one step: rollouts, rewards, advantages, μ optimizer steps ------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        rollouts = self._rollout(batch)
        everyone = self._from_every_rank(rollouts.rewards)
        advantages = group_advantages(everyone, self.num_generations, self.scale_rewards)
        advantages = advantages.view(self._world(), -1)[self.global_rank].to(self.device)
        chunks = self._chunks(rollouts)
        counted = ~rollouts.truncated if self.mask_truncated_completions else torch.ones_like(rollouts.truncated)
        lengths = torch.tensor([len(ids) for ids in rollouts.token_ids], dtype=torch.float32)
        tokens = (lengths * counted).sum()
        num_items = float(self._from_every_rank(tokens.reshape(1)).sum()) / self._world()
        if num_items == 0:
            self._warn_nothing_counted(rollouts)
        references = [self._reference_logprobs(inputs) for _, inputs in chunks] if self.beta else [None] * len(chunks)
        old = [None] * len(chunks)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        losses, kls, clips = [], [], []
        for _ in range(self.num_iterations):
            optimizer.zero_grad()
            loss_of_step = 0.0  # the chunks' losses add up to the step's (see `policy_loss`)
            for index, (rows, inputs) in enumerate(chunks):
                logps, mask = self.network.answer_logprobs(inputs, self.temperature)
                mask = mask * counted[rows].to(mask).unsqueeze(1)
                if old[index] is None:  # the weights have not moved yet: this pass is the old policy
                    old[index] = logps.detach()
                loss, stats = policy_loss(
                    logps, old[index], advantages[rows], mask, references[index], self.epsilon_low,
                    self.epsilon_high, self.beta, self.loss_type, self.max_completion_length, num_items,
                    batch_size=len(rollouts.texts), batch_tokens=float(tokens))
                with self._gradient_sync(last=index == len(chunks) - 1):
                    self.manual_backward(loss)
                loss_of_step += float(loss.detach())
                kls.append(stats["kl"])
                clips.append(stats["clip_ratio"])
            losses.append(loss_of_step)
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        self._log_step(rollouts, everyone, sum(losses) / len(losses), sum(kls) / len(kls), sum(clips) / len(clips))

    def _warn_nothing_counted(self, rollouts: Rollouts) -> None:
        """Once a run: a step whose every completion hit `max_completion_length` and is masked learns nothing."""
        if self._warned_nothing_counted:
            return
        self._warned_nothing_counted = True
        rank_zero_warn(f"step {rollouts.step}: all {len(rollouts.texts) * self._world()} completions reached "
                       f"max_completion_length ({self.max_completion_length} tokens) and mask_truncated_completions "
                       "leaves them out of the loss, so the step did not learn; raise max_completion_length or "
                       "set mask_truncated_completions false (told once a run)")

    @torch.no_grad()
    def _rollout(self, batch: dict) -> Rollouts:
        """G sampled completions per prompt in one call, each group a function of (rollout_seed, step, image),
        scored by the rewards."""
        images = [image.numpy() for image in batch["image"].cpu()]
        was_training = self.network.training
        self.network.eval()  # sample from the model itself: no dropout
        seeds = [f"{self.rollout_seed}:{self.global_step}:{name}" for name in batch["image_name"]]
        start = time.perf_counter()
        output = self.engine.sample(images, batch["prompt"], seeds, self.num_generations, self.max_completion_length,
                                    temperature=self.temperature, top_p=self.top_p)
        seconds = time.perf_counter() - start  # the answers are on the host: the device has finished
        texts, token_ids = output.texts, output.token_ids
        self.network.train(was_training)
        end_ids = torch.tensor(self.network.end_ids)
        truncated = torch.tensor([not torch.isin(ids[-1:], end_ids).any() for ids in token_ids])
        parts = {}
        samples = self.references(batch)
        for row, text in enumerate(texts):
            references = samples[row // self.num_generations]
            _, results = score(self.read(text, references), references, self.reward_weights)
            for name, result in results.items():
                parts.setdefault(name, []).append(result.value)
                for part, value in result.parts.items():
                    parts.setdefault(f"{name}/{part}", []).append(value)
        totals = self._pay(parts, seeds)
        repeat = self.num_generations
        return Rollouts(
            step=self.global_step,
            images=[image for image in images for _ in range(repeat)],
            prompts=[prompt for prompt in batch["prompt"] for _ in range(repeat)],
            token_ids=token_ids, texts=texts, truncated=truncated,
            rewards=totals,
            reward_parts={name: torch.tensor(values, dtype=torch.float32) for name, values in parts.items()},
            image_names=[name for name in batch["image_name"] for _ in range(repeat)],
            labels=[label for label in batch["label"] for _ in range(repeat)],
            seconds=seconds,
        )

    def _pay(self, values: dict[str, list[float]], seeds: list[str]) -> Tensor:
        """The weighted total each completion is paid, the `shuffled_rewards` paid to a random completion of
        the group, in an order drawn from the group's seed (so a resumed run or another rank pays alike)."""
        totals = torch.zeros(len(seeds) * self.num_generations, dtype=torch.float64)
        for name, weight in self.reward_weights.items():
            paid = torch.tensor(values[name], dtype=torch.float64)
            if name in self.shuffled_rewards:
                paid = shuffled_within_groups(paid, self.num_generations, [f"shuffle:{seed}" for seed in seeds])
            totals += weight * paid
        return totals.float()

    def _chunks(self, rollouts: Rollouts) -> list[tuple[slice, Mapping[str, Tensor]]]:
        """The rollouts as model inputs (prompt + completion tokens, labels = completion), in micro-batches."""
        size = self.micro_batch_size or len(rollouts.texts)
        chunks = []
        for start in range(0, len(rollouts.texts), size):
            rows = slice(start, start + size)
            inputs = self.network.build_inputs(rollouts.images[rows], rollouts.prompts[rows], rollouts.token_ids[rows])
            chunks.append((rows, inputs))
        return chunks

    @torch.no_grad()
    def _reference_logprobs(self, inputs: Mapping[str, Tensor]) -> Tensor:
        if self.reference is not None:
            return self.network.answer_logprobs(inputs, self.temperature, model=self.reference)[0]
        with self._start_weights_in():
            return self.network.answer_logprobs(inputs, self.temperature)[0]

    @contextlib.contextmanager
    def _start_weights_in(self):
        """The trained weights as GRPO started, copied in for a pass and the current ones copied back after it."""
        trained = self._trained_parameters()
        current = [parameter.detach().clone() for parameter in trained]
        for parameter, start in zip(trained, self._start_weights):
            parameter.copy_(start)
        try:
            yield
        finally:
            for parameter, value in zip(trained, current):
                parameter.copy_(value)

    def _trained_parameters(self) -> list[Tensor]:
        return [parameter for parameter in self.network.model.parameters() if parameter.requires_grad]

    # -- across ranks ----------------------------------------------------------------------------

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Under DDP, all-reduce the gradients once per optimizer step: with the step's last micro-batch only.

        (FSDP2 keeps reduce-scattering every micro-batch: deferring it would hold unsharded gradients.)"""
        from torch.nn.parallel import DistributedDataParallel

        model = self.trainer.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _from_every_rank(self, values: Tensor) -> Tensor:
        """`values` of every rank, concatenated in rank order (a group never spans ranks)."""
        if self._world() == 1:
            return values
        return self.all_gather(values.to(self.device)).reshape(-1).cpu()

    # -- logging ---------------------------------------------------------------------------------

    def _log_step(self, rollouts: Rollouts, everyone: Tensor, loss: float, kl: float, clip_ratio: float) -> None:
        size = len(rollouts.texts)
        grouped_std = everyone.view(-1, self.num_generations).std(dim=1)
        figures = {
            "train/loss": loss,
            "train/reward": float(everyone.mean()),
            "train/reward_std": float(everyone.std()) if everyone.numel() > 1 else 0.0,
            "train/frac_reward_zero_std": float(torch.isclose(grouped_std, torch.zeros_like(grouped_std)).float().mean()),
            "train/kl": kl,
            "train/clip_ratio": clip_ratio,
            "train/completion_length": float(torch.tensor([len(ids) for ids in rollouts.token_ids]).float().mean()),
            "train/frac_truncated": float(rollouts.truncated.float().mean()),
            # this step's generation speed, and the engine's compilation so far (warm-up; recompiles if it grows)
            "train/rollout/tokens_per_second": sum(len(ids) for ids in rollouts.token_ids) / max(rollouts.seconds, 1e-9),
            "train/rollout/compiled_graphs": float(self.engine.stats.compiled_graphs),
            "train/rollout/warmup_seconds": self.engine.stats.warmup_seconds,
        }
        for name, values in rollouts.reward_parts.items():
            if "/" in name:
                figures[f"train/rewards/{name}"] = float(values.mean())
            else:
                figures[f"train/rewards/{name}/mean"] = float(values.mean())
                figures[f"train/rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
        if self._world() > 1:  # each rank's figures of its own rollouts, averaged (the gathered ones are equal)
            averaged = self._from_every_rank(torch.tensor(list(figures.values()))).view(self._world(), -1).mean(dim=0)
            figures = dict(zip(figures, averaged.tolist()))
        self.log("train/reward", figures["train/reward"], prog_bar=True, logger=False, batch_size=size)
        self.log_dict({name: value for name, value in figures.items() if name != "train/reward"}, logger=False,
                      batch_size=size)  # for callbacks (a checkpoint monitoring train/reward); the loggers below
        if self._logs_this_batch():
            for logger in self.loggers:
                logger.log_metrics({**figures, "epoch": self.current_epoch}, step=rollouts.step)
        if self.log_completions and self.global_rank == 0:
            self._write_completions(rollouts)

    def _logs_this_batch(self) -> bool:
        """Whether the loggers get this batch's figures: when its μ optimizer steps reach a multiple of
        `log_every_n_steps` (with μ = 1, Lightning's own rule). Lightning's rule counts batches from the
        step axis set in `on_train_batch_start` (0, μ, 2μ, ...): at μ = 2 and `log_every_n_steps` 2 it would
        never log."""
        every = self.trainer.log_every_n_steps
        start = self.global_step - self.num_iterations  # the optimizer steps of this batch: start + 1 .. global_step
        return every > 0 and (self.global_step // every > start // every or self.trainer.should_stop)

    def _write_completions(self, rollouts: Rollouts) -> None:
        """Append this step's first completions with their rewards to ``completions.csv`` (and TensorBoard)."""
        if self.logger is None or self.logger.log_dir is None:
            return
        names = list(self.reward_weights)
        rows = []
        for row in range(min(self.num_completions_to_print, len(rollouts.texts))):
            rows.append({"step": rollouts.step, "image": rollouts.image_names[row], "label": rollouts.labels[row],
                         "reward": round(float(rollouts.rewards[row]), 4),
                         **{name: round(float(rollouts.reward_parts[name][row]), 4) for name in names},
                         "completion": rollouts.texts[row]})
        path = Path(self.logger.log_dir) / "completions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        tensorboard = next((logger for logger in self.loggers if isinstance(logger, TensorBoardLogger)), None)
        if tensorboard is not None:  # a markdown table per step
            header = "| image | label | reward | " + " | ".join(names) + " | completion |"
            lines = [header, "|" + "---|" * (len(names) + 4)]
            lines += [f"| {r['image']} | {r['label']} | {r['reward']} | " + " | ".join(str(r[n]) for n in names)
                      + " | " + r["completion"].replace("\n", "<br>").replace("|", "\\|") + " |" for r in rows]
            tensorboard.experiment.add_text("train/completions", "\n".join(lines), rollouts.step)


def _check_shuffled(names: list[str], weights: Mapping[str, float]) -> list[str]:
    """The shuffled rewards, or a `BadValue` for one that is not paid (not among `rewards` or weighted 0)."""
    unpaid = [name for name in names if not weights.get(name)]
    if unpaid:
        raise BadValue(f"shuffled_rewards {unpaid} are not paid: shuffle rewards with a non-zero weight in "
                       f"rewards ({', '.join(name for name, weight in weights.items() if weight)})")
    return list(names)


def _check_options(num_generations, max_completion_length, temperature, top_p, scale_rewards, loss_type, epsilon,
                   epsilon_high, beta, num_iterations, micro_batch_size) -> None:
    """One line per impossible setting, before any weight moves."""
    if num_generations < 2:
        raise BadValue(f"num_generations must be at least 2 (advantages compare a prompt's completions), "
                       f"got {num_generations}")
    if max_completion_length < 1:
        raise BadValue(f"max_completion_length must be positive, got {max_completion_length}")
    if not temperature > 0:
        raise BadValue(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise BadValue(f"top_p must be in (0, 1], got {top_p}")
    if scale_rewards not in SCALE_REWARDS:
        raise BadValue(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    if loss_type not in LOSS_TYPES:
        raise BadValue(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not 0 <= epsilon < 1 or (epsilon_high is not None and epsilon_high < 0):
        raise BadValue(f"epsilon must be in [0, 1) and epsilon_high >= 0, got {epsilon} and {epsilon_high}")
    if beta < 0 or not math.isfinite(beta):
        raise BadValue(f"beta must be a finite number >= 0, got {beta}")
    if num_iterations < 1:
        raise BadValue(f"num_iterations must be at least 1, got {num_iterations}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise BadValue(f"micro_batch_size must be positive or null, got {micro_batch_size}")
