"""Test-wide setup: environment switches that must be set before seqzoo, triton or datasets load."""

import os

# datasets phones home (a download-count HEAD request) unless told it is offline; read at import.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter; it must be on before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
