"""Write greyscale PNGs with the standard library alone, so the demo needs no imaging package."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ..priors.files import write_atomic


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(pixels: Tensor, path: str | Path) -> Path:
    """`pixels`: (H, W) uint8. Written atomically."""
    h, w = pixels.shape
    rows = b"".join(b"\x00" + bytes(row) for row in pixels.to(torch.uint8).tolist())
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b""))
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def image_grid(rows: list[Tensor], scale: int = 6, gap: int = 2) -> Tensor:
    """Tile rows of (N, 1, H, W) images in [-1, 1] into one uint8 picture, pixels enlarged `scale` times."""
    n, _, h, w = rows[0].shape
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = torch.full((len(rows) * cell_h + gap, n * cell_w + gap), 255, dtype=torch.uint8)
    for r, images in enumerate(rows):
        pix = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pix = pix.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for i in range(n):
            y, x = gap + r * cell_h, gap + i * cell_w
            grid[y : y + h * scale, x : x + w * scale] = pix[i]
    return grid
