"""seqzoo models as Hugging Face ``transformers`` models: ``AutoConfig`` / ``AutoModelForCausalLM``, safetensors,
HF ``generate()``.

* :class:`SeqzooConfig` (``model_type = "seqzoo"``) holds a :class:`~seqzoo.models.LanguageModelConfig`
  field for field (the mixer pattern and the per-mixer options included) plus HF's token ids.
* :class:`SeqzooForCausalLM` wraps a :class:`~seqzoo.models.LanguageModel` under the attribute ``model``: its
  weights are the language model's state dict with a ``model.`` prefix, saved as safetensors.
* :class:`SeqzooCache` is seqzoo's :class:`~seqzoo.models.ModelCache` exposed as an HF ``Cache``.

Importing :mod:`seqzoo` registers both classes with ``AutoConfig`` and ``AutoModelForCausalLM`` (see
:func:`register_auto_classes`). A directory written by :func:`save_hf_directory` also carries a two-line
``modeling_seqzoo.py`` and an ``auto_map``, so a program that never imports seqzoo (the ``lm_eval`` command)
loads it with ``trust_remote_code=True``; that code only imports the installed seqzoo package.

Padding: HF batches prompts of different lengths with left padding and an ``attention_mask``. The wrapper never
feeds pad tokens to a mixer (a recurrent state would absorb them): each row's tokens are cut out of the padded
batch and run packed (``cu_seqlens``), the prefill leaving one cache row per prompt, and the rows are then decoded
together, each at its own position, exactly as :meth:`LanguageModel.generate` does. Outputs at pad positions are
zero.

Transformers version: written against the 5.x generation API, in which the cache is passed as ``cache=`` (it was
``past_key_values=`` before; both names are accepted). ``pyproject.toml`` pins the range the tests ran on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from seqzoo.configs import ConfigError
from seqzoo.models.cache import LayerCache, ModelCache
from seqzoo.models.language_model import LanguageModel, LanguageModelConfig
from seqzoo.models.modules import RMSNorm

__all__ = ["SeqzooCache", "SeqzooConfig", "SeqzooForCausalLM", "register_auto_classes", "save_hf_directory"]

# The output field that carries the cache: "cache" in transformers 5.x, "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_LM_FIELDS = [f.name for f in dataclasses.fields(LanguageModelConfig)]


class SeqzooConfig(PretrainedConfig):
    """The HF config of a seqzoo language model: every :class:`LanguageModelConfig` field, plus HF's token ids.

    ``tie_embeddings`` is HF's ``tie_word_embeddings``; ``num_hidden_layers`` reads ``num_layers``. Building one
    validates the model config (an unknown mixer or option is a one-line :class:`ConfigError`).

    Args:
        vocab_size, hidden_size, num_layers, pattern, mixers, mlp, intermediate_size, norm_eps, init_std,
            balance_loss: as in :class:`LanguageModelConfig` (``balance_loss``: MoM's training term, kept so a
            re-imported model trains as it did).
        tie_word_embeddings: share the embedding with the output head (``LanguageModelConfig.tie_embeddings``).
        bos_token_id, eos_token_id, pad_token_id: HF's token ids (the byte tokenizer's end of document is 256).
    """

    model_type = "seqzoo"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 128,
        num_layers: int = 2,
        pattern: list[str] | None = None,
        mixers: dict[str, dict[str, Any]] | None = None,
        mlp: str | None = None,
        intermediate_size: int | None = None,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        balance_loss: dict[str, Any] | None = None,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("tie_embeddings", None)  # a LanguageModelConfig dict passed whole: tie_word_embeddings holds it
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.pattern = list(pattern) if pattern is not None else ["attention"]
        self.mixers = {name: dict(options) for name, options in (mixers or {}).items()}
        self.mlp = mlp
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.init_std = init_std
        self.balance_loss = dict(balance_loss) if balance_loss is not None else None
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.language_model_config()  # validate now: a bad pattern or option fails where the config is made

    def language_model_config(self) -> LanguageModelConfig:
        """The :class:`LanguageModelConfig` this config describes (validated)."""
        values = {name: getattr(self, name) for name in _LM_FIELDS if name != "tie_embeddings"}
        values["tie_embeddings"] = bool(self.tie_word_embeddings)
        return LanguageModelConfig.from_dict(values)

    @classmethod
    def from_language_model_config(cls, config: LanguageModelConfig | Mapping[str, Any], **kwargs: Any) -> SeqzooConfig:
        """The HF config of ``config`` (a :class:`LanguageModelConfig` or its dict); ``kwargs``: token ids etc."""
        if not isinstance(config, LanguageModelConfig):
            config = LanguageModelConfig.from_dict(config)
        values = dataclasses.asdict(config)
        values["tie_word_embeddings"] = values.pop("tie_embeddings")
        return cls(**values, **kwargs)


class SeqzooCache(Cache):
    """seqzoo's decoding cache (:class:`~seqzoo.models.ModelCache`) as an HF ``Cache``.

    It holds one :class:`LayerCache` per layer (KV caches for attention, recurrent states and conv tails for the
    linear mixers, memories for Titans), each row at its own position, and ``consumed``: the columns of HF's
    (padded) ``input_ids`` fed so far, which is what :meth:`get_seq_length` reports to ``generate``.

    Supported by ``GenerationMixin``: greedy and sampled decoding, beam search and ``num_return_sequences``
    (:meth:`reorder_cache`, :meth:`batch_repeat_interleave`, :meth:`batch_select_indices` select rows of every
    layer's state), ``crop(0)``. Not supported: cropping tokens off a recurrent state (``crop(n > 0)``; assisted
    and prompt-lookup decoding need it and ``generate`` refuses them for this stateful model), static or
    offloaded cache implementations (the model builds this cache itself and ignores ``cache_implementation``).
    """

    def __init__(self, model_cache: ModelCache | None = None, consumed: int = 0) -> None:
        # No HF cache layers: seqzoo's layers keep their own state. With an empty layer list every generic HF
        # helper that walks the layers (is_linear, is_compileable, the offset logic of _prefill) stays inert.
        super().__init__(layers=[])
        self.model_cache = model_cache
        self.consumed = consumed

    def __repr__(self) -> str:
        rows = 0 if self.model_cache is None else self.model_cache.batch_size
        return f"SeqzooCache(rows={rows}, consumed={self.consumed})"

    def __len__(self) -> int:
        return 0 if self.model_cache is None else len(self.model_cache)

    @property
    def batch_size(self) -> int:
        """Rows of the cache (``-1`` before the prefill)."""
        return -1 if self.model_cache is None else self.model_cache.batch_size

    @property
    def seen(self) -> list[int]:
        """Tokens each row has consumed (pad tokens excluded)."""
        return [] if self.model_cache is None else self.model_cache.seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of the padded ``input_ids`` consumed so far (what ``generate`` slices new tokens by)."""
        return self.consumed

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.consumed

    def reset(self) -> None:
        """Forget everything (the next call is a prefill)."""
        self.model_cache, self.consumed = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)``: a recurrent state cannot give tokens back (one-line error otherwise)."""
        if tokens_to_remove:
            raise ValueError("SeqzooCache: cannot remove tokens from recurrent states (assisted or lookahead decoding is not supported)")

    def _select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (``[new_rows]``, may repeat) of every layer's state."""
        if self.model_cache is None:
            return
        rows = [int(i) for i in index.tolist()]
        for layer in self.model_cache.layers:
            _select_layer_rows(layer, rows, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``."""
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (``num_return_sequences`` on a prefilled cache)."""
        if self.model_cache is not None:
            self._select_rows(torch.arange(self.model_cache.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``."""
        self._select_rows(indices)


def _select_layer_rows(layer: LayerCache, rows: list[int], index: torch.Tensor) -> None:
    """Rows ``rows`` of one layer's cache, in place. Row-by-row caches get fresh single-row caches (copies: two
    beams from one parent must not share state tensors)."""
    layer.seen = [layer.seen[i] for i in rows]
    layer.batch_size = len(rows)
    if layer.rows is not None:
        fresh = []
        for i in rows:
            row = LayerCache(1)
            row.seen = list(layer.rows[i].seen)
            row.tensors = {name: t.clone() for name, t in layer.rows[i].tensors.items()}
            fresh.append(row)
        layer.rows = fresh
    layer.tensors = {name: t.index_select(0, index.to(t.device)) for name, t in layer.tensors.items()}


def _contiguous_rows(attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """``(first, length)`` of the real tokens of each row of a ``[batch, seq]`` 0/1 mask; one-line error unless each row's
    ones are one run (left or right padding) and no row is empty."""
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    if any(n == 0 for n in lengths):
        raise ValueError("SeqzooForCausalLM: a row of attention_mask has no token (every row needs at least one)")
    first = mask.int().argmax(1).tolist()
    last = (mask.shape[1] - 1 - mask.int().flip(1).argmax(1)).tolist()
    if any(b - a + 1 != n for a, b, n in zip(first, last, lengths)):
        raise ValueError("SeqzooForCausalLM: attention_mask must mark one run of tokens per row (left or right padding), not holes")
    return first, lengths


class SeqzooForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`LanguageModel` as an HF causal LM (``model`` attribute; weights ``model.<seqzoo name>``).

    ``forward(input_ids [batch, seq], attention_mask=None, cache=None, use_cache=None, labels=None,
    logits_to_keep=0) -> CausalLMOutputWithPast`` with ``logits [batch, seq or logits_to_keep, vocab]``:

    * without a cache: the parallel form; with an ``attention_mask`` that has zeros, the rows' tokens run packed
      (pads never reach a mixer) and the pad positions' logits are zero;
    * with ``use_cache=True`` and no cache, or an empty :class:`SeqzooCache`: a packed prefill of every row's tokens
      that leaves one cache row per prompt;
    * with a filled cache: ``input_ids`` are the next columns (HF passes one per step), fed to every row at its
      own position.

    ``labels [batch, seq]`` give the shifted next-token loss (``-100`` ignored), as HF causal LMs do.
    ``generate()`` is HF's: greedy, sampling (temperature, top-k, top-p, repetition penalty), EOS stopping,
    streamers, beam search, left-padded batches. Prompts given as ``inputs_embeds`` are refused with one line.
    """

    config_class = SeqzooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # no assisted decoding: recurrent states cannot be rolled back
    _supports_cache_class = True
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: SeqzooConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(config.language_model_config())
        if not config.tie_word_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    @classmethod
    def from_language_model(cls, model: LanguageModel, **config_kwargs: Any) -> SeqzooForCausalLM:
        """Wrap an existing :class:`LanguageModel` (its weights are shared, not copied); ``config_kwargs``: token ids."""
        config = SeqzooConfig.from_language_model_config(model.config, **config_kwargs)
        wrapped = cls(config)
        wrapped.model = model
        return wrapped.to(next(model.parameters()).dtype)

    @property
    def language_model(self) -> LanguageModel:
        """The wrapped seqzoo :class:`LanguageModel`."""
        return self.model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not build HF's DynamicCache: prepare_inputs_for_generation makes a SeqzooCache.
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise what a checkpoint does not hold: the non-persistent buffers (RoPE frequencies, RetNet decays,
        Taylor feature-map indices: each such module's ``reset_buffers``), which ``from_pretrained`` leaves uninitialised after building on the meta device,
        and, for weights missing from a checkpoint, seqzoo's own init (normal ``init_std`` for linear and embedding
        weights, ones for norms)."""
        std = self.config.init_std
        if hasattr(module, "reset_buffers"):  # seqzoo modules with non-persistent buffers recompute them
            module.reset_buffers()
        if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
            if not getattr(module.weight, "_is_hf_initialized", False):
                nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None and not getattr(module.bias, "_is_hf_initialized", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm) and not getattr(module.weight, "_is_hf_initialized", False):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SeqzooCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: SeqzooCache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids [batch, seq]`` (see the class docstring for the cache and padding rules)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("SeqzooForCausalLM: give input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SeqzooCache):
            raise ValueError(f"SeqzooForCausalLM: cache must be a SeqzooCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = SeqzooCache()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"SeqzooForCausalLM: attention_mask must be [batch, seq] of 0/1, got shape {tuple(attention_mask.shape)}")
        batch, seq = input_ids.shape
        if cache is not None and cache.model_cache is not None:
            if attention_mask is not None and not bool(attention_mask[:, -seq:].bool().all()):
                raise ValueError("SeqzooForCausalLM: tokens after the prefill must all be real (attention_mask 1)")
            hidden = self.model.hidden_states(input_ids, cache.model_cache)
            cache.consumed += seq
        else:
            hidden = self._first_pass(input_ids, attention_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.head(hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _first_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: SeqzooCache | None) -> torch.Tensor:
        """Hidden states ``[batch, seq, hidden]`` of a prefill (``cache`` given, empty) or an uncached forward; pad
        positions are zero. A prefill always runs the rows packed, as :meth:`LanguageModel.generate` does, so that
        HF's greedy decoding equals seqzoo's token for token."""
        batch, seq = input_ids.shape
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if cache is None and not padded:
            return self.model.hidden_states(input_ids)
        if padded:
            first, lengths = _contiguous_rows(attention_mask)
        else:
            first, lengths = [0] * batch, [seq] * batch
        pieces = [input_ids[r, a : a + n] for r, (a, n) in enumerate(zip(first, lengths))]
        offsets = torch.tensor([0, *itertools.accumulate(lengths)], device=input_ids.device)
        model_cache = None
        if cache is not None:
            model_cache = self.model.init_cache(batch)
            cache.model_cache, cache.consumed = model_cache, seq
        packed = self.model.hidden_states(torch.cat(pieces)[None], model_cache, cu_seqlens=offsets)[0]
        if not padded:
            return packed.view(batch, seq, -1)
        hidden = packed.new_zeros(batch, seq, packed.shape[-1])
        for r, (a, n) in enumerate(zip(first, lengths)):
            hidden[r, a : a + n] = packed[offsets[r] : offsets[r] + n]
        return hidden

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: SeqzooCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        past_key_values: SeqzooCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The next call of ``generate``: the whole (padded) prompt on the first step, then the columns the cache has
        not consumed. Positions come from the cache, so HF's ``position_ids`` are not passed on."""
        if inputs_embeds is not None:
            raise ValueError("SeqzooForCausalLM.generate: prompts given as inputs_embeds are not supported; pass input_ids")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SeqzooCache):
            raise ValueError(f"SeqzooForCausalLM.generate: cache must be a SeqzooCache, got {type(cache).__name__}")
        inputs: dict[str, Any] = {"use_cache": use_cache, "attention_mask": attention_mask}
        if use_cache:
            cache = SeqzooCache() if cache is None else cache
            inputs["cache"] = cache
            if cache.model_cache is not None:
                input_ids = input_ids[:, cache.consumed :]
                inputs["attention_mask"] = None  # past the prefill every column is real
        inputs["input_ids"] = input_ids
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


def register_auto_classes() -> None:
    """Register :class:`SeqzooConfig` / :class:`SeqzooForCausalLM` with ``AutoConfig`` / ``AutoModelForCausalLM``
    (idempotent; ``import seqzoo`` calls it)."""
    AutoConfig.register("seqzoo", SeqzooConfig, exist_ok=True)
    AutoModelForCausalLM.register(SeqzooConfig, SeqzooForCausalLM, exist_ok=True)


# A directory that must load without `import seqzoo` first (lm_eval's command line) points AutoConfig /
# AutoModelForCausalLM at this file through `auto_map`; it only re-exports the installed package's classes.
_REMOTE_CODE = '''"""seqzoo's HF classes, for loaders that do not import seqzoo themselves (needs `pip install seqzoo`)."""

from seqzoo.models.hf import SeqzooConfig, SeqzooForCausalLM  # noqa: F401
'''


def save_hf_directory(
    model: SeqzooForCausalLM | LanguageModel, out_dir: str | os.PathLike, tokenizer: Any = None, **config_kwargs: Any
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files (an HF tokenizer,
    optional) and ``modeling_seqzoo.py`` (the ``auto_map`` target for ``trust_remote_code`` loaders) into ``out_dir``.

    ``model``: a :class:`SeqzooForCausalLM`, or a :class:`LanguageModel` wrapped with ``config_kwargs`` (token ids).
    When a tokenizer is given, its end-of-document token becomes the model's ``eos_token_id``.
    Returns the directory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if isinstance(model, LanguageModel):
        model = SeqzooForCausalLM.from_language_model(model, **config_kwargs)
    else:
        for key, value in config_kwargs.items():
            setattr(model.config, key, value)
    if tokenizer is not None and model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"export: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}")
    model.config.auto_map = {"AutoConfig": "modeling_seqzoo.SeqzooConfig", "AutoModelForCausalLM": "modeling_seqzoo.SeqzooForCausalLM"}
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = (
            model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "modeling_seqzoo.py").write_text(_REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


register_auto_classes()
