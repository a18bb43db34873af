"""seqzoo's layers and models.

Token mixers are registered by name (:func:`register_mixer`) and stacked by
:class:`LanguageModel` from a pattern of names, so a hybrid is a config, not a class.
"""

from seqzoo.models.attention import Attention
from seqzoo.models.base import TokenMixer
from seqzoo.models.cache import LayerCache, ModelCache
from seqzoo.models.language_model import Block, LanguageModel, LanguageModelConfig
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, RotaryEmbedding, ShortConvolution, SwiGLU
from seqzoo.models.registry import ConfigError, build_mixer, get_mixer_class, mixer_names, register_mixer
from seqzoo.models.titans import TitansLMM, TitansMAC, TitansMAG, TitansMAL

__all__ = [
    "Attention",
    "Block",
    "ConfigError",
    "GatedRMSNorm",
    "LanguageModel",
    "LanguageModelConfig",
    "LayerCache",
    "ModelCache",
    "RMSNorm",
    "RotaryEmbedding",
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
]
