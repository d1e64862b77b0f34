"""The published mammogram preprocessing shared by the NYU models (GMIC and DMV), architectures.md §0.

`prepare` turns one image of grey levels into the standardised model window:

1. `orient`: mirror the image so that every view faces right (chest wall on the left edge).
   Without `horizontal_flip` the right-breast views are mirrored; with it the left ones.
2. `breast_mask` + `crop_box`: background crop. Mask = pixel > 0, eroded `iterations` times
   (cross structure, the image border counting as background), largest 4-connected component,
   dilated `iterations` times; its bounding box plus `buffer` pixels at the top, the bottom and
   the side away from the chest wall (the right, since the image faces right).
   The iterated erosion and dilation are computed exactly with a taxicab distance transform
   (`erode`, `dilate`): k erosions by the cross keep a pixel iff no background pixel (the
   outside included) lies within taxicab distance k, and k dilations add every pixel within
   taxicab distance k of the set. This takes a fraction of a second on a 3328 x 2560 image.
   Small images: when nothing survives the erosion, the crop falls back to the bounding box of
   the un-eroded mask (pixel > 0), and a blank image is not cropped at all.
3. `rightmost_points`, `bottommost_points` of the mask inside the crop.
4. `optimal_center` (§0.3): CC views fix the column at rightmost_x - W//2 - 1 and search every
   row for the window holding the most nonzero pixels (ties: the centre nearest the cropped
   image's centre row, then the upper one); MLO views take the single candidate
   (bottom_y - H//2 - 1, rightmost_x - W//2 - 1).
5. `place_window` (§0.4): the window of the model size around the centre, with zero padding for
   images too small for the window plus its noise margin, shifted back inside the image; with a
   generator, `add_position_noise` and `add_size_noise` move it and change its size, and
   `extract` resizes it back to the model size with torch's bicubic interpolation
   (align_corners=False). The published code uses OpenCV's INTER_CUBIC, which uses the same
   cubic kernel but treats the borders slightly differently, so pixels near the window's edges
   can differ a little.
6. `standardise`: subtract the mean and divide by max(sd, 1e-5), over the whole window,
   zero padding included.

Coordinates are (row, column); boxes are (top, bottom, left, right), half-open.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

STD_EPSILON = 1e-5


@attrs.frozen(eq=False)
class Prepared:
    """A model-ready window and where it came from.

    `image`: float32 (H, W) of exactly the requested size, standardised.
    `window`: (top, bottom, left, right) of the window in the flipped, cropped image before
    any resize; it reaches outside the cropped image where zero padding was used.
    `crop`: (top, bottom, left, right) of the background crop in the original (unflipped)
    image. `flipped`: whether the image was mirrored to face right. `center`: the optimal
    centre (row, column) in the flipped, cropped image (may be negative)."""

    image: torch.Tensor
    window: tuple
    crop: tuple
    flipped: bool
    center: tuple
    rightmost_points: tuple
    bottommost_points: tuple


def view_kind(view: str) -> str:
    """'MLO' for any view name starting with MLO (case-insensitive), else 'CC'."""
    return "MLO" if view.strip().upper().startswith("MLO") else "CC"


def needs_flip(laterality: str, horizontal_flip: bool) -> bool:
    """Whether an image must be mirrored to face right: natively the left views face right."""
    side = laterality.lower()
    if side not in ("left", "right"):
        raise ValueError(f"laterality must be 'left' or 'right', got {laterality!r}")
    return (side == "right") != horizontal_flip


def orient(pixels: torch.Tensor, laterality: str, horizontal_flip: bool = False) -> tuple[torch.Tensor, bool]:
    """The image facing right, and whether it was mirrored."""
    flip = needs_flip(laterality, horizontal_flip)
    return (torch.flip(pixels, dims=(-1,)) if flip else pixels), flip


def erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """`iterations` binary erosions by the cross, pixels outside the image counting as background."""
    if iterations <= 0:
        return mask.copy()
    distance = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="taxicab")[1:-1, 1:-1]
    return distance > iterations


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """`iterations` binary dilations by the cross (within the image: a shortest taxicab path
    between two pixels of a rectangle never leaves it, so clipping at each step changes nothing)."""
    if iterations <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_cdt(~mask, metric="taxicab") <= iterations


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (ties: the first in row-major order)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def breast_mask(image: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Erode, keep the largest component, dilate; the raw nonzero mask when erosion leaves nothing."""
    raw = image > 0
    eroded = erode(raw, iterations)
    if not eroded.any():
        return raw
    return dilate(largest_component(eroded), iterations)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the mask's pixels; the whole image for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_box(mask: np.ndarray, buffer: int = 50) -> tuple[int, int, int, int]:
    """The mask's bounding box with `buffer` pixels added at the top, the bottom and the right
    (away from the chest wall of a right-facing image), clipped to the image."""
    top, bottom, left, right = bounding_box(mask)
    height, width = mask.shape
    return max(top - buffer, 0), min(bottom + buffer, height), left, min(right + buffer, width)


def rightmost_points(mask: np.ndarray) -> tuple[tuple[int, int], int]:
    """((first row, last row), column) of the mask's rightmost column, searched in the lower
    two thirds of the rows (the whole mask when those are empty; the last column when it is empty)."""
    lower = mask.copy()
    lower[: mask.shape[0] // 3] = False
    if not lower.any():
        lower = mask
    if not lower.any():
        return (0, mask.shape[0] - 1), mask.shape[1] - 1
    x = int(np.flatnonzero(lower.any(axis=0))[-1])
    rows = np.flatnonzero(lower[:, x])
    return (int(rows[0]), int(rows[-1])), x


def bottommost_points(mask: np.ndarray) -> tuple[int, tuple[int, int]]:
    """(row, (first column, last column)) of the mask's bottom row (the last row when it is empty)."""
    if not mask.any():
        return mask.shape[0] - 1, (0, mask.shape[1] - 1)
    y = int(np.flatnonzero(mask.any(axis=1))[-1])
    cols = np.flatnonzero(mask[y])
    return y, (int(cols[0]), int(cols[-1]))


def cc_center(nonzero: np.ndarray, size: tuple[int, int], rightmost_x: int) -> tuple[int, int]:
    """The CC centre: column fixed by the rightmost point; the row whose window (shifted down
    and right when it falls off the top or left edge, clipped at the bottom and right) holds
    the most nonzero pixels, ties going to the centre nearest the image's centre row."""
    height, width = nonzero.shape
    window_h, window_w = size
    cx = rightmost_x - window_w // 2 - 1
    left = max(cx - window_w // 2, 0)
    per_row = nonzero[:, left:left + window_w].sum(axis=1, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(per_row)])
    # Windows reaching past the bottom hold a subset of the bottom-aligned window's pixels and
    # lie further from the centre row, so only windows inside the image (or at the top) compete.
    tops = np.arange(max(height - window_h, 0) + 1)
    counts = cumulative[np.minimum(tops + window_h, height)] - cumulative[tops]
    centers = tops + window_h // 2
    best = np.flatnonzero(counts == counts.max())
    nearest = best[np.argmin(np.abs(centers[best] - height // 2))]  # argmin: the upper one on ties
    return int(centers[nearest]), int(cx)


def mlo_center(nonzero: np.ndarray, size: tuple[int, int], rightmost_x: int, bottommost_y: int) -> tuple[int, int]:
    """The MLO centre: the window's bottom at the breast's bottom, its right at the rightmost
    point. The bottom is the smaller of the mask's bottom row and the last nonzero row in the
    image's rightmost W columns (the pectoral muscle can reach lower than the breast there)."""
    window_h, window_w = size
    rows = np.flatnonzero(nonzero[:, -window_w:].any(axis=1))
    bottom_y = min(bottommost_y, int(rows[-1])) if rows.size else bottommost_y
    return bottom_y - window_h // 2 - 1, rightmost_x - window_w // 2 - 1


def optimal_center(image: np.ndarray, view: str, size: tuple[int, int],
                   rightmost: tuple, bottommost: tuple) -> tuple[int, int]:
    """§0.3 on the flipped, cropped image."""
    nonzero = image > 0
    if view_kind(view) == "CC":
        return cc_center(nonzero, size, rightmost[1])
    return mlo_center(nonzero, size, rightmost[1], bottommost[0])


@attrs.frozen
class Placement:
    """Zero padding (top, bottom, right) of the image and the window (top, bottom, left, right)
    in the padded image."""

    padding: tuple
    window: tuple

    def padded_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        top, bottom, right = self.padding
        return shape[0] + top + bottom, shape[1] + right


def place_window(shape: tuple[int, int], center: tuple[int, int], view: str, size: tuple[int, int],
                 max_crop_noise: tuple[int, int] = (0, 0), max_crop_size_noise: int = 0) -> Placement:
    """The window around `center`, with the padding rules of §0.4: an image shorter than the
    window plus its noise margin m (m = position noise + size noise on that axis) is zero-padded
    — CC vertically to H + 2m, evenly above and below, the window then starting at m; MLO
    vertically to H + m at the bottom, the window starting at 0; any view horizontally to
    W + m on the right, the window starting at 0 — and the window is then shifted back inside."""
    height, width = shape
    window_h, window_w = size
    margin_v = max_crop_noise[0] + max_crop_size_noise
    margin_h = max_crop_noise[1] + max_crop_size_noise
    top, left = center[0] - window_h // 2, center[1] - window_w // 2
    pad_top = pad_bottom = pad_right = 0
    if view_kind(view) == "CC" and height < window_h + 2 * margin_v:
        total = window_h + 2 * margin_v - height
        pad_top, pad_bottom, top = total // 2, total - total // 2, margin_v
    elif view_kind(view) == "MLO" and height < window_h + margin_v:
        pad_bottom, top = window_h + margin_v - height, 0
    if width < window_w + margin_h:
        pad_right, left = window_w + margin_h - width, 0
    padded_h, padded_w = height + pad_top + pad_bottom, width + pad_right
    top = min(max(top, 0), padded_h - window_h)
    left = min(max(left, 0), padded_w - window_w)
    return Placement((pad_top, pad_bottom, pad_right), (top, top + window_h, left, left + window_w))


def _toward_free_side(draw: float, before: int, after: int) -> float:
    """A uniform draw pointed away from an edge the window touches."""
    if before == 0:
        return abs(draw)
    if after == 0:
        return -abs(draw)
    return draw


def add_position_noise(window: tuple, padded_shape: tuple[int, int], max_crop_noise: tuple[int, int],
                       generator: np.random.Generator) -> tuple:
    """Shift the window by round(u * min(max noise, margin on the side it moves to)) on each
    axis, u ~ U(-1, 1) (one draw per axis: rows, then columns)."""
    top, bottom, left, right = window
    draws = generator.uniform(-1.0, 1.0, size=2)
    shifts = []
    for draw, start, end, extent, limit in ((draws[0], top, bottom, padded_shape[0], max_crop_noise[0]),
                                            (draws[1], left, right, padded_shape[1], max_crop_noise[1])):
        before, after = start, extent - end
        u = _toward_free_side(float(draw), before, after)
        shifts.append(int(np.round(u * min(limit, after if u >= 0 else before))))
    return top + shifts[0], bottom + shifts[0], left + shifts[1], right + shifts[1]


def add_size_noise(window: tuple, padded_shape: tuple[int, int], size: tuple[int, int], max_crop_size_noise: int,
                   generator: np.random.Generator) -> tuple:
    """Move each border independently by round(u * L), u ~ U(-1, 1) (top, bottom, left, right),
    L = min(max size noise, the four margins); the horizontal L is scaled by W/H (and, should
    W exceed H, kept within the horizontal margins). L is also kept below H/2 so that a window
    smaller than twice the noise never collapses (irrelevant at the published sizes)."""
    top, bottom, left, right = window
    window_h, window_w = size
    margins = (top, padded_shape[0] - bottom, left, padded_shape[1] - right)
    limit = min(max_crop_size_noise, *margins, (window_h - 1) // 2)
    limit_h = min(limit * window_w / window_h, margins[2], margins[3])
    u = generator.uniform(-1.0, 1.0, size=4)
    return (top + int(np.round(u[0] * limit)), bottom + int(np.round(u[1] * limit)),
            left + int(np.round(u[2] * limit_h)), right + int(np.round(u[3] * limit_h)))


def extract(image: torch.Tensor, placement: Placement, window: tuple, size: tuple[int, int]) -> torch.Tensor:
    """The window's pixels (zero outside the image), bicubically resized to `size` if needed."""
    pad_top, pad_bottom, pad_right = placement.padding
    padded = F.pad(image, (0, pad_right, pad_top, pad_bottom)) if any(placement.padding) else image
    top, bottom, left, right = window
    pixels = padded[top:bottom, left:right]
    if tuple(pixels.shape) != tuple(size):
        pixels = F.interpolate(pixels[None, None], size=tuple(size), mode="bicubic", align_corners=False)[0, 0]
    return pixels


def standardise(image: torch.Tensor) -> torch.Tensor:
    """(x - mean) / max(sd, 1e-5), population sd over the whole window."""
    sd = image.std(unbiased=False)
    return (image - image.mean()) / torch.clamp(sd, min=STD_EPSILON)


@attrs.frozen(eq=False)
class Located:
    """The deterministic part of the preprocessing, computed once per image: the flipped,
    cropped image (`cropped`, float32 (h, w)) and the fields `Prepared` reports."""

    cropped: torch.Tensor
    crop: tuple
    flipped: bool
    center: tuple
    rightmost_points: tuple
    bottommost_points: tuple
    view: str
    size: tuple


def locate(pixels: torch.Tensor, laterality: str, view: str, size: tuple[int, int], horizontal_flip: bool = False,
           iterations: int = 100, buffer: int = 50) -> Located:
    """Steps 1-4: orientation, background crop, extreme points and the optimal centre."""
    view = view_kind(view)
    size = (int(size[0]), int(size[1]))
    image, flipped = orient(pixels.to(torch.float32), laterality, horizontal_flip)
    values = image.detach().cpu().numpy()
    mask = breast_mask(values, iterations)
    top, bottom, left, right = crop_box(mask, buffer)
    width = values.shape[1]
    crop = (top, bottom, width - right, width - left) if flipped else (top, bottom, left, right)
    cropped_mask = mask[top:bottom, left:right]
    rightmost, bottommost = rightmost_points(cropped_mask), bottommost_points(cropped_mask)
    center = optimal_center(values[top:bottom, left:right], view, size, rightmost, bottommost)
    return Located(cropped=image[top:bottom, left:right], crop=crop, flipped=flipped, center=center,
                   rightmost_points=rightmost, bottommost_points=bottommost, view=view, size=size)


def cut(located: Located, generator: np.random.Generator | None = None,
        max_crop_noise: tuple[int, int] = (100, 100), max_crop_size_noise: int = 100) -> Prepared:
    """Steps 5-6: the (noisy, when `generator` is given) window, resized and standardised.

    Without a generator the window is deterministic: no noise, and the padding margins are
    computed with zero noise too (as at the published test time without augmentation).
    With one, the window gets the position and size noise (two and then four uniform draws
    from `generator`, each step only when its maximum is positive)."""
    if generator is None:
        max_crop_noise, max_crop_size_noise = (0, 0), 0
    shape, size = tuple(located.cropped.shape), located.size
    placement = place_window(shape, located.center, located.view, size, max_crop_noise, max_crop_size_noise)
    window = placement.window
    if generator is not None:
        padded_shape = placement.padded_shape(shape)
        if max_crop_noise[0] > 0 or max_crop_noise[1] > 0:
            window = add_position_noise(window, padded_shape, max_crop_noise, generator)
        if max_crop_size_noise > 0:
            window = add_size_noise(window, padded_shape, size, max_crop_size_noise, generator)
    image = standardise(extract(located.cropped, placement, window, size))
    pad_top = placement.padding[0]
    return Prepared(image=image, window=(window[0] - pad_top, window[1] - pad_top, window[2], window[3]),
                    crop=located.crop, flipped=located.flipped, center=located.center,
                    rightmost_points=located.rightmost_points, bottommost_points=located.bottommost_points)


def prepare(pixels: torch.Tensor, laterality: str, view: str, size: tuple[int, int], horizontal_flip: bool = False,
            generator: np.random.Generator | None = None, max_crop_noise: tuple[int, int] = (100, 100),
            max_crop_size_noise: int = 100, iterations: int = 100, buffer: int = 50) -> Prepared:
    """One image of grey levels (H, W) -> the standardised model window of `size`
    (`locate`, then `cut`; see those for the generator's role). `iterations` and `buffer` are
    the background crop's erosion/dilation count and buffer (published: 100 and 50)."""
    located = locate(pixels, laterality, view, size, horizontal_flip, iterations, buffer)
    return cut(located, generator, max_crop_noise, max_crop_size_noise)
