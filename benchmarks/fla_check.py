"""One-off check of ``seqzoo-eval convert-fla`` against flash-linear-attention itself, on the CPU.

fla's layers call Triton kernels; on a machine without a GPU they run in Triton's interpreter
(``TRITON_INTERPRET=1``, set here) on tiny shapes. Triton's autotuner needs a GPU driver to time its configs, so
it is told to take the first config. For each model type: build a tiny fla model (random weights, the type's
default options plus those below), save it as fla-hub does (``save_pretrained``: config.json + safetensors), convert
it, and compare the two models' logits on random tokens. fla's ``transformer`` needs flash-attn (CUDA only) and is
skipped here, as are hybrids with attention layers; ``tests/test_fla_convert.py`` checks those against transformers' Llama instead.

    pip install --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0
    python benchmarks/fla_check.py            # prints one line per type: max |Δlogit| and relative error
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]  # first config, no GPU timing

import fla.models as fm  # noqa: E402

from seqzoo.models.fla import convert_fla  # noqa: E402
from seqzoo.models.hf import SeqzooForCausalLM  # noqa: E402

H, V = 64, 96
CASES = {
    "gla": ("GLAConfig", "GLAForCausalLM", {"num_heads": 2}),
    "gla_conv": ("GLAConfig", "GLAForCausalLM", {"num_heads": 2, "use_short_conv": True, "clamp_min": -3.0}),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", {"num_heads": 2, "head_dim": 32}),
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM", {"num_heads": 4}),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", {"num_heads": 2}),
    "hgrn2": ("HGRN2Config", "HGRN2ForCausalLM", {"expand_ratio": 16}),
    "linear_attn": ("LinearAttentionConfig", "LinearAttentionForCausalLM", {"num_heads": 2, "feature_map": "elu"}),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", {"head_dim": 16, "state_size": 16, "expand": 2, "n_groups": 1}),
}


def main(names: list[str]) -> int:
    failures = 0
    for name in names or list(CASES):
        config_cls, model_cls, options = CASES[name]
        torch.manual_seed(0)
        config = getattr(fm, config_cls)(hidden_size=H, num_hidden_layers=2, vocab_size=V, fuse_norm=False, fuse_swiglu=False,
                                         fuse_cross_entropy=False, **options)  # fmt: skip
        model = getattr(fm, model_cls)(config).eval()
        with torch.no_grad():  # random, not the init's zeros and ones: every weight must land in the right place
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))
        ids = torch.randint(0, V, (2, 40))
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(f"{folder}/fla", safe_serialization=True)
            convert_fla(f"{folder}/fla", f"{folder}/seqzoo")
            ours = SeqzooForCausalLM.from_pretrained(f"{folder}/seqzoo").eval()
            with torch.no_grad():
                reference, converted = model(ids).logits.double(), ours(ids).logits.double()
        diff = (converted - reference).abs().max().item()
        rel = ((converted - reference).norm() / reference.norm()).item()
        ok = rel < 1e-5  # fp32 rounding of two summation orders is ~1e-6
        failures += not ok
        print(f"{name:16s} max|Δlogit| {diff:.3e}  rel {rel:.3e}  {'ok' if ok else 'MISMATCH'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
