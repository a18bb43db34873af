"""fla-hub checkpoints (flash-linear-attention's HF format) as seqzoo models, on any CPU.

:func:`convert_fla` reads an fla checkpoint directory (``config.json`` + ``*.safetensors``) and writes a seqzoo HF
directory (:func:`seqzoo.models.hf.save_hf_directory`) whose model computes the same logits. fla needs a CUDA GPU
(its layers call Triton kernels); the converted model runs seqzoo's chunked PyTorch ops on a CPU, or its Triton
kernels on a GPU. A config option seqzoo does not implement is a one-line :class:`ConfigError` naming it, never a
silently different model.

Model types and how each maps (fla 0.6.0 layouts; ``L`` = layer index):

======================  =================  ===========================================================================
fla ``model_type``      seqzoo mixer       options (fla -> seqzoo)
======================  =================  ===========================================================================
``transformer``         ``attention``      ``num_heads``, ``num_kv_heads``, ``qkv_bias``, ``window_size``, ``rope_theta``
``gla``                 ``gla``            ``num_heads``, ``expand_k``, ``expand_v``, ``clamp_min``, ``use_short_conv``,
                                           ``conv_size``, ``use_output_gate``, ``norm_eps``
``delta_net``           ``deltanet``       ``num_heads``, ``head_dim = hidden·expand_k/num_heads``, ``expand_v/expand_k``,
                                           ``use_gate -> use_output_gate``, ``use_short_conv``, ``conv_size``,
                                           ``allow_neg_eigval``, ``norm_eps``
``gated_deltanet``      ``gated_deltanet`` ``num_heads``, ``head_dim``, ``expand_v``, ``use_gate -> use_output_gate``,
                                           ``use_short_conv``, ``conv_size``, ``allow_neg_eigval``, ``norm_eps``
``retnet``              ``retnet``         ``num_heads``, ``expand_k``, ``expand_v``, ``norm_eps`` (RoPE base 10000)
``hgrn2``               ``hgrn2``          ``num_heads``, ``expand_ratio``, ``use_short_conv``, ``conv_size``,
                                           ``norm_eps``; ``use_lower_bound -> num_layers``
``linear_attn``         ``linear_attention``  ``num_heads``, ``head_dim = hidden·expand_k/num_heads``,
                                           ``feature_map`` (``identity``, ``elu``), ``norm_eps``
``mamba2``              ``mamba2``         ``head_dim``, ``state_size -> d_state``, ``expand``, ``n_groups``,
                                           ``conv_kernel -> conv_size``, ``norm_eps``; no MLP
``mom``                 ``mom``            ``num_heads``, ``head_dim``, ``expand_v``, ``num_memories``, ``topk``,
                                           ``shared_mem -> shared_memory``, ``single_kv_proj``, ``use_output_gate``,
                                           ``conv_size``, ``norm_eps``; ``mom_backend`` must be ``gated_deltanet`` and
                                           ``use_short_conv`` true (fla's only choices); ``aux_loss_scale`` becomes
                                           ``balance_loss: {form: switch, weight: aux_loss_scale}`` (fla 0.6.0 adds
                                           the Switch form whatever ``use_layer_wise_balance`` says, and never reads
                                           ``capacity``: both are accepted and have no effect)
======================  =================  ===========================================================================

Keys (every type but ``mamba2``): ``model.embeddings.weight -> model.embed.weight``,
``model.layers.L.attn_norm -> model.blocks.L.mixer_norm``, ``model.layers.L.attn.* -> model.blocks.L.mixer.*``,
``model.layers.L.mlp_norm -> model.blocks.L.mlp_norm``, ``model.layers.L.mlp.{gate,up,down}_proj ->
model.blocks.L.mlp.*``, ``model.norm -> model.norm``, ``lm_head -> model.head``. ``mamba2``: ``backbone.embeddings``,
``backbone.layers.L.norm`` (the mixer norm), ``backbone.layers.L.mixer.*``, ``backbone.norm_f``. Inside a mixer the
names are fla's, except: short convolutions ``<x>_conv1d.{weight,bias} -> convs.<x>.conv.{weight,bias}`` (mamba2:
``conv1d -> convs.xBC.conv``), ``g_norm_swish_gate -> g_norm`` (gla, retnet), ``norm -> o_norm`` (linear_attn);
``mom`` keeps its conv names one level down: ``<x>_conv1d.weight -> <x>_conv1d.conv.weight``.
HGRN-2's model-level ``model.lower_bounds [layers, hidden]`` becomes each layer ``L > 0``'s
``lower_bound_logit = logit(cumsum(softmax(lower_bounds))[L] − softmax(lower_bounds)[0])``, the bound fla computes.
Hybrid checkpoints (fla's ``attn`` spec: softmax attention at ``attn.layers``) become a pattern with ``attention`` at
those layers. The SwiGLU width is read from the weights (fla derives it from ``hidden_ratio``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqzoo.configs import ConfigError

__all__ = ["CONVERTERS", "MIXER_OF", "convert_fla", "fla_to_seqzoo"]

# Keys every HF config carries, and fla keys that choose kernels, fused training paths or initialisation only
# (the function the weights compute does not depend on them).
_IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "auto_map", "_name_or_path",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
    "output_attentions", "output_hidden_states", "return_dict", "is_decoder", "is_encoder_decoder", "tie_word_embeddings",
    "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "attn_mode",
    "hidden_ratio", "intermediate_size", "num_hidden_layers", "hidden_size", "vocab_size", "norm_eps", "attn",
    "chunk_size", "residual_in_fp32", "rescale_prenorm_residual", "conv_init", "A_init_range", "dt_min", "dt_max",
    "dt_init_floor", "time_step_min", "time_step_max", "time_step_floor", "time_step_limit", "time_step_rank",
    "layer_norm_epsilon", "tie_feature_map_qk", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "add_cross_attention", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "pruned_heads",
    "attnres_block_size",  # checked on its own below
}  # fmt: skip


def _require(values: dict[str, Any], model_type: str, allowed: dict[str, Callable[[Any], bool] | Any]) -> None:
    """One-line error for each option whose value seqzoo cannot compute (``allowed``: key -> default or test)."""
    for key, rule in allowed.items():
        if key not in values:
            continue
        value = values[key]
        ok = rule(value) if callable(rule) else value == rule
        if not ok:
            raise ConfigError(f"convert-fla: {model_type} option {key}={value!r} is not supported by seqzoo")


def _number(value: Any) -> float:
    """A float from config.json, where transformers writes infinities as ``{"__float__": "Infinity"}``."""
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else float(value)


def _attention(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "transformer", {"qk_norm": False, "elementwise_affine": True, "hidden_act": lambda v: v in ("swish", "silu")})
    heads = c.get("num_heads", 32)
    return {"num_heads": heads, "num_kv_heads": c.get("num_kv_heads") or heads, "qkv_bias": bool(c.get("qkv_bias", False)),
            "window_size": c.get("window_size"), "rope_theta": float(c.get("rope_theta", 10000.0))}  # fmt: skip


def _gla(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "gla", {"feature_map": None, "use_gk": True, "use_gv": False, "elementwise_affine": True,
                        "num_kv_heads": lambda v: v in (None, c.get("num_heads", 4))})  # fmt: skip
    return {"num_heads": c.get("num_heads", 4), "expand_k": float(c.get("expand_k", 0.5)), "expand_v": float(c.get("expand_v", 1.0)),
            "clamp_min": c.get("clamp_min"), "use_short_conv": bool(c.get("use_short_conv", False)), "conv_size": c.get("conv_size", 4),
            "use_output_gate": bool(c.get("use_output_gate", True)), "norm_eps": c.get("norm_eps", 1e-6)}  # fmt: skip


def _deltanet(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "delta_net", {"use_beta": True, "use_output_norm": True, "qk_norm": "l2", "qk_activation": "silu"})
    heads, expand_k = c.get("num_heads", 16), float(c.get("expand_k", 1.0))
    key_dim = int(c["hidden_size"] * expand_k)
    if key_dim % heads:
        raise ConfigError(f"convert-fla: delta_net num_heads={heads} does not divide the key width {key_dim}")
    return {"num_heads": heads, "head_dim": key_dim // heads, "expand_v": float(c.get("expand_v", 1.0)) / expand_k,
            "use_output_gate": bool(c.get("use_gate", False)), "use_short_conv": bool(c.get("use_short_conv", True)),
            "conv_size": c.get("conv_size", 4), "allow_neg_eigval": bool(c.get("allow_neg_eigval", False)), "norm_eps": c.get("norm_eps", 1e-6)}  # fmt: skip


def _gated_deltanet(c: dict[str, Any]) -> dict[str, Any]:
    heads = c.get("num_heads", 6)
    _require(c, "gated_deltanet", {"num_v_heads": lambda v: v in (None, heads), "output_gate_activation": lambda v: v in ("swish", "silu")})
    return {"num_heads": heads, "head_dim": c.get("head_dim", 256), "expand_v": float(c.get("expand_v", 2.0)),
            "use_output_gate": bool(c.get("use_gate", True)), "use_short_conv": bool(c.get("use_short_conv", True)),
            "conv_size": c.get("conv_size", 4), "allow_neg_eigval": bool(c.get("allow_neg_eigval", False)), "norm_eps": c.get("norm_eps", 1e-6)}  # fmt: skip


def _retnet(c: dict[str, Any]) -> dict[str, Any]:
    heads = c.get("num_heads", 8)
    _require(c, "retnet", {"feature_map": None, "use_short_conv": False, "use_output_gate": True, "elementwise_affine": True,
                           "num_kv_heads": lambda v: v in (None, heads)})  # fmt: skip
    return {
        "num_heads": heads,
        "expand_k": float(c.get("expand_k", 1.0)),
        "expand_v": float(c.get("expand_v", 2.0)),
        "norm_eps": c.get("norm_eps", 1e-6),
    }


def _hgrn2(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "hgrn2", {"elementwise_affine": True})
    hidden, ratio, heads = c["hidden_size"], c.get("expand_ratio", 128), c.get("num_heads")
    if ratio is not None:
        heads = hidden // ratio
    elif heads is not None:
        ratio = hidden // heads
    else:
        raise ConfigError("convert-fla: hgrn2 needs expand_ratio or num_heads")
    return {"num_heads": heads, "expand_ratio": ratio, "num_layers": c["num_hidden_layers"] if c.get("use_lower_bound", True) else None,
            "use_short_conv": bool(c.get("use_short_conv", False)), "conv_size": c.get("conv_size", 4), "norm_eps": c.get("norm_eps", 1e-6)}  # fmt: skip


def _linear_attn(c: dict[str, Any]) -> dict[str, Any]:
    heads = c.get("num_heads", 4)
    _require(c, "linear_attn", {"feature_map": lambda v: v in ("identity", "elu"), "norm_q": False, "norm_k": False,
                                "norm_feature_map": False, "output_norm": "rmsnorm", "elementwise_affine": True,
                                "num_kv_heads": lambda v: v in (None, heads), "expand_v": lambda v: float(v) == float(c.get("expand_k", 1.0))})  # fmt: skip
    key_dim = int(c["hidden_size"] * float(c.get("expand_k", 1.0)))
    return {
        "num_heads": heads,
        "head_dim": key_dim // heads,
        "feature_map": c.get("feature_map"),
        "normalize": False,
        "norm_eps": c.get("norm_eps", 1e-6),
    }


def _mom(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "mom", {"mom_backend": "gated_deltanet", "use_short_conv": True})
    return {"num_heads": c.get("num_heads", 4), "head_dim": c.get("head_dim", 256), "expand_v": float(c.get("expand_v", 1.0)),
            "num_memories": c.get("num_memories", 4), "topk": c.get("topk", 2), "shared_memory": bool(c.get("shared_mem", True)),
            "single_kv_proj": bool(c.get("single_kv_proj", False)), "use_output_gate": bool(c.get("use_output_gate", True)),
            "conv_size": c.get("conv_size", 4), "update_rule": "gated_delta_rule", "norm_eps": c.get("norm_eps", 1e-6)}  # fmt: skip


def _mamba2(c: dict[str, Any]) -> dict[str, Any]:
    _require(c, "mamba2", {"use_bias": False, "use_conv_bias": True, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                           "hidden_act": lambda v: v in ("silu", "swish"), "dt_limit": lambda v: [_number(x) for x in v] == [0.0, math.inf],
                           "num_heads": lambda v: v is None or v * c.get("head_dim", 64) == c.get("expand", 2) * c["hidden_size"]})  # fmt: skip
    return {"head_dim": c.get("head_dim", 64), "d_state": c.get("state_size", 128), "expand": c.get("expand", 2), "n_groups": c.get("n_groups", 1),
            "conv_size": c.get("conv_kernel", 4), "norm_eps": c.get("norm_eps", 1e-5)}  # fmt: skip


#: fla ``model_type`` -> seqzoo mixer name.
MIXER_OF = {"transformer": "attention", "gla": "gla", "delta_net": "deltanet", "gated_deltanet": "gated_deltanet", "retnet": "retnet",
            "hgrn2": "hgrn2", "linear_attn": "linear_attention", "mamba2": "mamba2", "mom": "mom"}  # fmt: skip
#: fla ``model_type`` -> function of its config dict returning the seqzoo mixer's options.
CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "transformer": _attention, "gla": _gla, "delta_net": _deltanet, "gated_deltanet": _gated_deltanet, "retnet": _retnet,
    "hgrn2": _hgrn2, "linear_attn": _linear_attn, "mamba2": _mamba2, "mom": _mom,
}  # fmt: skip
# Options each type's converter reads (anything else not in _IGNORED is an unsupported option).
_READS = {
    "transformer": {"num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta", "qk_norm", "elementwise_affine", "hidden_act"},
    "gla": {"num_heads", "num_kv_heads", "expand_k", "expand_v", "clamp_min", "use_short_conv", "conv_size", "use_output_gate", "feature_map",
            "use_gk", "use_gv", "elementwise_affine", "hidden_act"},
    "delta_net": {"num_heads", "expand_k", "expand_v", "use_gate", "use_short_conv", "conv_size", "allow_neg_eigval", "use_beta",
                  "use_output_norm", "qk_norm", "qk_activation", "hidden_act"},
    "gated_deltanet": {"num_heads", "head_dim", "expand_v", "use_gate", "use_short_conv", "conv_size", "allow_neg_eigval", "num_v_heads",
                       "output_gate_activation", "hidden_act"},
    "retnet": {"num_heads", "num_kv_heads", "expand_k", "expand_v", "feature_map", "use_short_conv", "conv_size", "use_output_gate",
               "elementwise_affine", "hidden_act"},
    "hgrn2": {"num_heads", "expand_ratio", "use_lower_bound", "use_short_conv", "conv_size", "elementwise_affine", "hidden_act"},
    "linear_attn": {"num_heads", "num_kv_heads", "expand_k", "expand_v", "feature_map", "norm_q", "norm_k", "norm_feature_map",
                    "output_norm", "elementwise_affine", "hidden_act"},
    "mamba2": {"head_dim", "state_size", "expand", "n_groups", "conv_kernel", "use_bias", "use_conv_bias", "D_has_hdim", "rmsnorm",
               "norm_before_gate", "hidden_act", "dt_limit", "num_heads"},
    "mom": {"num_heads", "head_dim", "expand_v", "num_memories", "topk", "shared_mem", "single_kv_proj", "use_output_gate",
            "use_short_conv", "conv_size", "mom_backend", "capacity", "use_layer_wise_balance", "aux_loss_scale", "hidden_act"},
}  # fmt: skip
# Mixer-internal renames (fla -> seqzoo), applied to the part of a key after the mixer prefix.
_MIXER_RENAMES = [
    (re.compile(r"^(\w+)_conv1d\.(weight|bias)$"), r"convs.\1.conv.\2"),
    (re.compile(r"^conv1d\.(weight|bias)$"), r"convs.xBC.conv.\1"),
    (re.compile(r"^g_norm_swish_gate\.weight$"), "g_norm.weight"),
]
_LINEAR_ATTN_RENAMES = [(re.compile(r"^norm\.weight$"), "o_norm.weight")]
_MOM_RENAMES = [(re.compile(r"^(q|k|v)_conv1d\.(weight|bias)$"), r"\1_conv1d.conv.\2")]


def fla_to_seqzoo(config: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An fla model's ``config.json`` dict and state dict -> (:class:`LanguageModelConfig` dict, seqzoo state dict with
    :class:`LanguageModel` names). One-line :class:`ConfigError` for an unsupported type or option."""
    model_type = config.get("model_type")
    if model_type not in CONVERTERS:
        raise ConfigError(f"convert-fla: model_type {model_type!r} is not supported; supported: {', '.join(sorted(CONVERTERS))}")
    unknown = sorted(set(config) - _IGNORED - _READS[model_type])
    if unknown:
        raise ConfigError(f"convert-fla: {model_type} option {unknown[0]}={config[unknown[0]]!r} is not supported by seqzoo")
    if config.get("attnres_block_size") is not None:
        raise ConfigError(
            f"convert-fla: {model_type} option attnres_block_size={config['attnres_block_size']!r} is not supported by seqzoo"
        )
    _require(config, model_type, {"hidden_act": lambda v: v in ("swish", "silu")})
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    mixer = MIXER_OF[model_type]
    pattern = [mixer] * num_layers
    mixers = {mixer: CONVERTERS[model_type](config)}
    attn = config.get("attn")
    if attn:  # a hybrid: softmax attention at the layers the spec names
        _require(attn, "attn", {"qk_norm": False})
        extra = sorted(set(attn) - {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta", "qk_norm"})
        if extra:
            raise ConfigError(f"convert-fla: {model_type} option attn.{extra[0]}={attn[extra[0]]!r} is not supported by seqzoo")
        for layer in attn["layers"]:
            pattern[layer] = "attention"
        mixers["attention"] = _attention({**attn, "num_heads": attn["num_heads"]})
    if model_type == "mamba2":
        prefix, mixer_part, norm_part, final = "backbone", "mixer", "norm", "backbone.norm_f.weight"
    else:
        prefix, mixer_part, norm_part, final = "model", "attn", "attn_norm", "model.norm.weight"
    out: dict[str, torch.Tensor] = {}
    renames = {"linear_attn": _MIXER_RENAMES + _LINEAR_ATTN_RENAMES, "mom": _MOM_RENAMES}.get(model_type, _MIXER_RENAMES)
    layer_key = re.compile(rf"^{prefix}\.layers\.(\d+)\.(.+)$")
    for key, value in state.items():
        if key == f"{prefix}.embeddings.weight":
            out["embed.weight"] = value
        elif key == final:
            out["norm.weight"] = value
        elif key == "lm_head.weight":
            out["head.weight"] = value
        elif key == "model.lower_bounds" and model_type == "hgrn2":
            bounds = value.double().softmax(0)
            bounds = bounds.cumsum(0) - bounds[0]
            for layer in range(1, num_layers):
                if pattern[layer] == "hgrn2":
                    out[f"blocks.{layer}.mixer.lower_bound_logit"] = torch.logit(bounds[layer]).to(value.dtype)
        elif match := layer_key.match(key):
            layer, rest = match.groups()
            if rest.startswith(f"{norm_part}."):
                out[f"blocks.{layer}.mixer_norm.{rest[len(norm_part) + 1 :]}"] = value
            elif rest.startswith(f"{mixer_part}."):
                name = rest[len(mixer_part) + 1 :]
                if pattern[int(layer)] != "attention":
                    for rule, target in renames:
                        name = rule.sub(target, name)
                out[f"blocks.{layer}.mixer.{name}"] = value
            elif rest.startswith(("mlp_norm.", "mlp.")):
                out[f"blocks.{layer}.{rest}"] = value
            else:
                raise ConfigError(f"convert-fla: unexpected weight {key} in a {model_type} checkpoint")
        else:
            raise ConfigError(f"convert-fla: unexpected weight {key} in a {model_type} checkpoint")
    has_mlp = any(k.endswith("mlp.gate_proj.weight") for k in out)
    tied = bool(config.get("tie_word_embeddings", False)) or "head.weight" not in out
    lm_config = {
        "vocab_size": config["vocab_size"],
        "hidden_size": hidden,
        "num_layers": num_layers,
        "pattern": pattern,
        "mixers": mixers,
        "mlp": "swiglu" if has_mlp else None,
        "intermediate_size": out["blocks.0.mlp.gate_proj.weight"].shape[0] if has_mlp else None,
        "tie_embeddings": tied,
        "norm_eps": config.get("norm_eps", 1e-5 if model_type == "mamba2" else 1e-6),
        "init_std": config.get("initializer_range", 0.02),
    }
    if model_type == "mom":
        lm_config["balance_loss"] = {"form": "switch", "weight": float(config.get("aux_loss_scale", 0.01))}
    if tied:
        out.pop("head.weight", None)
    return lm_config, out


def read_fla_directory(source: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of an fla checkpoint directory (``config.json`` and one or more ``*.safetensors``)."""
    from safetensors.torch import load_file

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"convert-fla: {source} holds no config.json (an fla checkpoint directory has config.json and *.safetensors)"
        )
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"convert-fla: {source} holds no *.safetensors weights")
    config = json.loads((source / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return config, state


def convert_fla(source: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = "auto") -> Path:
    """Convert the fla checkpoint directory ``source`` into a seqzoo HF directory ``out_dir`` (see the module docstring
    for the mapping); the tokenizer files of ``source`` are carried over when ``tokenizer="auto"`` finds them.

    Returns ``out_dir``. The converted model loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` after
    ``import seqzoo.models.hf``.
    """
    from seqzoo.models.hf import SeqzooForCausalLM, save_hf_directory
    from seqzoo.models.language_model import LanguageModel

    config, state = read_fla_directory(source)
    lm_config, weights = fla_to_seqzoo(config, state)
    model = LanguageModel(lm_config)
    expected = set(model.state_dict())
    if model.config.tie_embeddings:
        expected.discard("head.weight")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(f"convert-fla: the {config['model_type']} weights do not fit the seqzoo model ({what})")
    for key, value in weights.items():
        target = model.state_dict()[key]
        if target.shape != value.shape:
            raise ConfigError(f"convert-fla: {key} has shape {tuple(value.shape)} in the checkpoint, seqzoo expects {tuple(target.shape)}")
    model.load_state_dict(weights, strict=False)
    dtype = next(iter(state.values())).dtype
    if tokenizer == "auto":
        tokenizer = None
        if (Path(source) / "tokenizer.json").is_file() or (Path(source) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
    token_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    wrapped = SeqzooForCausalLM.from_language_model(model.to(dtype), **token_ids)
    out = save_hf_directory(wrapped, out_dir, tokenizer=tokenizer)
    print(
        f"convert-fla: {config['model_type']} ({lm_config['num_layers']} layers, {', '.join(sorted(set(lm_config['pattern'])))}) -> {out}"
    )
    return out
