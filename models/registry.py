"""The token-mixer registry: every mixer is registered once by name and built from its config.

A config names a mixer (``attention``, ``gated_deltanet``, …) and gives its options; :func:`build_mixer`
checks the options against the mixer's constructor so that a typo fails with one line naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from seqzoo.configs import ConfigError

MixerT = TypeVar("MixerT", bound=type[nn.Module])

_MIXERS: dict[str, type[nn.Module]] = {}


def register_mixer(name: str) -> Callable[[MixerT], MixerT]:
    """Class decorator: register a token mixer under ``name``.

    The class must accept ``hidden_size`` and ``layer_idx`` keywords and implement
    ``forward(x [batch, seq, hidden], cache=None) -> [batch, seq, hidden]``, ``init_cache(batch)``
    and ``state_size(batch=1, seq_len=None)``.
    """

    def decorator(cls: MixerT) -> MixerT:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ConfigError(f"mixer name {name!r} is already registered by {_MIXERS[name].__qualname__}")
        _MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return decorator


def mixer_names() -> list[str]:
    """Sorted names of all registered mixers."""
    _import_builtin_mixers()
    return sorted(_MIXERS)


def get_mixer_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; an unknown name lists the known ones."""
    _import_builtin_mixers()
    if name not in _MIXERS:
        raise ConfigError(f"unknown mixer {name!r}; known mixers: {', '.join(sorted(_MIXERS))}")
    return _MIXERS[name]


def build_mixer(name: str, hidden_size: int, layer_idx: int, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate mixer ``name`` with ``options``; unknown options fail with one line."""
    cls = get_mixer_class(name)
    options = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [p for p in params if p not in ("self", "hidden_size", "layer_idx")]
    unknown = sorted(set(options) - set(known))
    if unknown and not accepts_any:
        raise ConfigError(f"mixer {name!r} got unknown option(s) {', '.join(unknown)}; it takes: {', '.join(known)}")
    return cls(hidden_size=hidden_size, layer_idx=layer_idx, **options)


def _import_builtin_mixers() -> None:
    # Importing the package registers every built-in mixer; done lazily so the registry module has no cycle.
    import seqzoo.models  # noqa: F401
