"""A view's stored grey levels as the 8-bit PNG a browser shows: windowed, downscaled, cached.

Window rule (exact; the tests compute it independently): with centre c and width w > 0, a
stored value x is shown as

    clip(rint((x - (c - w / 2)) / w * 255), 0, 255)

in float64, rint rounding half to even; values at or below c - w/2 are black, at or above
c + w/2 white. It is computed once per window for all 65536 possible values (a lookup table)
and applied to the image by indexing, which is far cheaper than the arithmetic per pixel.

Downscaling: when the longer side exceeds `max_side`, the image is shrunk to
round(height * s) x round(width * s) pixels (at least one), s = max_side / longer side, by
area averaging: each output pixel is rint of the mean of the unrounded windowed values
clip((x - (c - w / 2)) / w * 255, 0, 255) of the input pixels it covers, weighted by the area
covered (Pillow's BOX filter on 32-bit floats: no rounding between its two passes, unlike its
8-bit path). Averaging the displayed values rather than the stored ones gives what the
full-resolution picture looks like shrunk on screen.

PNG (`encode_png`): 8-bit grey, every row with PNG's Sub filter (the difference from the pixel
to its left), compressed by zlib at level 1 with the run-length strategy. Written here rather
than by Pillow, which tries every filter on every row and so takes about three times as long
for a file of the same size (measured on 3328 x 2560 mammograms, real and synthetic). Higher
zlib levels take several times longer for a few per cent smaller files; no compression would
send 8.5 MB per full view instead of 1.5-2.5 MB.

Caches: decoded pixels (by file) and rendered PNGs (by file, window and size) are kept in
least-recently-used caches bounded by bytes and shared by the server's threads.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from perceptcore.errors import PerceptcoreError

# The exam each of 10+ readers is reading (4 views of 3328 x 2560 x 2 bytes: 68 MB per reader), so
# that a new window or zoom does not decode its PNGs again.
DECODED_CACHE_BYTES = 1024 * 2 ** 20
RENDERED_CACHE_BYTES = 256 * 2 ** 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_SIDE, MAX_SIDE = 64, 16384


class ByteBoundedLRU:
    """A thread-safe mapping that forgets the least recently used items beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def read_pixels(path: Path) -> np.ndarray:
    """The stored grey levels of an 8- or 16-bit greyscale PNG as uint16, exactly."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            mode, pixels = image.mode, np.asarray(image)
    except Exception as exc:  # missing, truncated or corrupt file
        raise PerceptcoreError(f"not a readable PNG image ({' '.join(str(exc).split())})", str(path)) from None
    if mode not in ("I;16", "I;16B", "I;16L", "I", "L") or pixels.ndim != 2:
        raise PerceptcoreError(f"a PNG of mode {mode!r} is not a grey-level image", str(path))
    if mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):
        raise PerceptcoreError("values outside 0..65535", str(path))
    return pixels.astype(np.uint16, copy=False)


def _window(center: float, width: float) -> np.ndarray:
    values = np.arange(65536, dtype=np.float64)
    return np.clip((values - (center - width / 2)) / width * 255, 0, 255)


def window_table(center: float, width: float) -> np.ndarray:
    """The window rule (module docstring) for every value 0..65535, as uint8."""
    return np.rint(_window(center, width)).astype(np.uint8)


def window_values(center: float, width: float) -> np.ndarray:
    """The window rule before rounding, for every value 0..65535, as float32 in [0, 255]."""
    return _window(center, width).astype(np.float32)


def scaled_size(height: int, width: int, max_side: int | None) -> tuple:
    """(height, width) after downscaling so that the longer side is at most max_side."""
    longer = max(height, width)
    if max_side is None or longer <= max_side:
        return height, width
    scale = max_side / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def render_png(pixels: np.ndarray, center: float, width: float, max_side: int | None = None) -> bytes:
    """Windowed 8-bit PNG of uint16 `pixels`, shrunk to fit max_side (module docstring)."""
    from PIL import Image

    height, width_px = scaled_size(*pixels.shape, max_side)
    if (height, width_px) == pixels.shape:
        shown = np.take(window_table(center, width), pixels)
    else:
        exact = Image.fromarray(np.take(window_values(center, width), pixels))  # mode F: 32-bit float
        shown = np.rint(np.asarray(exact.resize((width_px, height), Image.Resampling.BOX))).astype(np.uint8)
    return encode_png(shown)


def encode_png(grey: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a 2-D uint8 array (module docstring: Sub filter, zlib level 1, RLE)."""
    height, width = grey.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1] = grey[:, 0]
    np.subtract(grey[:, 1:], grey[:, :-1], out=rows[:, 2:])  # modulo 256, as PNG defines it
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = compressor.compress(rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grey, deflate, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


class Renderer:
    """Rendered views, cached: decoded pixels by file, PNG bytes by file, window and size."""

    def __init__(self, decoded_bytes: int = DECODED_CACHE_BYTES, rendered_bytes: int = RENDERED_CACHE_BYTES):
        self.decoded = ByteBoundedLRU(decoded_bytes)
        self.rendered = ByteBoundedLRU(rendered_bytes)

    def pixels(self, file: Path, shape: tuple) -> np.ndarray:
        """The file's grey levels (read-only: shared between threads), which must have `shape`."""
        pixels = self.decoded.get(file)
        if pixels is None:
            pixels = read_pixels(file)
            if pixels.shape != tuple(shape):
                raise PerceptcoreError(f"the image is {pixels.shape[0]}x{pixels.shape[1]} (rows x columns), the "
                                       f"design says {shape[0]}x{shape[1]}", str(file))
            pixels.setflags(write=False)
            self.decoded.put(file, pixels, pixels.nbytes)
        return pixels

    def png(self, file: Path, shape: tuple, center: float, width: float, max_side: int | None = None) -> bytes:
        key = (file, float(center), float(width), max_side)
        data = self.rendered.get(key)
        if data is None:
            data = render_png(self.pixels(file, shape), center, width, max_side)
            self.rendered.put(key, data, len(data))
        return data
