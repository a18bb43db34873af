"""The ``seqzoo-eval`` command line: perplexity, MQAR accuracy, throughput/memory benchmarks."""
