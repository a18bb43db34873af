#!/usr/bin/env bash
# MoM measurements (issue 17). One command per measurement; run each alone on an otherwise idle machine
# (timings on a shared machine are noise). Results go under $OUT (default results/mom).
#
#   bash benchmarks/mom_measure.sh            # all four, in order
#   bash benchmarks/mom_measure.sh bench      # one of: bench padded sweep text
#
# THREADS (default 2) is the torch thread count of every command; give fewer than the free cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/mom}
THREADS=${THREADS:-2}
what=${1:-all}

if [[ $what == all || $what == bench ]]; then
  # 1. fwd+bwd tokens/s, forward and decode tokens/s, peak memory: MoM (4 memories, top-2, shared memory, the
  #    packed path) beside gated_deltanet at the same width (hidden 128, 4 heads, expand_v 2, 2 layers, no MLP;
  #    both configs' defaults), softmax attention as the bench's baseline, CPU fp32, 1K and 4K tokens.
  #    The MoM / GDN ratio is fwd_bwd_tok_s(gated_deltanet) / fwd_bwd_tok_s(mom) at each length.
  seqzoo-eval bench models --mixers gated_deltanet mom --seq-lens 1024 4096 --threads "$THREADS" \
    --options '{"mom": {"num_memories": 4, "topk": 2, "shared_memory": true, "path": "packed"}}' --out "$OUT/bench_packed"
fi

if [[ $what == all || $what == padded ]]; then
  # 2. The same MoM through its padded capacity-1.0 reference path (every memory dense over its routed tokens):
  #    compare its mom rows with those of 1. (attention is re-measured as the baseline of this run).
  seqzoo-eval bench models --mixers mom --seq-lens 1024 4096 --threads "$THREADS" \
    --options '{"mom": {"num_memories": 4, "topk": 2, "shared_memory": true, "path": "padded"}}' --out "$OUT/bench_padded"
fi

if [[ $what == all || $what == sweep ]]; then
  # 3. MQAR recall against state bytes (Zoology's plot): MoM beside gated DeltaNet, DeltaNet and attention, trained
  #    as the recorded sweep of benchmarks/RESULTS.md (mqar_zoology, vocabulary 512, segments up to 128 tokens,
  #    1000 steps, batch 64, lr 3e-3). Two widths: MoM holds 5 states per layer, so MoM at hidden 64 sits near
  #    gated_deltanet at hidden 128 in state bytes (read them off the table's state_bytes column).
  seqzoo-eval mqar-sweep --models mom gated_deltanet deltanet attention --widths 64 128 --data mqar_zoology \
    --override data.vocab_size=512 --max-seq-len 128 --steps 1000 --batch-size 64 --test-examples 500 --lr 3e-3 \
    --threads "$THREADS" --out "$OUT/mqar_sweep"
fi

if [[ $what == all || $what == text ]]; then
  # 4. A byte-level LM on the stdlib corpus (configs/model/mom.yaml, 1000 steps): the balance loss
  #    (train/balance_loss) and every layer's memory loads (train/load/layer<i>/mem<m>) are in
  #    $OUT/text/fit/metrics.csv beside train/loss; the test perplexity is in $OUT/text/results.json.
  python train.py model=mom data=text hydra.run.dir="$OUT/text" threads="$THREADS"
fi
