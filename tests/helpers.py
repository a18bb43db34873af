"""Assertions shared by the test files: relative error against a reference, NaN checks."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Assert matching shapes, finite values and relative error below ``tol``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"


def texts_outside(fig) -> list[str]:
    """What of a saved matplotlib figure reaches past its edges (and was cut off): the figure's own texts (its
    title) by their text, and axes (tick labels, axis labels, colorbars) by their labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # plt.close() leaves a canvas without a renderer; an Agg canvas lays the figure out as savefig did.
    renderer = (fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)).get_renderer()
    width, height = fig.bbox.width, fig.bbox.height

    def out(box) -> bool:
        return box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1

    texts = [t for t in [*fig.texts, fig._suptitle] if t is not None and t.get_visible() and t.get_text().strip()]
    outside = [t.get_text() for t in texts if out(t.get_window_extent(renderer))]
    # An axes' tight box holds what is drawn of it: ticks beyond its limits exist as texts but are not drawn.
    outside += [f"axes {ax.get_xlabel()!r} / {ax.get_ylabel()!r}" for ax in fig.axes if out(ax.get_tightbbox(renderer))]
    return outside
