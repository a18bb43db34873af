#!/usr/bin/env bash
# Measurements of issue 19, to run alone on a quiet machine (other jobs make CPU timings noisy).
# Each command was checked on small settings; the figures land in benchmarks/hf/<name>/ as JSON, markdown and PNG.
#   bash benchmarks/hf_measure.sh            # both measurements
#   bash benchmarks/hf_measure.sh loss       # or one of them: loss | generate | fla
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out=benchmarks/hf

if [[ "$what" == all || "$what" == loss ]]; then
  # Chunked against plain cross-entropy through the head, forward + backward: tokens/s and peak memory side by side,
  # vocabulary 32K and 128K, hidden 512, 8K tokens per batch, on the CPU. The plain loss holds [8192, vocab] fp32
  # logits and their gradient (2 x 4 GiB at 128K); the chunked one a 64 MiB chunk at a time. Peak memory is replayed
  # from the profiler's allocator events (seqzoo.eval.measure.peak_memory). Two threads; expect minutes at 128K.
  seqzoo-eval bench loss --vocabs 32768 131072 --hidden 512 --tokens 8192 --repeats 3 --threads 2 --out "$out/loss"
fi

if [[ "$what" == all || "$what" == generate ]]; then
  # HF generate (SeqzooForCausalLM, greedy) against LanguageModel.generate on the same weights: 1K-token prompt,
  # 64 new tokens, prefill included in both, attention and Gated DeltaNet (hidden 128, 2 layers). The wrapper
  # should cost little: hf_over_seqzoo near 1. The outputs are checked equal (same_tokens).
  seqzoo-eval bench generate --mixers attention gated_deltanet --seq-lens 1024 --decode-tokens 64 --hidden 128 --layers 2 \
    --repeats 3 --threads 2 --out "$out/generate"
fi

if [[ "$what" == fla ]]; then
  # convert-fla against fla 0.6.0 itself (its kernels in the Triton interpreter on the CPU, tiny shapes, a few minutes):
  # needs `pip install flash-linear-attention==0.6.0` (in the test extra). One line per model type.
  python benchmarks/fla_check.py
fi
