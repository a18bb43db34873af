"""seqzoo's layers and models.

Token mixers are registered by name (:func:`register_mixer`) and stacked by
:class:`LanguageModel` from a pattern of names, so a hybrid is a config, not a class.
"""

from seqzoo.configs import ConfigError
from seqzoo.models.attention import Attention
from seqzoo.models.base import TokenMixer
from seqzoo.models.cache import LayerCache, ModelCache
from seqzoo.models.deltanet import DeltaNet, GatedDeltaNet
from seqzoo.models.gla import GatedLinearAttention
from seqzoo.models.hgrn2 import HGRN2
from seqzoo.models.language_model import Block, LanguageModel, LanguageModelConfig
from seqzoo.models.linear_attention import LinearAttention
from seqzoo.models.mamba2 import Mamba2
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, RotaryEmbedding, ShortConvolution, SwiGLU
from seqzoo.models.mom import MixtureOfMemories
from seqzoo.models.pararnn import ParaGRUMixer, ParaLSTMMixer
from seqzoo.models.rat import RAT
from seqzoo.models.registry import build_mixer, get_mixer_class, mixer_names, register_mixer
from seqzoo.models.retnet import MultiScaleRetention
from seqzoo.models.scout import Scout
from seqzoo.models.titans import TitansLMM, TitansMAC, TitansMAG, TitansMAL

__all__ = [
    "Attention",
    "Block",
    "ConfigError",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "GatedRMSNorm",
    "HGRN2",
    "LanguageModel",
    "LanguageModelConfig",
    "LayerCache",
    "LinearAttention",
    "Mamba2",
    "MixtureOfMemories",
    "ModelCache",
    "MultiScaleRetention",
    "ParaGRUMixer",
    "ParaLSTMMixer",
    "RAT",
    "RMSNorm",
    "RotaryEmbedding",
    "Scout",
    "ShortConvolution",
    "SwiGLU",
    "TitansLMM",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "TokenMixer",
    "build_mixer",
    "get_mixer_class",
    "mixer_names",
    "register_mixer",
    "SeqzooConfig",
    "SeqzooForCausalLM",
]

# The Hugging Face wrappers import transformers (seconds): loaded on first use, which also registers them with
# AutoConfig / AutoModelForCausalLM (seqzoo.models.hf).
_HF_NAMES = ("SeqzooCache", "SeqzooConfig", "SeqzooForCausalLM")


def __getattr__(name: str):
    if name in _HF_NAMES:
        from seqzoo.models import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'seqzoo.models' has no attribute {name!r}")
