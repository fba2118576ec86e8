"""The loss curve of a run as a dependency-free SVG (matplotlib is not installed here).

``python -m engine.training.loss_curve runs/long/loss.csv engine/training/loss_curve.svg``
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 360, 50


def svg(rows: list[dict[str, str]]) -> str:
    """Train loss (blue) and held-out loss (orange) against step."""
    series = {
        "loss": [(float(r["step"]), float(r["loss"])) for r in rows if r["loss"]],
        "val_loss": [(float(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]],
    }
    points = [p for values in series.values() for p in values]
    max_step = max(x for x, _ in points)
    top = min(max(y for _, y in points), 9.0)

    def place(x: float, y: float) -> str:
        px = MARGIN + (WIDTH - 2 * MARGIN) * x / max_step
        py = HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * min(y, top) / top
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}"'
             ' stroke="black"/>',
             f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}">step (max {max_step:.0f})</text>',
             f'<text x="5" y="{MARGIN - 10}">loss (0 to {top:.1f}); blue = train, orange = held-out</text>']
    for tick in range(int(top) + 1):
        y = place(0, tick).split(",")[1]
        parts.append(f'<text x="{MARGIN - 20}" y="{y}">{tick}</text>')
    for name, color in (("loss", "steelblue"), ("val_loss", "darkorange")):
        if series[name]:
            path = " ".join(place(x, y) for x, y in series[name])
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    with source.open() as handle:
        target.write_text(svg(list(csv.DictReader(handle))))


if __name__ == "__main__":
    main()
