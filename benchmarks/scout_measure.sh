#!/usr/bin/env bash
# SCOUT / RAT measurements (issue 18), one step per question. Run from the repository root, with nothing else on the
# machine (timings on a shared CPU are not evidence; a step that measures time says so below):
#
#   bash benchmarks/scout_measure.sh bench sweep mqar_long passkey niah nope decode
#
# Everything lands under $OUT (default results/scout); every step also prints its table. Steps:
#
#   bench      checkpoint_attention vs SDPA causal attention: fwd and fwd+bwd time, peak memory, ratios, at
#              T = 4K, 8K, 16K, 32K and L = 10, 64 (batch 1, 4 heads of 64, fp32; the torch backend on the CPU,
#              triton and torch on CUDA). The expected ratio is about 1/L for large T. On 2 CPU cores SDPA alone
#              takes tens of seconds per fwd+bwd at 32K: allow ~30 min for the step; --repeats 1 keeps it there.
#   sweep      MQAR recall vs state size (Zoology mixture, test lengths up to 128) for attention, sliding-window
#              attention alone (swa, window 32), SCOUT-SWA (the same window 32 plus checkpoint attention), SCOUT-Mamba,
#              RAT, Gated DeltaNet and Titans MAC, all trained the same way (2 layers, width 64, 1000 steps, lr 3e-3,
#              batch 64). The vocabulary is 1024 (not the 512 of earlier sweeps) so that the 4x probe below fits.
#              About 40-60 min on 2 quiet cores (Titans MAC is the slowest).
#   mqar_long  the sweep's checkpoints on test-only MQAR at 1x, 2x and 4x the longest training length
#              (128:32, 256:64, 512:128): what the checkpoints add over the sliding window alone beyond training.
#   passkey    S-NIAH passkey training for the same models, as the earlier probes (benchmarks/RESULTS.md): sequence
#              length 128, 800 steps, width 64, 2 layers. About 5-15 min per model.
#   niah       the passkey checkpoints probed at 1x, 2x, 4x and 8x the training length (prompts 124 / 252 / 508 /
#              1020 tokens), 5 depths x 20 samples, greedy decoding through the cache.
#   nope       scout_swa without RoPE in its checkpoint attention (rope_theta=null; the window keeps its own), trained
#              as in passkey with seeds 0 and 1 and probed as in niah: with RoPE the checkpoints sit at absolute
#              positions and nothing is retrieved beyond the training length; without, the key comes back at 2-8x.
#   decode     per-token decode latency and cache bytes against context for the passkey checkpoints (the SCOUT and
#              RAT caches grow as T/L, attention's as T, the recurrent ones stay flat). Latency is a timing: quiet
#              machine only.
#
# Sizes come from the variables below (defaults: the full runs). A smoke run of every command on tiny settings:
#   OUT=/tmp/scout_smoke SEQ_LENS="256 512" SWEEP_STEPS=5 SWEEP_SCALE=0.002 TEST_EXAMPLES=16 BATCH=16 LONG_EXAMPLES=4 \
#   PASSKEY_STEPS=3 PASSKEY_TRAIN=64 SAMPLES=1 CONTEXTS="256 512" bash benchmarks/scout_measure.sh bench sweep mqar_long passkey niah nope decode
#
# The question for sweep / mqar_long / passkey / niah: compare scout_swa with swa (same window, same training) at 2x
# and 4x the training length; scout_mamba, rat, gated_deltanet, titans_mac and attention are the context.
set -uo pipefail
export MPLBACKEND=Agg PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
OUT=${OUT:-results/scout}
MODELS=${MODELS:-"attention swa scout_swa scout_mamba rat gated_deltanet titans_mac"}
SEQ_LENS=${SEQ_LENS:-"4096 8192 16384 32768"}
SWEEP_STEPS=${SWEEP_STEPS:-1000}
SWEEP_SCALE=${SWEEP_SCALE:-0.1}       # the sweep's default share of the Zoology mixture's examples
TEST_EXAMPLES=${TEST_EXAMPLES:-500}
BATCH=${BATCH:-64}
LONG_EXAMPLES=${LONG_EXAMPLES:-500}
PASSKEY_STEPS=${PASSKEY_STEPS:-800}
PASSKEY_TRAIN=${PASSKEY_TRAIN:-20000}  # the niah_passkey config's own
SAMPLES=${SAMPLES:-20}
CONTEXTS=${CONTEXTS:-"1024 4096 16384 32768"}
mkdir -p "$OUT"
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  case $step in
    bench)
      # shellcheck disable=SC2086  # word lists
      seqzoo-eval bench checkpoint_attention --seq-lens $SEQ_LENS --segment-lens 10 64 \
        --batch 1 --heads 4 --head-dim 64 --repeats 1 --out "$OUT/bench" ;;
    sweep)
      # shellcheck disable=SC2086  # MODELS is a word list
      seqzoo-eval mqar-sweep --models $MODELS --data mqar_zoology --override data.vocab_size=1024 \
        --max-seq-len 128 --steps "$SWEEP_STEPS" --train-examples-scale "$SWEEP_SCALE" --batch-size "$BATCH" \
        --test-examples "$TEST_EXAMPLES" --lr 3e-3 --out "$OUT/mqar-sweep" ;;
    mqar_long)
      for m in $MODELS; do
        seqzoo-eval probe mqar "$OUT/mqar-sweep/runs/$m/checkpoints/last.ckpt" --segments 128:32 256:64 512:128 \
          --num-examples "$LONG_EXAMPLES" --out "$OUT/mqar-long/$m"
      done ;;
    passkey)
      for m in $MODELS; do
        python train.py data=niah_passkey data.seq_len=128 data.num_train="$PASSKEY_TRAIN" model="$m" \
          trainer.max_steps="$PASSKEY_STEPS" trainer.enable_progress_bar=false hydra.run.dir="$OUT/passkey/$m"
      done ;;
    niah)
      for m in $MODELS; do
        seqzoo-eval probe niah "$OUT/passkey/$m/checkpoints/last.ckpt" --samples "$SAMPLES" --out "$OUT/niah/$m"
      done ;;
    nope)
      for seed in 0 1; do
        run="$OUT/passkey/scout_swa_nope_seed$seed"
        python train.py data=niah_passkey data.seq_len=128 data.num_train="$PASSKEY_TRAIN" model=scout_swa \
          model.mixers.scout.rope_theta=null seed=$seed trainer.max_steps="$PASSKEY_STEPS" trainer.enable_progress_bar=false \
          hydra.run.dir="$run"
        seqzoo-eval probe niah "$run/checkpoints/last.ckpt" --samples "$SAMPLES" --out "$OUT/niah/scout_swa_nope_seed$seed"
      done ;;
    decode)
      ckpts=()
      for m in $MODELS; do ckpts+=("$OUT/passkey/$m/checkpoints/last.ckpt"); done
      # shellcheck disable=SC2086  # word list
      seqzoo-eval probe decode --checkpoints "${ckpts[@]}" --contexts $CONTEXTS --decode-tokens 32 \
        --out "$OUT/decode" ;;
    *) echo "unknown step $step (bench, sweep, mqar_long, passkey, niah, nope, decode)"; exit 2 ;;
  esac
done
