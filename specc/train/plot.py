"""The loss curve as a PNG, drawn into a pixel array and encoded by hand (zlib + struct):
training loss in blue, evaluation loss in orange, on a light grid; min and max loss labelled."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..atomic import write_atomically

# A 3x5 pixel font for the axis labels.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111101110011", " ": "000000000000000",
}


def encode_png(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes (8-bit RGB, no filtering)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _text(img, x, y, s, color, scale=2):
    for ch in s:
        bits = _FONT.get(ch, _FONT[" "])
        for k, bit in enumerate(bits):
            if bit == "1":
                r, c = divmod(k, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, xs, ys, color):
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0, 1, n):
            x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
            img[max(y - 1, 0):y + 1, max(x - 1, 0):x + 1] = color


def loss_curve(train: list[tuple[int, float]], evals: list[tuple[int, float]], width=640, height=400) -> np.ndarray:
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    points = [p for p in train + evals if np.isfinite(p[1])]
    if not points:
        return img
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    for k in range(5):  # grid
        y = top + k * (bottom - top) // 4
        img[y, left:right] = 225
        x = left + k * (right - left) // 4
        img[top:bottom, x] = 225
    img[bottom, left:right] = img[top:bottom, left] = 120
    sx = lambda s: left + (s - s0) / (s1 - s0) * (right - left - 1)
    sy = lambda v: bottom - 1 - (v - lo) / (hi - lo) * (bottom - top - 1)
    for series, color in ((train, (31, 119, 180)), (evals, (255, 127, 14))):
        series = [p for p in series if np.isfinite(p[1])]
        if len(series) == 1:
            series = series * 2
        if series:
            _line(img, [sx(s) for s, _ in series], [sy(v) for _, v in series], color)
    dark = (60, 60, 60)
    _text(img, 4, top, f"{hi:.3g}", dark)
    _text(img, 4, bottom - 10, f"{lo:.3g}", dark)
    _text(img, left, bottom + 10, f"{s0}", dark)
    _text(img, right - 8 * len(str(s1)), bottom + 10, f"{s1}", dark)
    return img


def write_loss_curve(path: str | Path, train, evals) -> None:
    data = encode_png(loss_curve(train, evals))
    write_atomically(path, lambda f: f.write(data))
