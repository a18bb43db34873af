"""Test-wide setup: environment switches that must be set before seqzoo, triton or datasets load."""

import os

# datasets phones home (a download-count HEAD request) unless told it is offline; read at import.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter; it must be on before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items) -> None:
    """With a GPU and no interpreter, the ``triton``-marked tests (CPU tensors through the interpreter)
    cannot run: ``backend="triton"`` needs CUDA tensors there. ``tests/gpu`` runs the kernels compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="interpreter test (TRITON_INTERPRET is off on a GPU machine); tests/gpu runs the kernels compiled")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, in order (kept after ``plt.close`` to inspect its texts)."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        original(self, *args, **kwargs)
        figures.append(self)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures
