"""``seqzoo-eval``: one command line for perplexity, MQAR accuracy and benchmarks.

    seqzoo-eval ppl outputs/run/checkpoints/last.ckpt
    seqzoo-eval mqar outputs/run/checkpoints/last.ckpt --segments 64:4 256:16
    seqzoo-eval bench models --mixers attention --seq-lens 1024 4096
    seqzoo-eval bench ops --seq-lens 256 1024
    seqzoo-eval bench titans --dims 64 128 256 --chunks 16 64
    seqzoo-eval bench checkpoint_attention --seq-lens 4096 8192 --segment-lens 10 64

Every command prints a markdown table and writes JSON, markdown and (where a curve fits) PNG
into ``--out`` (default ``results/<command>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")


def _segment(text: str) -> tuple[int, int]:
    try:
        seq_len, kv = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"segment must look like SEQ_LEN:NUM_KV_PAIRS, got {text!r}") from None
    return seq_len, kv


def _default(value, default):
    """``value``, or ``default`` when the flag was not given (its default differs per bench kind)."""
    return default if value is None else value


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``seqzoo-eval`` (subcommands ppl, mqar, bench)."""
    parser = argparse.ArgumentParser(prog="seqzoo-eval", description="Evaluate and benchmark seqzoo models.")
    sub = parser.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity and bits per byte of a checkpoint on text")
    ppl.add_argument("checkpoint")
    ppl.add_argument("--source", choices=["stdlib", "files", "hub"], help="text source (default: the checkpoint's, else stdlib)")
    ppl.add_argument("--path", nargs="+", help="files for --source files")
    ppl.add_argument("--name", help="data set name for --source hub (read from the local cache)")
    ppl.add_argument("--block-size", type=int)
    ppl.add_argument("--max-documents", type=int)
    ppl.add_argument("--split", default="test", choices=["train", "val", "test"])
    ppl.add_argument(
        "--max-batches",
        type=int,
        help="evaluation batches, spread evenly over the split (default: the run's data.eval_batches, as its test; 0: the whole split)",
    )

    mqar = sub.add_parser("mqar", help="MQAR accuracy of a checkpoint per (seq_len, num_kv_pairs) segment")
    mqar.add_argument("checkpoint")
    mqar.add_argument("--segments", nargs="+", type=_segment, help="SEQ_LEN:NUM_KV_PAIRS (default: the run's test segments)")
    mqar.add_argument("--num-examples", type=int, default=1000)
    mqar.add_argument("--batch-size", type=int, default=250)
    mqar.add_argument("--seed", type=int, help="data seed (default: the run's test seed)")

    bench = sub.add_parser("bench", help="throughput and memory, side by side with the baseline")
    bench.add_argument(
        "kind",
        nargs="?",
        default="models",
        choices=["models", "layers", "ops", "titans", "pararnn", "varlen", "loss", "generate", "checkpoint_attention"],
        help="titans: titans_lmm vs titans-pytorch's NeuralMemory; pararnn: Newton solve vs the sequential loop; "
        "checkpoint_attention: the op vs SDPA causal attention",
    )
    bench.add_argument("--mixers", nargs="+", default=["attention"], help="mixer names (models/layers)")
    bench.add_argument("--ops", nargs="+", help="op names (ops; default all)")
    bench.add_argument(
        "--seq-lens",
        nargs="+",
        type=int,
        help="default: 1024 4096 (pararnn: 256 1024 4096 16384; checkpoint_attention: 4096 8192 16384 32768)",
    )
    bench.add_argument("--batch", type=int, help="default: 1 (pararnn: 4)")
    bench.add_argument("--hidden", type=int, help="default: 128 (pararnn: 256)")
    bench.add_argument("--layers", type=int, default=2)
    bench.add_argument("--vocab", type=int, default=256)
    bench.add_argument(
        "--heads", type=int, help="ops: heads (default 4); titans: memory heads (default 2); pararnn: projection heads (default 2)"
    )
    bench.add_argument("--head-dim", type=int, default=64, help="ops: key/value dim")
    bench.add_argument("--decode-tokens", type=int, default=16, help="models: decode steps; generate: new tokens (default 16)")
    bench.add_argument("--vocabs", nargs="+", type=int, default=[32768, 131072], help="loss: vocabulary sizes")
    bench.add_argument("--tokens", type=int, default=8192, help="loss: tokens per batch")
    bench.add_argument("--options", type=_json_dict, default={}, help='mixer options as JSON: {"attention": {"num_heads": 4}}')
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument(
        "--compile",
        action="store_true",
        help="models/layers: also time torch.compile(fullgraph=True) fwd+bwd and count graph breaks (compiles once per mixer and length)",
    )
    bench.add_argument("--skip-reference-above", type=int, default=4096, help="ops: skip the token-loop reference beyond this length")
    bench.add_argument("--segment-lens", nargs="+", type=int, default=[10, 64], help="checkpoint_attention: segment lengths L")
    bench.add_argument(
        "--backends", nargs="+", help="checkpoint_attention: the op's backends to time (default: triton and torch on CUDA, torch on CPU)"
    )
    bench.add_argument("--dims", nargs="+", type=int, default=[64, 128, 256], help="titans: model widths")
    bench.add_argument("--chunks", nargs="+", type=int, default=[16, 64], help="titans: memory chunk sizes")
    bench.add_argument("--memory", nargs="+", default=["linear"], choices=["linear", "mlp"], help="titans: memory networks")
    bench.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"], help="pararnn: cells")
    bench.add_argument("--max-iters", type=int, default=3, help="pararnn: Newton iterations")
    bench.add_argument("--skip-sequential-above", type=int, help="pararnn: skip the sequential loop beyond this length")
    bench.add_argument(
        "--modes",
        nargs="+",
        default=["parallel", "sequential", "fused"],
        choices=["parallel", "sequential", "fused"],
        help="pararnn: modes to time (parallel always runs; fused runs Triton on CUDA and the compiled C++ kernel on CPU, and is skipped with the reason in the report where neither runs)",
    )
    bench.add_argument(
        "--no-projection",
        action="store_true",
        help="pararnn: time the recurrence alone on precomputed cell inputs (default: the whole cell, input projection included)",
    )
    bench.add_argument(
        "--retrieval",
        default="token",
        choices=["token", "chunk"],
        help="titans: our reads, per token (the paper) or per chunk (as the peer)",
    )
    bench.add_argument(
        "--peer-batch-size",
        nargs="+",
        default=["chunk", "none"],
        choices=["chunk", "none"],
        help="titans: NeuralMemory batch_size (chunk: gradients at chunk-start weights like ours; none: its default)",
    )

    sweep = sub.add_parser(
        "mqar-sweep", help="train models on MQAR and plot accuracy against state bytes (Zoology's recall-memory trade-off)"
    )
    sweep.add_argument("--models", nargs="+", required=True, help="model config names under configs/model/")
    sweep.add_argument("--widths", nargs="+", type=int, help="hidden sizes to sweep (default: each config's)")
    sweep.add_argument("--data", default="mqar_zoology", help="MQAR data config under configs/data/ (default: mqar_zoology)")
    sweep.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    sweep.add_argument("--train-examples-scale", type=float, default=0.1, help="multiplies every training segment's example count")
    sweep.add_argument("--max-seq-len", type=int, default=256, help="drop segments longer than this")
    sweep.add_argument("--test-examples", type=int, help="examples per test segment (default: the config's)")
    sweep.add_argument("--batch-size", type=int, help="training batch size (default: the config's)")
    sweep.add_argument(
        "--lr",
        nargs="+",
        type=float,
        help="learning rate(s); with several, each model keeps its best run, as Zoology's max over learning rates (default: the config's)",
    )
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--override", nargs="+", default=[], help="extra Hydra overrides for every run, e.g. model.num_layers=2")
    sweep.add_argument("--out", help="output folder (default: results/mqar-sweep)")
    sweep.add_argument("--device", default="cuda" if _cuda() else "cpu")

    export = sub.add_parser("export", help="a training checkpoint as a Hugging Face directory (config, safetensors, tokenizer)")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")

    lm_eval = sub.add_parser("lm-eval", help="lm-evaluation-harness (its hf model) on an exported directory")
    lm_eval.add_argument("model_dir", help="an HF directory from `seqzoo-eval export` or `convert-fla`")
    lm_eval.add_argument(
        "--tasks", nargs="+", default=["seqzoo_text", "seqzoo_choice"], help="lm-eval task names (default: the local tasks)"
    )
    lm_eval.add_argument("--include-path", nargs="+", default=[], help="more lm-eval task folders")
    lm_eval.add_argument("--limit", type=int, help="examples per task (default: all)")
    lm_eval.add_argument("--batch-size", type=int, default=1)
    lm_eval.add_argument("--num-fewshot", type=int)

    convert = sub.add_parser("convert-fla", help="an fla-hub checkpoint (config.json + safetensors) as a seqzoo HF directory")
    convert.add_argument("source", help="the fla checkpoint directory")
    convert.add_argument("out_dir")

    probe = sub.add_parser("probe", help="long-context probes: needle in a haystack, long MQAR, length extrapolation, decode cost")
    probes = probe.add_subparsers(dest="probe", required=True)
    niah = probes.add_parser("niah", help="S-NIAH (passkey, number, word) accuracy over depth x length, greedy decoding")
    niah.add_argument("checkpoint")
    niah.add_argument("--kinds", nargs="+", choices=["passkey", "number", "word"], help="default: the run's needle kind, else all")
    niah.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens (default: 1-8x the training length)")
    niah.add_argument("--depths", nargs="+", type=float, help="needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    niah.add_argument("--samples", type=int, default=20, help="examples per cell")
    niah.add_argument("--haystack", choices=["filler", "stdlib"])
    niah.add_argument("--digits", type=int, help="digits of pass keys / magic numbers")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--batch-size", type=int, default=8)
    long_mqar = probes.add_parser("mqar", help="MQAR accuracy on test-only long segments")
    long_mqar.add_argument("checkpoint")
    long_mqar.add_argument(
        "--segments", nargs="+", type=_segment, help="SEQ_LEN:NUM_KV_PAIRS (default 512:128 1024:256 2048:512 4096:1024)"
    )
    long_mqar.add_argument("--num-examples", type=int, default=100)
    long_mqar.add_argument("--batch-size", type=int, default=8)
    long_mqar.add_argument("--seed", type=int, default=0)
    length = probes.add_parser("length", help="per-position loss up to N x the training length and recurrent state norms")
    length.add_argument("checkpoint")
    length.add_argument("--train-length", type=int, help="default: the run's block size / sequence length")
    length.add_argument("--factor", type=int, default=8)
    length.add_argument("--num-sequences", type=int, default=4)
    length.add_argument("--piece", type=int, help="prefill piece in tokens (state-norm resolution)")
    length.add_argument("--split", default="test", choices=["train", "val", "test"])
    length.add_argument("--max-documents", type=int)
    length.add_argument("--batch-size", type=int, default=4)
    decode = probes.add_parser("decode", help="per-token decode latency and cache bytes against prompt length")
    decode.add_argument("--checkpoints", nargs="+", default=[])
    decode.add_argument("--mixers", nargs="+", default=[], help="registered mixers, fresh models")
    decode.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    decode.add_argument("--decode-tokens", type=int, default=16)
    decode.add_argument("--hidden", type=int, default=128)
    decode.add_argument("--layers", type=int, default=2)
    decode.add_argument("--vocab", type=int, default=256)
    decode.add_argument("--options", type=_json_dict, default={}, help="mixer options as JSON")
    decode.add_argument("--prefill-chunk", type=int, default=2048)
    decode.add_argument("--batch", type=int, default=1)
    decode.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    for p in (ppl, mqar, bench, niah, long_mqar, length, decode, lm_eval):
        p.add_argument("--out", help="output folder (default: results/<command>)")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    for p in (ppl, mqar, bench, sweep, niah, long_mqar, length, decode, export, lm_eval, convert):
        p.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's, one per core; fewer on a busy machine)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``seqzoo-eval``; errors in the inputs print one line and return 1."""
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None) or os.path.join("results", args.command)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from seqzoo.configs import ConfigError

    try:
        if args.command == "ppl":
            from seqzoo.eval.quality import perplexity

            overrides = {
                k: v
                for k, v in {
                    "source": args.source,
                    "path": args.path,
                    "name": args.name,
                    "block_size": args.block_size,
                    "max_documents": args.max_documents,
                }.items()
                if v is not None
            }
            perplexity(args.checkpoint, out, overrides, split=args.split, max_batches=args.max_batches, device=args.device)
        elif args.command == "export":
            from seqzoo.eval.hf_tools import export_checkpoint

            export_checkpoint(args.checkpoint, args.out_dir)
        elif args.command == "lm-eval":
            from seqzoo.eval.hf_tools import lm_eval_report

            lm_eval_report(args.model_dir, out, args.tasks, args.include_path, args.limit, args.batch_size, args.device, args.num_fewshot)
        elif args.command == "convert-fla":
            from seqzoo.models.fla import convert_fla

            convert_fla(args.source, args.out_dir)
        elif args.command == "mqar":
            from seqzoo.eval.quality import mqar_accuracy

            mqar_accuracy(args.checkpoint, out, args.segments, args.num_examples, args.batch_size, args.seed, device=args.device)
        elif args.command == "mqar-sweep":
            from seqzoo.eval.sweep import mqar_sweep

            mqar_sweep(
                args.models,
                out,
                widths=args.widths,
                data=args.data,
                steps=args.steps,
                train_examples_scale=args.train_examples_scale,
                max_seq_len=args.max_seq_len,
                test_examples=args.test_examples,
                batch_size=args.batch_size,
                lrs=args.lr,
                overrides=args.override,
                device=args.device,
                seed=args.seed,
            )
        elif args.command == "probe":
            from seqzoo.eval import probes as pr

            if args.probe == "niah":
                pr.niah_probe(
                    args.checkpoint,
                    out,
                    args.kinds,
                    args.lengths,
                    args.depths,
                    args.samples,
                    args.seed,
                    args.haystack,
                    args.digits,
                    args.batch_size,
                    args.device,
                )
            elif args.probe == "mqar":
                pr.mqar_long_probe(args.checkpoint, out, args.segments, args.num_examples, args.batch_size, args.seed, args.device)
            elif args.probe == "length":
                pr.length_probe(
                    args.checkpoint,
                    out,
                    args.train_length,
                    args.factor,
                    args.num_sequences,
                    args.piece,
                    args.split,
                    args.max_documents,
                    args.batch_size,
                    args.device,
                )
            else:
                pr.decode_probe(
                    out,
                    args.checkpoints,
                    args.mixers,
                    args.contexts,
                    args.decode_tokens,
                    args.hidden,
                    args.layers,
                    args.vocab,
                    args.options,
                    args.prefill_chunk,
                    args.batch,
                    args.device,
                    args.dtype,
                )
        elif args.kind == "varlen":
            from seqzoo.eval.bench_varlen import bench_varlen

            bench_varlen(
                args.mixers, out, _default(args.seq_lens, [1024])[0], _default(args.batch, 4), _default(args.hidden, 128),
                args.layers, max(args.vocab, 257), args.repeats,
            )  # fmt: skip
        elif args.kind == "loss":
            from seqzoo.eval.bench_hf import bench_loss

            bench_loss(out, args.vocabs, _default(args.hidden, 512), args.tokens, args.device, args.repeats)
        elif args.kind == "generate":
            from seqzoo.eval.bench_hf import bench_generate

            bench_generate(
                out, args.mixers, _default(args.seq_lens, [1024]), args.decode_tokens, _default(args.hidden, 128), args.layers,
                args.vocab, _default(args.batch, 1), args.options, args.device, args.repeats,
            )  # fmt: skip
        elif args.kind == "pararnn":
            from seqzoo.eval.bench_pararnn import bench_pararnn

            bench_pararnn(
                out, args.cells, _default(args.seq_lens, [256, 1024, 4096, 16384]), _default(args.batch, 4), _default(args.hidden, 256),
                _default(args.heads, 2), args.max_iters, args.device, args.dtype, args.repeats, args.skip_sequential_above, args.modes,
                projection=not args.no_projection,
            )  # fmt: skip
        elif args.kind == "checkpoint_attention":
            from seqzoo.eval.bench_checkpoint import bench_checkpoint_attention

            bench_checkpoint_attention(
                out, _default(args.seq_lens, [4096, 8192, 16384, 32768]), args.segment_lens, _default(args.batch, 1),
                _default(args.heads, 4), args.head_dim, args.backends, args.device, args.dtype, args.repeats,
            )  # fmt: skip
        elif args.kind == "ops":
            from seqzoo.eval.bench_ops import bench_ops

            heads = 4 if args.heads is None else args.heads
            bench_ops(
                out,
                args.ops,
                _default(args.seq_lens, [1024, 4096]),
                _default(args.batch, 1),
                heads,
                args.head_dim,
                args.device,
                args.dtype,
                args.repeats,
                args.skip_reference_above,
            )
        elif args.kind == "titans":
            from seqzoo.eval.bench_titans import bench_titans

            heads = 2 if args.heads is None else args.heads
            bench_titans(
                out,
                args.dims,
                args.chunks,
                _default(args.seq_lens, [1024, 4096]),
                _default(args.batch, 1),
                heads,
                args.memory,
                args.peer_batch_size,
                args.device,
                args.dtype,
                args.repeats,
                args.retrieval,
            )
        else:
            from seqzoo.eval.bench import bench_mixers

            bench_mixers(
                args.mixers,
                out,
                args.kind,
                _default(args.seq_lens, [1024, 4096]),
                _default(args.batch, 1),
                _default(args.hidden, 128),
                args.layers,
                args.vocab,
                args.decode_tokens,
                args.options,
                args.device,
                args.dtype,
                args.repeats,
                args.compile,
            )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"seqzoo-eval: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
