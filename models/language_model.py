"""The language model: embedding, a pattern of pre-norm mixer blocks, final RMSNorm and a head."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import TokenMixer
from seqzoo.models.cache import ModelCache
from seqzoo.models.losses import CHUNK_ELEMENTS, linear_cross_entropy
from seqzoo.models.modules import RMSNorm, SwiGLU
from seqzoo.models.mom import BALANCE_FORMS, layer_balance_loss, routing_loads, switch_balance_loss
from seqzoo.models.registry import build_mixer, get_mixer_class
from seqzoo.ops.core import checks_enabled


@dataclass
class LanguageModelConfig:
    """Everything that defines a :class:`LanguageModel` (saved with every checkpoint).

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width.
        num_layers: number of blocks.
        pattern: mixer names; layer ``i`` uses ``pattern[i % len(pattern)]``, so
            ``[gated_deltanet, gated_deltanet, gated_deltanet, attention]`` is a 3:1 hybrid.
        mixers: options per mixer name, e.g. ``{"attention": {"num_heads": 4}}``.
        mlp: ``"swiglu"`` or ``None`` (no channel mixer, as in Zoology's MQAR models).
        intermediate_size: SwiGLU inner width (default 8/3 · hidden).
        tie_embeddings: share the embedding matrix with the output head.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal init of linear and embedding weights.
        balance_loss: for models with routed mixers (``mom``): ``{"form": "layer" | "switch", "weight": w}``, the
            router balance loss added to the LM loss with weight ``w`` by the trainer (see
            :meth:`LanguageModel.routing_stats`); ``None``: no balance loss (the loads are still reported).
    """

    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 2
    pattern: list[str] = field(default_factory=lambda: ["attention"])
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlp: str | None = None
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    balance_loss: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LanguageModelConfig:
        """Build and validate from a plain mapping; unknown keys or bad sizes fail with one line."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "vocab_size" not in values:
            raise ConfigError("model config: vocab_size is required")
        mappings = ("mixers", "balance_loss")
        config = cls(**{k: (dict(v) if k in mappings and v is not None else list(v) if k == "pattern" else v) for k, v in values.items()})
        config.validate()
        return config

    def validate(self) -> None:
        """Check sizes, the pattern and the mixer options (names must be registered)."""
        for name in ("vocab_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(f"model config: intermediate_size must be positive, got {self.intermediate_size}")
        if not self.pattern:
            raise ConfigError("model config: pattern must name at least one mixer")
        for name in self.pattern:
            get_mixer_class(name)
        unused = sorted(set(self.mixers) - set(self.pattern))
        if unused:
            raise ConfigError(f"model config: options given for mixer(s) {', '.join(unused)} not in pattern {self.pattern}")
        if self.mlp not in (None, "swiglu"):
            raise ConfigError(f"model config: mlp must be 'swiglu' or null, got {self.mlp!r}")
        if self.balance_loss is not None:
            self._validate_balance_loss()

    def _validate_balance_loss(self) -> None:
        """``balance_loss``: a mapping of ``form`` (``layer`` | ``switch``) and ``weight`` (>= 0), for a pattern with a router."""
        spec = self.balance_loss
        if not isinstance(spec, Mapping):
            raise ConfigError(f"model config: balance_loss must be a mapping {{form, weight}} or null, got {spec!r}")
        unknown = sorted(set(spec) - {"form", "weight"})
        if unknown:
            raise ConfigError(f"model config: balance_loss: unknown key(s) {', '.join(unknown)}; known: form, weight")
        if spec.get("form") not in BALANCE_FORMS:
            raise ConfigError(f"model config: balance_loss.form must be one of {', '.join(BALANCE_FORMS)}, got {spec.get('form')!r}")
        weight = spec.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"model config: balance_loss.weight must be a number >= 0, got {weight!r}")
        if not any(getattr(get_mixer_class(name), "has_router", False) for name in self.pattern):
            raise ConfigError(f"model config: balance_loss needs a routed mixer (mom) in the pattern, got {self.pattern}")

    def layer_mixers(self) -> list[str]:
        """The mixer name of every layer, the pattern repeated to the depth."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.num_layers)]


class Block(nn.Module):
    """One pre-norm residual block: ``x ← x + mixer(norm(x)); x ← x + mlp(norm(x))`` (MLP optional).

    A mixer that is itself a whole pre-norm residual block (``owns_norm``: SCOUT's four sub-layers, each with
    its own norm) gets ``x`` unnormalised, ``x ← x + mixer(x)``, so its inner residual stream is the model's.
    """

    def __init__(self, config: LanguageModelConfig, layer_idx: int, mixer_name: str) -> None:
        super().__init__()
        owns_norm = getattr(get_mixer_class(mixer_name), "owns_norm", False)
        self.mixer_norm = None if owns_norm else RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer: TokenMixer = build_mixer(mixer_name, config.hidden_size, layer_idx, config.mixers.get(mixer_name))
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps) if config.mlp else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if config.mlp else None

    def forward(self, x: torch.Tensor, cache=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; ``cache`` is this layer's :class:`LayerCache`,
        ``cu_seqlens`` the offsets of documents packed along ``seq`` (see :class:`TokenMixer`)."""
        h = x if self.mixer_norm is None else self.mixer_norm(x)
        x = x + self.mixer(h, cache=cache, cu_seqlens=cu_seqlens)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class LanguageModel(nn.Module):
    """A causal language model whose token mixers come from a pattern of registered names.

    ``forward(input_ids [batch, seq], cache=None, *, cu_seqlens=None) -> logits [batch, seq, vocab]``. With a
    :class:`ModelCache` (from :meth:`init_cache`) every layer continues from its cached state, so a
    prompt can be prefilled in one call and continued token by token (:meth:`generate`). With
    ``cu_seqlens`` (``[num_docs + 1]`` offsets, batch 1) the documents packed along ``seq`` are independent:
    no state or attention crosses a boundary, and positions restart at each document.
    """

    def __init__(self, config: LanguageModelConfig | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(config, LanguageModelConfig):
            config = LanguageModelConfig.from_dict(config)
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, name) for i, name in enumerate(config.layer_mixers()))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        # Layers keep their own special parameters (decay logs, dt biases) as bare Parameters, which this leaves alone.
        if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def init_cache(self, batch_size: int) -> ModelCache:
        """An empty decoding cache, one :class:`LayerCache` per layer."""
        return ModelCache([block.mixer.init_cache(batch_size) for block in self.blocks])

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for ``input_ids: [batch, seq]`` (integer token ids)."""
        return self.head(self.hidden_states(input_ids, cache, cu_seqlens=cu_seqlens))

    def hidden_states(
        self, input_ids: torch.Tensor, cache: ModelCache | None = None, *, cu_seqlens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states ``[batch, seq, hidden]`` (the head's input) for ``input_ids: [batch, seq]``."""
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"LanguageModel: input_ids must be integer [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"LanguageModel: cache has {len(cache)} layers, model has {len(self.blocks)}")
        # The range check reads the ids (a device sync): checking mode only. Outside it, the CPU embedding's own
        # IndexError is turned into the same one line; on a GPU a bad id is a device-side assert.
        if checks_enabled():
            self._check_token_ids(input_ids)
        try:
            x = self.embed(input_ids)
        except IndexError:
            self._check_token_ids(input_ids)
            raise
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache[i], cu_seqlens=cu_seqlens)
        return self.norm(x)

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """One-line error unless every id of ``input_ids`` lies in ``[0, vocab_size)``."""
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            low, high = input_ids.min().item(), input_ids.max().item()
            raise ValueError(f"LanguageModel: token ids must lie in [0, {self.config.vocab_size}), got [{low}, {high}]") from None

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy over positions whose label is not -100 (documents packed at ``cu_seqlens``, if given).

        Returns ``(loss, correct, count)``: mean loss, number of argmax hits and number of labelled positions.
        When the labelled positions' fp32 logits would exceed :data:`seqzoo.models.losses.CHUNK_ELEMENTS` (a 32K–128K
        vocabulary), the head and the loss run chunk by chunk (:func:`~seqzoo.models.losses.linear_cross_entropy`):
        the same loss and gradients without ``[tokens, vocab]`` logits.
        """
        hidden = self.hidden_states(input_ids, cu_seqlens=cu_seqlens)
        valid = labels != -100
        # The head runs only where there is a label: MQAR labels a few positions per sequence.
        hidden, targets = hidden[valid], labels[valid]
        if targets.numel() and targets.numel() * self.config.vocab_size > CHUNK_ELEMENTS:
            loss, correct = linear_cross_entropy(hidden, self.head.weight, targets)
            return loss, correct, valid.sum()
        logits = self.head(hidden).float()
        loss = F.cross_entropy(logits, targets) if targets.numel() else logits.sum() * 0.0
        correct = (logits.argmax(-1) == targets).sum()
        return loss, correct, valid.sum()

    def routing_stats(self) -> RoutingStats | None:
        """The routers of the last forward: balance loss and loads. Collects the router logits the routed mixers
        stored on themselves (:attr:`MixtureOfMemories.router_logits`) and clears them, so call it once after each
        forward whose routing should count (the trainer does, after every training step's loss).

        Returns ``None`` when the model has no routed mixer or none has run since the last call.
        """
        routed = [(i, block.mixer) for i, block in enumerate(self.blocks) if getattr(block.mixer, "has_router", False)]
        logits = [(i, mixer.topk, mixer.pop_router_logits()) for i, mixer in routed]
        logits = [(i, k, x) for i, k, x in logits if x is not None]
        if not logits:
            return None
        loads = {i: routing_loads(x.detach(), k) for i, k, x in logits}
        loss, weight = None, 0.0
        if self.config.balance_loss is not None:
            form, weight = self.config.balance_loss["form"], float(self.config.balance_loss["weight"])
            topks = {k for _, k, _ in logits}
            if len(topks) != 1:  # pragma: no cover - one mixer name, one set of options
                raise ValueError(f"LanguageModel: routed layers disagree on topk {sorted(topks)}")
            loss_fn = switch_balance_loss if form == "switch" else layer_balance_loss
            loss = loss_fn([x for _, _, x in logits], topks.pop())
        return RoutingStats(loss=loss, weight=weight, loads=loads)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Continue prompts by ``max_new_tokens`` tokens each.

        ``input_ids`` is a batch ``[batch, seq]`` (returns ``[batch, seq + new]``) or a list of prompts of any
        lengths (1-D tensors or lists of ids; returns a list of 1-D tensors, each prompt followed by its
        continuation). The prompts are prefilled in one packed call (``cu_seqlens``), which leaves each layer's
        cache with one state per prompt, then decoded together, one token per step, each row at its own
        position; greedy output equals generating each prompt alone. ``temperature=0`` is greedy; ``top_k``
        keeps the k most likely tokens. ``use_cache=False`` recomputes everything each step (the reference).
        """
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"generate: top_k must be >= 1, got {top_k}")
        batched = isinstance(input_ids, torch.Tensor)
        device = self.embed.weight.device
        prompts = list(input_ids) if batched else [torch.as_tensor(p, dtype=torch.long, device=device) for p in input_ids]
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("generate: give a [batch, seq] tensor or a non-empty list of non-empty 1-D prompts")
        was_training = self.training
        self.eval()
        lengths = [p.numel() for p in prompts]
        offsets = torch.tensor([0, *itertools.accumulate(lengths)], device=device)
        packed = torch.cat(prompts)[None]
        cache = self.init_cache(len(prompts)) if use_cache else None
        if use_cache:
            logits = self(packed, cache=cache, cu_seqlens=offsets)[0, offsets[1:] - 1]
        outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            if not use_cache:
                rows = [torch.cat([p, *o]) for p, o in zip(prompts, outputs)]
                cu = torch.tensor([0, *itertools.accumulate(r.numel() for r in rows)], device=device)
                logits = self(torch.cat(rows)[None], cu_seqlens=cu)[0, cu[1:] - 1]
            next_token = _sample(logits, temperature, top_k, generator)
            for row, token in zip(outputs, next_token):
                row.append(token[None])
            if use_cache and step + 1 < max_new_tokens:
                logits = self(next_token[:, None], cache=cache)[:, -1]
        self.train(was_training)
        results = [torch.cat([p, *o]) for p, o in zip(prompts, outputs)]
        return torch.stack(results) if batched else results

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of every layer's decoding state after a prompt of ``seq_len`` tokens."""
        return sum(block.mixer.state_size(batch=batch, seq_len=seq_len) for block in self.blocks)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases, embeddings, and any flagged ``_no_weight_decay``."""
        names = set()
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if param.dim() < 2 or isinstance(module, (nn.Embedding, RMSNorm)) or getattr(param, "_no_weight_decay", False):
                    names.add(full)
        return names


@dataclass
class RoutingStats:
    """What :meth:`LanguageModel.routing_stats` reports of the routers' last forward.

    Attributes:
        loss: the balance loss of the config's form (a scalar with its graph), or ``None`` without ``balance_loss``.
        weight: its weight in the training objective (0 without ``balance_loss``).
        loads: layer index → fraction of the tokens routed to each memory, ``[M]`` (sums to ``topk``).
    """

    loss: torch.Tensor | None
    weight: float
    loads: dict[int, torch.Tensor]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ``[batch]`` from logits ``[batch, vocab]``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
