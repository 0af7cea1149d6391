"""Real-browser check: an exported plotly HTML figure actually draws in headless Chromium.

The figure is written as a self-contained HTML file (plotly.js inlined, no network), opened by
``chromium --headless --screenshot`` and the PNG is decoded here (a small zlib PNG decoder, so
no imaging library is needed). Oracles:

* a bar chart with known bar heights and a known colour: the red columns' measured heights have
  the same order and ratios as the data;
* a library heatmap (``bias_lens.plot.attribution.neuron_heatmap``) fills its plot area with
  colour, while the *same page without plotly.js* (negative control) stays blank, so the check
  cannot pass on an empty page.

Skipped, with the reason, when no Chromium/Chrome binary is on PATH (Debian: ``apt-get install
chromium``).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell",
            "chrome-headless-shell", "chrome")
WIDTH, HEIGHT = 800, 600


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason=f"no headless Chromium/Chrome on PATH (looked for {', '.join(BROWSERS)}); "
    "install Debian's `chromium` package to run the real-browser figure check",
)


# --------------------------------------------------------------------------- PNG decoding
def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def decode_png(data: bytes) -> np.ndarray:
    """8-bit, non-interlaced grayscale/RGB/RGBA PNG -> ``uint8 [height, width, channels]``."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {ctype}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = w * channels
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 2:  # Up
            cur = (line + prev) % 256
        elif ftype == 1:  # Sub: running sum per channel
            cur = line.reshape(w, channels).cumsum(0).reshape(-1) % 256
        else:  # Average / Paeth depend on the reconstructed left byte: sequential
            cur = line.copy()
            for i in range(stride):
                a = int(cur[i - channels]) if i >= channels else 0
                b = int(prev[i])
                c = int(prev[i - channels]) if i >= channels else 0
                pred = (a + b) // 2 if ftype == 3 else _paeth(a, b, c)
                cur[i] = (cur[i] + pred) % 256
        out[y] = cur
        prev = cur
    return out.reshape(h, w, channels)


def _png(rows: list[bytes], w: int, h: int, ctype: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def test_png_decoder_on_hand_filtered_rows():
    # 2x2 RGB image [[(10,20,30),(15,25,35)], [(12,22,32),(250,0,1)]], hand-filtered per row:
    # row 0 with Sub (second pixel stored as the difference to the first), row 1 with Up
    # (stored as the difference to the row above, mod 256).
    row0 = bytes([1, 10, 20, 30, 5, 5, 5])
    row1 = bytes([2, 2, 2, 2, (250 - 15) % 256, (0 - 25) % 256, (1 - 35) % 256])
    img = decode_png(_png([row0, row1], 2, 2, 2))
    assert img.tolist() == [[[10, 20, 30], [15, 25, 35]], [[12, 22, 32], [250, 0, 1]]]
    # Paeth row (1 byte gray, 3 px) after a filter-0 row [100, 50, 200]: hand-computed predictors
    # x0: a=0,b=100,c=0 -> p=100 -> b=100; stored 5 -> 105
    # x1: a=105,b=50,c=100 -> p=55 (pa=50, pb=5, pc=45) -> b=50; stored 7 -> 57
    # x2: a=57,b=200,c=50 -> p=207 (pa=150, pb=7, pc=157) -> b=200; stored 255 -> 199
    img = decode_png(_png([bytes([0, 100, 50, 200]), bytes([4, 5, 7, 255])], 3, 2, 0))
    assert img[:, :, 0].tolist() == [[100, 50, 200], [105, 57, 199]]
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a")


# --------------------------------------------------------------------------- browser helpers
def write_html(fig, path: Path, *, include_plotlyjs: bool | str = True) -> Path:
    """Self-contained HTML through the project's writer (``bias_lens.plot.io.write_figure``) when it
    exists, else plotly's own; ``include_plotlyjs=False`` (the blank control) always uses plotly's."""
    if include_plotlyjs is True:
        try:
            from bias_lens.plot.io import write_figure
        except ImportError:
            write_figure = None
        if write_figure is not None:
            written = [Path(p) for p in write_figure(fig, path.with_suffix(""), png=False)]
            html = [p for p in written if p.suffix == ".html"]
            assert html and html[0].is_file(), f"write_figure wrote {written}, no HTML"
            return html[0]
    fig.write_html(str(path), include_plotlyjs=include_plotlyjs, full_html=True, auto_open=False)
    return path


def screenshot(html: Path, tmp: Path) -> np.ndarray:
    png = tmp / f"{html.stem}.png"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=15000",
           f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not png.is_file():
        raise AssertionError(f"{BROWSER} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    img = decode_png(png.read_bytes())
    assert img.shape[:2] == (HEIGHT, WIDTH), img.shape
    return img[:, :, :3].astype(np.int64)


def coloured(img: np.ndarray) -> np.ndarray:
    """Pixels that are clearly not white/grey (saturated colour), i.e. drawn data marks."""
    return (img.max(-1) - img.min(-1)) > 60


# --------------------------------------------------------------------------- tests
@needs_browser
def test_bar_chart_draws_with_the_right_heights(tmp_path):
    import plotly.graph_objects as go

    heights = [3.0, 1.0, 2.0]
    fig = go.Figure(go.Bar(x=["a", "b", "c"], y=heights, marker_color="#ff0000"))
    fig.update_layout(width=WIDTH, height=HEIGHT, showlegend=False)
    img = screenshot(write_html(fig, tmp_path / "bars.html"), tmp_path)
    red = (img[:, :, 0] > 200) & (img[:, :, 1] < 60) & (img[:, :, 2] < 60)
    cols = np.nonzero(red.any(0))[0]
    assert red.sum() > 0.05 * WIDTH * HEIGHT, f"only {red.sum()} red pixels: the bars did not draw"
    # split the red columns into the three bars and measure each bar's height in pixels
    gaps = np.nonzero(np.diff(cols) > 1)[0]
    bars = np.split(cols, gaps + 1)
    assert len(bars) == 3, f"expected 3 bars, found {len(bars)}"
    px = [int(red[:, b[len(b) // 2]].sum()) for b in bars]
    assert px[0] > px[2] > px[1]
    ratios = np.array(px) / px[0]
    assert np.allclose(ratios, np.array(heights) / heights[0], atol=0.03), (px, ratios)


@needs_browser
def test_library_heatmap_draws_and_blank_control_does_not(tmp_path):
    import torch

    from bias_lens.locate.result import LocateResult
    from bias_lens.plot.attribution import neuron_heatmap

    g = torch.Generator().manual_seed(0)
    labels = [f"L{l}N{k}" for l in range(6) for k in range(128)]
    res = LocateResult("attribution", labels, torch.rand(len(labels), generator=g, dtype=torch.float64),
                       extras={"signed": torch.randn(len(labels), generator=g, dtype=torch.float64)})
    fig = neuron_heatmap(res, n_bins=32, signed=True)
    fig.update_layout(width=WIDTH, height=HEIGHT)
    drawn = screenshot(write_html(fig, tmp_path / "heatmap.html"), tmp_path)
    blank = screenshot(write_html(fig, tmp_path / "nojs.html", include_plotlyjs=False), tmp_path)
    frac, frac_blank = coloured(drawn).mean(), coloured(blank).mean()
    assert frac > 0.15, f"only {frac:.1%} of the screenshot is coloured: the heatmap did not draw"
    assert frac_blank < 0.001, f"control page without plotly.js has {frac_blank:.1%} coloured pixels"
    # a RdBu heatmap of random signed scores shows both reds and blues
    reds = ((drawn[:, :, 0] - drawn[:, :, 2]) > 60).sum()
    blues = ((drawn[:, :, 2] - drawn[:, :, 0]) > 60).sum()
    assert reds > 1000 and blues > 1000, (reds, blues)
