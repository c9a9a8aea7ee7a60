"""The rollout engine: every answer the policy writes goes through here, one `generate` call a batch.

GRPO's rollouts, the greedy answers of validation, `tag test` and `tag predict`, `tag test`'s sampled
answers and its occlusion re-asks all call `RolloutEngine`, which puts every row of the batch (B prompts
x G answers) into one Hugging Face `generate` call and removes the work a decode step does not need:

- each image is encoded once, not once per answer: the vision tower runs on the B images and its
  features are repeated for the G rows (where the model accepts pre-encoded features; other backbones
  encode every row's image);
- every row samples with its own uniform numbers, drawn up front from a generator seeded by its group's
  key (`sampling.row_uniforms`), so a group's answers do not depend on what shares the call;
- with `merge_for_sampling` the decode runs on a copy of the weights in the base's dtype, LoRA merged in
  and trained float32 weights cast, refreshed only when training has changed them: no adapter ops and
  no autocast recasts per token, and the training weights are never touched (an in-place
  merge/unmerge cycle in bfloat16 drifts them);
- optionally a static KV cache of a fixed length (prompts rounded up to `prompt_bucket`) and a compiled
  decode step (transformers' automatic `generate` compilation; CUDA graphs with mode reduce-overhead),
  which then compiles once per row count and never again;
- sharded with FSDP2, the weights are gathered once around the call and freed after it, instead of
  once per token (the ranks then decode independently);
- nothing is copied to the device per token (placeholder ids and uniform numbers go once a call), and on
  a GPU the host reads whether all rows have ended one step late instead of waiting on every token.

The engine counts the graphs torch.compile builds and the seconds of the calls that built them
(`stats`), so warm-up can be reported apart from steady-state speed.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from transformers import CompileConfig, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tag_lightning.errors import BadValue
from tag_lightning.models.sampling import NextTokenSampler, row_uniforms
from tag_lightning.models.vlm import VLMWrapper

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


@dataclass
class RolloutConfig:
    """How the policy generates: GRPO's rollouts and every answer of validation, `tag test` and `tag predict`.

    Args:
        cache_implementation: the KV cache, by transformers' names: ``dynamic`` grows token by token;
            ``static`` is allocated at a fixed length (the prompt rounded up to `prompt_bucket`, plus the
            most new tokens), the fixed shapes a compiled decode step needs.
        compile: compile the decode step with torch.compile (transformers' `generate` compilation); needs
            the ``static`` cache. The first call of each row count pays the compilation (warm-up).
        compile_mode: torch.compile's mode: ``reduce-overhead`` replays the step as CUDA graphs on a GPU
            (transformers' default); ``default`` or ``max-autotune`` otherwise.
        compile_backend: torch.compile's backend: ``inductor``; ``eager`` or ``aot_eager`` to debug.
        merge_for_sampling: decode from a copy of the weights in the base's dtype, with the LoRA adapters
            merged in and trained float32 weights cast, refreshed when training has changed them: no
            adapter ops and no dtype casts per token, for the memory of the adapted layers once more.
            False: decode through the training modules under autocast. Ignored under FSDP2 sharding.
        prompt_bucket: the static cache's prompt part is the longest prompt rounded up to a multiple of
            this many tokens, so prompts a few tokens apart share one cache shape (and one compiled step).
    """

    cache_implementation: str = "dynamic"
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_backend: str = "inductor"
    merge_for_sampling: bool = True
    prompt_bucket: int = 256

    def __post_init__(self) -> None:
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise BadValue(f"rollout.cache_implementation {self.cache_implementation!r} is not one of "
                           f"{', '.join(CACHE_IMPLEMENTATIONS)}")
        if self.compile and self.cache_implementation != "static":
            raise BadValue("rollout.compile needs rollout.cache_implementation static: a compiled decode step needs "
                           "a cache of fixed shape")
        if self.prompt_bucket < 1:
            raise BadValue(f"rollout.prompt_bucket must be positive, got {self.prompt_bucket}")


@dataclass
class Answers:
    """Generated answers, grouped by prompt (prompt i: rows i*n .. i*n+n-1 for n answers a prompt).

    `token_ids` are each answer's tokens through its end token (no padding).
    """

    texts: list[str]
    token_ids: list[Tensor] = field(repr=False)


@dataclass
class RolloutStats:
    """What the engine has done so far: calls, graphs torch.compile built, and the seconds of the calls
    that built one (warm-up), apart from the others."""

    calls: int = 0
    compiled_graphs: int = 0
    warmup_seconds: float = 0.0
    steady_seconds: float = 0.0
    steady_tokens: int = 0


class RolloutEngine:
    """Generates for a `VLMWrapper` as `config` says (see the module doc)."""

    def __init__(self, network: VLMWrapper, config: RolloutConfig | None = None) -> None:
        self.network = network
        self.config = config or RolloutConfig()
        self.stats = RolloutStats()
        self._forbidden: dict[torch.device, Tensor] = {}
        self._sampling_copy: _SamplingCopy | None = None
        self._compile_config = None
        if self.config.compile:
            self._compile_config = CompileConfig(fullgraph=False, dynamic=False, backend=self.config.compile_backend,
                                                 mode=self.config.compile_mode)

    # -- what callers ask for ----------------------------------------------------------------------

    def greedy(self, images: Sequence[np.ndarray], prompts: Sequence[str], max_new_tokens: int) -> Answers:
        """One greedy answer per (image, prompt)."""
        return self._generate(images, prompts, 1, None, max_new_tokens)

    def sample(self, images: Sequence[np.ndarray], prompts: Sequence[str], seeds: Sequence[str], num_samples: int,
               max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> Answers:
        """`num_samples` answers per (image, prompt), drawn from the model's own distribution (temperature and
        top-p only: no top-k, no repetition penalty); prompt i's answers are a function of `seeds[i]` alone."""
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        uniforms = row_uniforms(seeds, num_samples, max_new_tokens)
        return self._generate(images, prompts, num_samples, uniforms, max_new_tokens, temperature, top_p)

    # -- one call ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, images: Sequence[np.ndarray], prompts: Sequence[str], repeat: int, uniforms: Tensor | None,
                  max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> Answers:
        if not prompts:
            return Answers([], [])
        network = self.network
        start = time.perf_counter()
        graphs_before = _compiled_graphs()
        with self._weights_gathered(), self._sampling_weights() as plain, _stop_check_one_step_behind(network.device):
            rows, encoded = self._row_inputs(images, prompts, repeat)
            prompt_length = rows["input_ids"].shape[1]
            device = network.device
            sampler = NextTokenSampler(self._forbidden_on(device), prompt_length,
                                       None if uniforms is None else uniforms.to(device), temperature, top_p)
            # Autocast only where a weight the call reads is not in the base's dtype (the vision side, when
            # `generate` encodes the images itself, or training weights without a sampling copy).
            with contextlib.nullcontext() if plain and encoded else network.autocast():
                sequences = network.model.generate(
                    **rows, max_new_tokens=max_new_tokens, use_cache=True, do_sample=False, repetition_penalty=1.0,
                    eos_token_id=network.end_ids, pad_token_id=network.processor.tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([sampler]),
                    **self._cache_options(prompt_length, max_new_tokens))
        answers = [self._through_end(row) for row in sequences[:, prompt_length:].cpu()]
        self._count(start, graphs_before, sum(len(ids) for ids in answers))
        return Answers(network.processor.batch_decode(answers, skip_special_tokens=True), answers)

    def _row_inputs(self, images: Sequence[np.ndarray], prompts: Sequence[str], repeat: int) -> tuple[dict, bool]:
        """`generate`'s inputs for every row (prompts left-padded), and whether the images are encoded already.

        Where the model takes pre-encoded features (``mm_encoder_outputs``), each image is encoded here,
        once, and its features repeated for its rows; otherwise every row carries its own pixels.
        """
        network = self.network
        model = _hf_model(network.model)
        if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
            index = [i for i in range(len(prompts)) for _ in range(repeat)]
            rows = network.build_inputs([images[i] for i in index], [prompts[i] for i in index], padding_side="left")
            return network.on_device(rows), False
        inputs = network.on_device(network.build_inputs(images, prompts, padding_side="left"))
        wanted = inspect.signature(model.get_image_features).parameters
        with network.autocast():  # through the outer model: under FSDP2 its root gathers the weights first
            features = network.model.get_image_features(**{key: inputs[key] for key in wanted if key in inputs},
                                                        return_dict=True)
        rows = {key: value.repeat_interleave(repeat, dim=0) for key, value in inputs.items()
                if not key.startswith("pixel_")}  # the pixels are encoded; grid sizes stay, for the positions
        rows["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
            pooler_output=[entry for entry in features.pooler_output for _ in range(repeat)])}  # an entry an image
        return rows, True

    def _cache_options(self, prompt_length: int, max_new_tokens: int) -> dict:
        if self.config.cache_implementation == "dynamic":
            return {"cache_implementation": "dynamic", "disable_compile": True}
        bucket = self.config.prompt_bucket
        options = {"cache_implementation": "static",
                   "max_cache_len": math.ceil(prompt_length / bucket) * bucket + max_new_tokens}
        if self._compile_config is None:
            return {**options, "disable_compile": True}  # transformers compiles a static cache on a GPU by itself
        self._compile_config._compile_all_devices = True  # transformers' flag: compile on the CPU too, when asked
        return {**options, "compile_config": self._compile_config}

    def _count(self, start: float, graphs_before: int, tokens: int) -> None:
        seconds = time.perf_counter() - start
        built = _compiled_graphs() - graphs_before
        self.stats.calls += 1
        self.stats.compiled_graphs += built
        if built:
            self.stats.warmup_seconds += seconds
        else:
            self.stats.steady_seconds += seconds
            self.stats.steady_tokens += tokens

    def _forbidden_on(self, device: torch.device) -> Tensor:
        """The image placeholder ids, on `device` once."""
        if device not in self._forbidden:
            self._forbidden[device] = torch.tensor(self.network.placeholder_ids, dtype=torch.long, device=device)
        return self._forbidden[device]

    def _through_end(self, tokens: Tensor) -> Tensor:
        ends = torch.isin(tokens, torch.tensor(self.network.end_ids)).nonzero()
        return tokens[: int(ends[0]) + 1] if len(ends) else tokens

    # -- which weights decode ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sampling_weights(self) -> Iterator[bool]:
        """Swap the sampling copy in for the call, when asked for and possible; yields whether every weight the
        decode reads is then in the base's dtype (so the call needs no autocast)."""
        network = self.network
        if not self.config.merge_for_sampling or _sharded(network.model):
            yield network.dtype == torch.float32 or not any(p.requires_grad for p in network.model.parameters())
            return
        if self._sampling_copy is None:
            self._sampling_copy = _SamplingCopy(network.model, network.dtype, network.backbone)
        with self._sampling_copy.swapped_in():
            yield self._sampling_copy.complete

    @contextlib.contextmanager
    def _weights_gathered(self) -> Iterator[None]:
        """Under FSDP2, all-gather every sharded module's weights once for the call and free them after it, instead
        of once per forward pass (per token). The peak is one full copy of the weights, as in an unsharded model."""
        from torch.distributed.fsdp import FSDPModule

        sharded = [module for module in self.network.model.modules() if isinstance(module, FSDPModule)]
        if not sharded:
            yield
            return
        for module in sharded:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()
                # back to `fully_shard`'s defaults (`VLMModule.shard`): the blocks reshard after forward, the root not
                module.set_reshard_after_forward(module is not sharded[0], recurse=False)


class _SamplingCopy:
    """The weights a decode step reads, in the base's dtype, kept apart from the training weights.

    A LoRA-adapted linear layer decodes from ``W + scale * B @ A`` (computed in float32, rounded once);
    a trained float32 weight of the language model or LM head decodes from its cast. The buffers are
    allocated once and refreshed in place only when a trained weight has changed since (their version
    counters), so a compiled step keeps reading the same addresses. `swapped_in` puts them in the
    modules for one call and the training Parameters back after it, untouched.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, backbone) -> None:
        self.model = model
        self.lora_layers = [module for module in model.modules() if _is_lora_layer(module)]
        owners: dict[int, list[tuple[nn.Module, str]]] = {}  # a Parameter by id -> every (module, name) holding it
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is not None:
                    owners.setdefault(id(parameter), []).append((module, name))
        self.slots: list[tuple[nn.Parameter, nn.Parameter, list[tuple[nn.Module, str]], nn.Module | None]] = []
        seen = set()
        for layer in self.lora_layers:
            weight = layer.get_base_layer().weight
            seen.add(id(weight))
            self.slots.append((weight, _frozen_like(weight, dtype), owners[id(weight)], layer))
        decoder_parts = tuple(backbone.language) + ("lm_head",)
        self.complete = True  # every weight the decode reads is in `dtype`
        for name, parameter in _base_named_parameters(model):
            if id(parameter) in seen or parameter.dtype == dtype or "lora_" in name:
                continue
            if any(name == part or name.startswith(part + ".") for part in decoder_parts):
                seen.add(id(parameter))
                self.slots.append((parameter, _frozen_like(parameter, dtype), owners[id(parameter)], None))
            elif parameter.requires_grad and not _is_projector(name, backbone):
                self.complete = False
        self._versions: tuple[int, ...] | None = None

    def _trained_versions(self) -> tuple[int, ...]:
        return tuple(parameter._version for parameter in self.model.parameters() if parameter.requires_grad)

    def refresh(self) -> None:
        versions = self._trained_versions()
        if versions == self._versions:
            return
        for original, copy, _, lora_layer in self.slots:
            value = original.detach().float()
            if lora_layer is not None:
                for adapter in lora_layer.active_adapters:
                    value = value + lora_layer.get_delta_weight(adapter).float()
            copy.data.copy_(value)
        self._versions = versions

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        self.refresh()
        for original, copy, holders, _ in self.slots:
            for module, name in holders:
                module._parameters[name] = copy
        for layer in self.lora_layers:
            layer._disable_adapters = True  # the merged weight already holds the adapter
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer._disable_adapters = False
            for original, copy, holders, _ in self.slots:
                for module, name in holders:
                    module._parameters[name] = original


@contextlib.contextmanager
def _stop_check_one_step_behind(device: torch.device) -> Iterator[None]:
    """On a GPU, let `generate` read whether every row has ended one step late, so the host queues the next decode
    step before waiting on the last one instead of syncing on every token.

    transformers 5.24 ships this check (`DeferredStopCheck`: one extra forward pass, undone at the end) but turns
    it on for Apple's MPS only; the engine turns it on for its own CUDA calls. On a CPU there is nothing to wait on.
    """
    from transformers.generation import utils

    if device.type != "cuda":
        yield
        return
    supported = utils.DeferredStopCheck.is_supported
    utils.DeferredStopCheck.is_supported = staticmethod(
        lambda device, cache, cache_is_returned, is_assistant: not is_assistant and not cache_is_returned)
    try:
        yield
    finally:
        utils.DeferredStopCheck.is_supported = supported


def _frozen_like(parameter: Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty_like(parameter, dtype=dtype), requires_grad=False)


def _base_named_parameters(model: nn.Module):
    """(name, parameter) with names as transformers builds the model (PEFT's prefixes removed)."""
    for name, parameter in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(
            ".original_module.", "."), parameter


def _is_projector(name: str, backbone) -> bool:
    return any(name == part or name.startswith(part + ".") for part in backbone.projector)


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "weight")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
