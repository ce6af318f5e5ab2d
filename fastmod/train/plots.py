"""PNG curves of a run (``loss.png``, ``accuracy.png``) from its metrics log:
matplotlib when installed, else a small Pillow line plotter (Pillow is a
dependency, so a run always gets its plots)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, x, y)

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def curves(records: list[dict]) -> dict[str, list[Series]]:
    """Series for the loss and accuracy plots from ``metrics.jsonl`` records."""
    def pick(kind, key):
        pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and _finite(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    out = {"loss": [], "accuracy": []}
    for kind in ("train", "val"):
        x, y = pick(kind, "loss")
        if x:
            out["loss"].append((kind, x, y))
        x, y = pick(kind, "acc")
        if x:
            out["accuracy"].append((kind, x, [100 * v for v in y]))
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def save_plots(records: list[dict], run_dir: Path) -> list[Path]:
    paths = []
    for name, series in curves(records).items():
        if not series:
            continue
        path = Path(run_dir) / f"{name}.png"
        ylabel = "accuracy (%)" if name == "accuracy" else "cross-entropy loss"
        try:
            _plot_matplotlib(series, path, name, ylabel)
        except ImportError:
            _plot_pillow(series, path, name, ylabel)
        paths.append(path)
    return paths


def _plot_matplotlib(series: list[Series], path: Path, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, x, y in series:
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _plot_pillow(series: list[Series], path: Path, title: str, ylabel: str) -> None:
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 400, 64, 16, 28, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [v for _, x, _ in series for v in x]
    ys = [v for _, _, y in series for v in y]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _nice_ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([left, yy, w - right, yy], fill=(225, 225, 225))
        d.text((4, yy - 6), f"{t:.3g}", fill="black")
    for t in _nice_ticks(x0, x1):
        xx, _ = px(t, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 10, h - bottom + 6), f"{t:g}", fill="black")
    d.text((w // 2 - 20, h - 16), "step", fill="black")
    d.text((left, 8), f"{title}: {ylabel}", fill="black")
    for i, (label, x, y) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        pts = [px(a, b) for a, b in zip(x, y)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts if len(pts) < 30 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        d.text((w - right - 90, top + 6 + 14 * i), f"- {label}", fill=color)
    img.save(path)
