"""Image input: a case manifest (one row per image) and readers for PNG, DICOM and NumPy files.

Manifest
    A CSV table, one row per image, with the case id column(s) (``case`` by default; several
    id columns are joined with "/" exactly as `perceptcore.data.case_ids` does, so the ids
    match the cases table), ``view`` (free text, e.g. CC/MLO), ``laterality`` (L/R or
    left/right, any case; stored as "left"/"right") and ``file`` (relative to the manifest's
    folder, or absolute). Optional columns: ``pixel_spacing_mm``, ``bits``, ``roi_boxes``
    and ``roi_mask``; other columns are ignored. `load_manifest` checks everything it can
    without reading pixels — each file's header included — so a bad row is reported
    before a run starts. Rows are reported as CSV line numbers (header = line 1).

Formats, chosen by suffix (any case)
    ``.png``: 8- or 16-bit greyscale PNG. 16-bit files are read as uint16 exactly; 8-bit
    files keep their 0-255 values (as uint16, bits 8). Colour, palette and grey+alpha PNGs
    are refused (Pillow would reduce 16-bit grey+alpha to 8 bits). The pHYs chunk is
    ignored: it usually holds a screen resolution, not the detector spacing.
    ``.dcm``/``.dicom`` — or any other name whose file starts with the DICOM preamble
    ("DICM" at byte 128), as with files named by their UIDs: read with pydicom.
    ``.npy``: a 2-D numeric array, loaded with ``allow_pickle=False`` (object arrays are
    refused). Integer arrays must lie in 0..65535 and become uint16; float arrays stay
    float and must be finite, >= 0 and <= 65535. The header's shape must match the file's
    size, so a header claiming a huge array is refused before anything is allocated.
    Every format: an image (or mask) with no rows or no columns is refused.

Pixel spacing (`read_image`)
    ``pixel_spacing_mm`` from the manifest wins whenever it is given. If the file records a
    spacing too and the two differ by more than 1 %, the manifest's value is still used
    and no error is raised (the file's value is kept in
    `LoadedImage.file_pixel_spacing_mm` so a caller can report it). Without a manifest
    value the file's spacing is used; PNG and NumPy files never record one, and a DICOM
    file without PixelSpacing or ImagerPixelSpacing is an error naming the row and file.

DICOM spacing rule
    PixelSpacing, or else ImagerPixelSpacing (the detector-plane spacing, not corrected
    for geometric magnification). Both tags hold (row spacing, column spacing). When the
    two values agree within 1 % the row spacing is used. Non-square pixels (values
    differing by more than 1 %) are an error unless the manifest gives
    ``pixel_spacing_mm``: the perturbations take a single spacing per image, and silently
    picking one axis would scale them wrongly along the other.

DICOM pixels
    The stored values (no modality or VOI LUT applied, like a PNG export), BitsStored as
    `bits`, and MONOCHROME1 images inverted (``2**BitsStored - 1 - value``) so that bright
    means dense as in MONOCHROME2. Only single-frame greyscale images are read.

Bits
    The grey-level range of an image is 0 .. 2**bits - 1 (`LoadedImage.max_value`). A
    ``bits`` column in the manifest (or the caller's `bits`) wins; otherwise DICOM gives
    BitsStored, 8-bit PNGs and uint8 arrays give 8, and other PNG/NumPy images are
    inferred from their maximum value: <= 4095 -> 12, else 16. (A 16-bit image whose
    brightest pixel happens to be <= 4095 is therefore taken as 12-bit; give ``bits`` when
    that matters.) Pixel values above 2**bits - 1 are an error.

ROI
    ``roi_boxes``: one or more boxes "row0 col0 row1 col1" separated by ";" — half-open
    pixel ranges [row0, row1) x [col0, col1), as in `perceptcore.perturbation.roi_mask`.
    Coordinates are non-negative integers with row0 < row1 and col0 < col1 (checked by
    `load_manifest`). Clipping rule (`roi`): a box reaching past the bottom or right edge
    is clipped to the image; a box that starts at or beyond the edge (row0 >= height or
    col0 >= width) contains no pixel of the image and is an error — usually boxes of
    another image, or (x, y) given for (row, col). ``roi_mask``: a PNG, NumPy or DICOM
    image of exactly the image's size; nonzero = inside. Boxes and mask are combined
    (union).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import attrs
import numpy as np
import pandas as pd

from .data import case_ids, read_table, regular_file, require_columns
from .errors import PerceptcoreError

LATERALITIES = {"l": "left", "left": "left", "r": "right", "right": "right"}
FORMATS = {".png": "png", ".dcm": "dicom", ".dicom": "dicom", ".npy": "npy"}
OPTIONAL_COLUMNS = ("pixel_spacing_mm", "bits", "roi_boxes", "roi_mask")
SPACING_TOLERANCE = 0.01  # relative: manifest vs file, and row vs column spacing
MAX_UINT16 = 65535

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOURS = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}
_INTEGER = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------- records

@attrs.frozen
class ImageRecord:
    """One manifest row. `row` is its CSV line number in `manifest` (None when built by hand)."""

    case: str
    view: str
    laterality: str
    file: Path
    pixel_spacing_mm: float | None = None
    roi_boxes: tuple = ()
    roi_mask: Path | None = None
    bits: int | None = None
    manifest: Path | None = None
    row: int | None = None

    @property
    def has_roi(self) -> bool:
        return bool(self.roi_boxes) or self.roi_mask is not None

    @property
    def place(self) -> str:
        """Message prefix naming the manifest row ("images.csv: row 4: "), or "" without one."""
        if self.manifest is None:
            return ""
        return f"{self.manifest}: row {self.row}: " if self.row is not None else f"{self.manifest}: "


@attrs.frozen
class Manifest:
    """The validated rows of a manifest, in file order."""

    path: Path
    records: tuple

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, index) -> ImageRecord:
        return self.records[index]

    @property
    def cases(self) -> list[str]:
        """The distinct case ids, in order of first appearance."""
        return list(dict.fromkeys(record.case for record in self.records))

    def for_case(self, case: str) -> list[ImageRecord]:
        return [record for record in self.records if record.case == case]


@attrs.frozen(eq=False)
class LoadedImage:
    """Pixels (2-D uint16, or float for float .npy files), spacing in mm and bits per pixel.

    `file_pixel_spacing_mm` is the spacing the file itself records (DICOM), whether or not
    it was used.
    """

    pixels: np.ndarray
    pixel_spacing_mm: float | None
    bits: int
    file_pixel_spacing_mm: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape

    @property
    def max_value(self) -> int:
        """Top of the grey-level range (ImageBatch.max_value): 4095 for 12 bits, 65535 for 16."""
        return 2 ** self.bits - 1


# --------------------------------------------------------------------------- manifest

def load_manifest(path, where: str, id_columns=("case",), read_headers: bool = True) -> Manifest:
    """Read and validate a manifest (see the module docstring for its columns).

    With `read_headers` each image's (and ROI mask's) header is read too — PNG chunk
    header, .npy header, DICOM data set without pixel data — to check its format, shape
    and, for DICOM rows without ``pixel_spacing_mm``, its spacing tags.
    """
    path = Path(path)
    id_columns = (id_columns,) if isinstance(id_columns, str) else tuple(id_columns)
    text_columns = [c for c in ("view", "laterality", "file", *OPTIONAL_COLUMNS) if c not in id_columns]
    table = read_table(path, where, text_columns=text_columns)
    require_columns(table, [*id_columns, "view", "laterality", "file"], path, where)
    for column in id_columns:
        empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if empty.any():
            raise PerceptcoreError(f"{path}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: "
                                   f"column {column!r} is empty", where)
    ids = case_ids(table, id_columns)
    base = path.parent
    records, seen = [], {}
    for i in range(len(table)):
        line = i + 2
        record = _record(table, i, ids.iloc[i], path, line, base, where)
        key = (record.case, record.view, record.laterality, record.file.resolve())
        if key in seen:
            raise PerceptcoreError(
                f"{path}: rows {seen[key]} and {line}: the same image is listed twice (case {record.case!r}, "
                f"view {record.view!r}, {record.laterality}, file {record.file})",
                where,
            )
        seen[key] = line
        if read_headers:
            _check_spacing(record, _check_headers(record, where), where)
        elif image_format(record.file) != "dicom":  # DICOM spacing is then checked by read_image
            _check_spacing(record, None, where)
        records.append(record)
    return Manifest(path, tuple(records))


def _cell(table: pd.DataFrame, column: str, i: int) -> str | None:
    """The cell as written and stripped, or None when the column is absent or the cell empty."""
    if column not in table.columns:
        return None
    value = table[column].iloc[i]
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _record(table, i, case, path, line, base, where) -> ImageRecord:
    def bad(column, problem):
        return PerceptcoreError(f"{path}: row {line}: column {column!r}: {problem}", where)

    view = _cell(table, "view", i)
    if view is None:
        raise bad("view", "is empty")
    side = _cell(table, "laterality", i)
    if side is None:
        raise bad("laterality", "is empty")
    if side.lower() not in LATERALITIES:
        raise bad("laterality", f"{side!r} is not L, R, left or right")
    file = _existing_file(_cell(table, "file", i), base, lambda problem: bad("file", problem))

    spacing = _cell(table, "pixel_spacing_mm", i)
    if spacing is not None:
        try:
            value = float(spacing)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise bad("pixel_spacing_mm", f"{spacing!r} is not a positive number of millimetres")
        spacing = value

    bits = _cell(table, "bits", i)
    if bits is not None:
        if not _INTEGER.fullmatch(bits) or not 1 <= int(bits) <= 16:
            raise bad("bits", f"{bits!r} is not a whole number of bits from 1 to 16")
        bits = int(bits)

    boxes = _cell(table, "roi_boxes", i)
    try:
        boxes = parse_boxes(boxes) if boxes is not None else ()
    except ValueError as exc:
        raise bad("roi_boxes", str(exc)) from None

    mask = _cell(table, "roi_mask", i)
    if mask is not None:
        mask = _existing_file(mask, base, lambda problem: bad("roi_mask", problem))

    return ImageRecord(str(case), view, LATERALITIES[side.lower()], file, spacing, boxes, mask, bits, path, line)


def _existing_file(text, base: Path, bad) -> Path:
    if text is None:
        raise bad("is empty")
    file = Path(text).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.exists():
        raise bad(f"file not found: {file}")
    if not file.is_file():
        raise bad(f"{file} is not a file")
    if image_format(file) is None:
        raise bad(f"{file.name}: unsupported format; expected a PNG (.png), DICOM (.dcm, or a file starting "
                  "with the DICM preamble) or NumPy (.npy) file")
    return file


def parse_boxes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """Boxes "row0 col0 row1 col1; ..." as integer tuples; ValueError says what is wrong."""
    boxes = []
    parts = [part.strip() for part in text.split(";")]
    for k, part in enumerate(parts, start=1):
        if not part:
            if k == len(parts) and k > 1:  # a trailing ";"
                continue
            raise ValueError(f"box {k} is empty in {text!r}; write boxes as 'row0 col0 row1 col1; ...'")
        numbers = [n for n in re.split(r"[\s,]+", part) if n]
        if len(numbers) != 4:
            raise ValueError(f"box {k} {part!r} has {len(numbers)} number(s); expected 4: row0 col0 row1 col1")
        if not all(_INTEGER.fullmatch(n) for n in numbers):
            raise ValueError(f"box {k} {part!r}: coordinates must be whole pixel numbers")
        row0, col0, row1, col1 = (int(n) for n in numbers)
        if min(row0, col0, row1, col1) < 0:
            raise ValueError(f"box {k} {part!r}: coordinates must not be negative")
        if not (row0 < row1 and col0 < col1):
            raise ValueError(f"box {k} {part!r} is empty or reversed: needs row0 < row1 and col0 < col1 "
                             "(half-open ranges)")
        boxes.append((row0, col0, row1, col1))
    return tuple(boxes)


# --------------------------------------------------------------------------- formats and headers

def image_format(path: Path) -> str | None:
    """"png", "dicom" or "npy" by suffix; other names are DICOM when the file has the DICM preamble."""
    path = Path(path)
    known = FORMATS.get(path.suffix.lower())
    if known is not None:
        return known
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    return "dicom" if head[128:132] == b"DICM" else None


def _check_headers(record: ImageRecord, where: str):
    """Format-level checks of a row's files without reading pixels; the DICOM spacing tags found, if any."""
    spacing = None
    for column, file, mask in (("file", record.file, False), ("roi_mask", record.roi_mask, True)):
        if file is None:
            continue
        try:
            kind = image_format(file)
            if kind == "png":
                _png_header(file, where, mask)
            elif kind == "npy":
                _npy_header(file, where, mask)
            elif kind == "dicom":
                dataset = _dicom_dataset(file, where, pixels=False)
                _dicom_check(dataset, file, where, mask)
                if not mask:
                    spacing = _dicom_spacing(dataset, file, where)
        except PerceptcoreError as exc:
            raise PerceptcoreError(f"{record.place}column {column!r}: {exc.message}", exc.where) from None
    return spacing


def _check_spacing(record: ImageRecord, spacing, where: str) -> None:
    """A row without pixel_spacing_mm needs a file that records it (`spacing`: the DICOM tags found)."""
    if record.pixel_spacing_mm is not None:
        return
    try:
        _spacing_or_error(None, spacing, None, record.file, where)
    except PerceptcoreError as exc:
        raise PerceptcoreError(f"{record.place}column 'pixel_spacing_mm' is empty and {exc.message}", exc.where) \
            from None


def _png_header(path: Path, where: str, mask: bool) -> tuple[int, int]:
    """(bit depth, colour type) of a PNG, refusing what is not a grey-level image."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as exc:
        raise PerceptcoreError(f"{path}: cannot read: {exc.strerror}", where) from None
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR" or len(head) < 26:
        raise PerceptcoreError(f"{path}: not a PNG file (no PNG signature)", where)
    depth, colour = head[24], head[25]
    if int.from_bytes(head[16:20], "big") == 0 or int.from_bytes(head[20:24], "big") == 0:
        raise PerceptcoreError(f"{path}: the {'mask' if mask else 'image'} is empty (no rows or no columns)", where)
    if colour != 0:
        raise PerceptcoreError(
            f"{path}: a {depth}-bit {_PNG_COLOURS.get(colour, f'colour type {colour}')} PNG is not a grey-level "
            f"image; save {'masks' if mask else 'images'} as 8- or 16-bit greyscale PNG", where)
    if not mask and depth not in (8, 16):
        raise PerceptcoreError(f"{path}: a {depth}-bit greyscale PNG is not an 8- or 16-bit image", where)
    return depth, colour


def _npy_header(path: Path, where: str, mask: bool) -> tuple[tuple, np.dtype]:
    size = regular_file(path, where)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
            offset = f.tell()
    except OSError as exc:
        raise PerceptcoreError(f"{path}: cannot read: {exc.strerror}", where) from None
    except Exception as exc:  # bad magic, malformed header
        raise PerceptcoreError(f"{path}: not a readable .npy file ({_one_line(exc)})", where) from None
    _check_array_type(shape, dtype, path, where, mask)
    # np.load allocates what the header claims before reading: hold the claim to the bytes present.
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != size - offset:
        raise PerceptcoreError(f"{path}: the header claims a {'x'.join(map(str, shape))} array of {dtype} "
                               f"({claimed:,} bytes) but the file holds {size - offset:,} bytes of data", where)
    return shape, dtype


def _check_array_type(shape, dtype: np.dtype, path, where, mask: bool) -> None:
    if dtype.hasobject:
        raise PerceptcoreError(f"{path}: holds Python objects (dtype {dtype}); only plain numeric arrays are "
                               "read (.npy files are loaded with allow_pickle=False)", where)
    if len(shape) != 2:
        raise PerceptcoreError(f"{path}: array of shape {tuple(shape)} is not a 2-D image", where)
    if 0 in shape:
        raise PerceptcoreError(f"{path}: the {'mask' if mask else 'image'} is empty ({shape[0]}x{shape[1]} "
                               "pixels)", where)
    if dtype.kind not in ("biuf" if mask else "iuf"):
        raise PerceptcoreError(f"{path}: array of dtype {dtype} is not numeric grey levels", where)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- readers

@attrs.frozen(eq=False)
class _Raw:
    pixels: np.ndarray
    bits: int | None  # None: infer from the values
    spacing: tuple | None = None  # (tag, (row mm, column mm)) from DICOM


def _read_png(path: Path, where: str, mask: bool = False) -> _Raw:
    from PIL import Image

    depth, _ = _png_header(path, where, mask)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image)
    except Exception as exc:  # truncated or corrupt data
        raise PerceptcoreError(f"{path}: not a readable PNG image ({_one_line(exc)})", where) from None
    if mask:
        return _Raw(pixels, None)
    if depth == 16:
        if mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise PerceptcoreError(f"{path}: 16-bit PNG opened as mode {mode!r}; refusing to reduce it to 8 bits",
                                   where)
        if pixels.dtype != np.uint16:
            if pixels.min() < 0 or pixels.max() > MAX_UINT16:
                raise PerceptcoreError(f"{path}: values outside 0..65535 in a 16-bit PNG", where)
            pixels = pixels.astype(np.uint16)
        return _Raw(pixels, None)
    if mode != "L":
        raise PerceptcoreError(f"{path}: 8-bit PNG opened as mode {mode!r}; expected 'L'", where)
    return _Raw(pixels.astype(np.uint16), 8)


def _read_npy(path: Path, where: str, mask: bool = False) -> _Raw:
    _npy_header(path, where, mask)
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise PerceptcoreError(f"{path}: holds Python objects; only plain numeric arrays are read "
                                   "(.npy files are loaded with allow_pickle=False)", where) from None
        raise PerceptcoreError(f"{path}: not a readable .npy file ({_one_line(exc)})", where) from None
    except (OSError, EOFError) as exc:
        raise PerceptcoreError(f"{path}: not a readable .npy file ({_one_line(exc)})", where) from None
    if not isinstance(array, np.ndarray):
        raise PerceptcoreError(f"{path}: not a single array (an .npz archive?)", where)
    _check_array_type(array.shape, array.dtype, path, where, mask)
    if mask:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PerceptcoreError(f"{path}: mask has NaN or infinite values", where)
        return _Raw(array, None)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise PerceptcoreError(f"{path}: image has NaN or infinite values", where)
        pixels = array.astype(np.float32) if array.dtype.itemsize < 4 else array
    else:
        pixels = array
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
    if low < 0 or high > MAX_UINT16:
        raise PerceptcoreError(f"{path}: grey levels must lie in 0..65535; found {low}..{high}", where)
    if pixels.dtype.kind in "iu":
        bits = 8 if pixels.dtype == np.uint8 else None
        return _Raw(pixels.astype(np.uint16), bits)
    return _Raw(pixels, None)


def _dicom_dataset(path: Path, where: str, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as exc:
        raise PerceptcoreError(f"{path}: not a DICOM file ({_one_line(exc)})", where) from None
    except Exception as exc:
        raise PerceptcoreError(f"{path}: not a readable DICOM file ({_one_line(exc)})", where) from None


def _dicom_check(ds, path: Path, where: str, mask: bool) -> None:
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise PerceptcoreError(f"{path}: {samples} samples per pixel (colour); expected one grey level", where)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise PerceptcoreError(f"{path}: {frames} frames; expected a single 2-D image", where)
    if not int(ds.get("Rows", 1) or 0) or not int(ds.get("Columns", 1) or 0):
        raise PerceptcoreError(f"{path}: the {'mask' if mask else 'image'} is empty (Rows {ds.get('Rows')}, "
                               f"Columns {ds.get('Columns')})", where)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PerceptcoreError(f"{path}: PhotometricInterpretation {photometric or 'missing'!s}; expected "
                               "MONOCHROME1 or MONOCHROME2", where)
    bits = ds.get("BitsStored", ds.get("BitsAllocated"))
    if not mask and (bits is None or not 1 <= int(bits) <= 16):
        raise PerceptcoreError(f"{path}: BitsStored {bits}; only 1- to 16-bit images are read", where)


def _dicom_spacing(ds, path: Path, where: str):
    """(tag, (row mm, column mm)) from PixelSpacing, else ImagerPixelSpacing; None if neither is there."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
            continue
        values = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 2 or not all(math.isfinite(n) and n > 0 for n in numbers):
            shown = "\\".join(str(v) for v in values)
            raise PerceptcoreError(f"{path}: {tag} {shown!r} is not two positive numbers (row and column "
                                   "spacing in mm)", where)
        return tag, (numbers[0], numbers[1])
    return None


def _read_dicom(path: Path, where: str, mask: bool = False) -> _Raw:
    ds = _dicom_dataset(path, where, pixels=True)
    _dicom_check(ds, path, where, mask)
    if "PixelData" not in ds:
        raise PerceptcoreError(f"{path}: has no pixel data", where)
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # compressed without a decoder, inconsistent lengths, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax = getattr(syntax, "name", syntax) or "unknown"
        raise PerceptcoreError(f"{path}: cannot decode the pixel data (transfer syntax {syntax}): "
                               f"{_one_line(exc)}", where) from None
    if pixels.ndim != 2:
        raise PerceptcoreError(f"{path}: pixel data of shape {pixels.shape} is not a 2-D image", where)
    if mask:
        return _Raw(pixels, None)
    if pixels.dtype.kind not in "iu":
        raise PerceptcoreError(f"{path}: pixel data of dtype {pixels.dtype}; expected integer grey levels", where)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated")))
    top = 2 ** bits - 1
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > top:
        raise PerceptcoreError(f"{path}: stored values {low}..{high} lie outside the 0..{top} range of "
                               f"BitsStored {bits}", where)
    pixels = pixels.astype(np.uint16)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        pixels = (np.uint16(top) - pixels).astype(np.uint16)
    return _Raw(pixels, bits, _dicom_spacing(ds, path, where))


_READERS = {"png": _read_png, "npy": _read_npy, "dicom": _read_dicom}


def _read_raw(path: Path, where: str, mask: bool = False) -> _Raw:
    path = Path(path)
    regular_file(path, where)
    kind = image_format(path)
    if kind is None:
        raise PerceptcoreError(f"{path}: unsupported format; expected a PNG (.png), DICOM (.dcm, or a file "
                               "starting with the DICM preamble) or NumPy (.npy) file", where)
    raw = _READERS[kind](path, where, mask)
    if 0 in raw.pixels.shape:  # the header checks miss what a decoder makes of a malformed file
        raise PerceptcoreError(f"{path}: the {'mask' if mask else 'image'} is empty ({raw.pixels.shape[0]}x"
                               f"{raw.pixels.shape[1]} pixels)", where)
    return raw


def _file_spacing(spacing, path: Path, where: str, strict: bool) -> float | None:
    """The file's single spacing: the row spacing; non-square pixels are an error when `strict`."""
    if spacing is None:
        return None
    tag, (row, column) = spacing
    if strict and abs(row - column) > SPACING_TOLERANCE * min(row, column):
        raise PerceptcoreError(f"{path}: {tag} {row:g}\\{column:g} mm: the pixels are not square (rows and "
                               "columns spaced differently); give pixel_spacing_mm in the manifest to choose "
                               "the spacing", where)
    return row


def _spacing_or_error(given, spacing, record, path, where) -> float:
    """The spacing to use for a manifest row: the manifest's, else the file's, else an error."""
    if given is not None:
        return given
    value = _file_spacing(spacing, path, where, strict=True)
    if value is None:
        if image_format(path) == "dicom":
            problem = "has no PixelSpacing or ImagerPixelSpacing; give pixel_spacing_mm in the manifest"
        else:
            problem = "does not record a pixel spacing (only DICOM files do); give pixel_spacing_mm in the manifest"
        raise PerceptcoreError(f"{record.place if record else ''}{path} {problem}", where)
    return value


def _resolve_bits(raw: _Raw, bits: int | None, path: Path, where: str, source: str) -> int:
    pixels = raw.pixels
    high = float(pixels.max()) if pixels.size else 0.0
    if bits is None:
        bits = raw.bits if raw.bits is not None else (12 if high <= 4095 else 16)
    elif high > 2 ** bits - 1:
        raise PerceptcoreError(f"{path}: values up to {high:g} exceed the {bits}-bit range given {source}", where)
    return bits


def read_file(path, where: str, *, pixel_spacing_mm: float | None = None, bits: int | None = None) -> LoadedImage:
    """Read one image file; `pixel_spacing_mm` and `bits`, when given, win over the file's.

    The result's spacing is None when neither the caller nor the file gives one. Non-square
    DICOM pixels are an error unless `pixel_spacing_mm` is given.
    """
    path = Path(path)
    raw = _read_raw(path, where)
    used_bits = _resolve_bits(raw, bits, path, where, "by the caller")
    file_spacing = _file_spacing(raw.spacing, path, where, strict=pixel_spacing_mm is None)
    spacing = pixel_spacing_mm if pixel_spacing_mm is not None else file_spacing
    return LoadedImage(raw.pixels, spacing, used_bits, file_spacing)


def read_image(record: ImageRecord, where: str) -> LoadedImage:
    """Read a manifest row's image; its spacing is always set (the manifest's wins, see module docstring)."""
    try:
        raw = _read_raw(record.file, where)
        used_bits = _resolve_bits(raw, record.bits, record.file, where, "in the manifest's bits column")
        file_spacing = _file_spacing(raw.spacing, record.file, where, strict=record.pixel_spacing_mm is None)
    except PerceptcoreError as exc:
        raise PerceptcoreError(f"{record.place}{exc.message}", exc.where) from None
    spacing = _spacing_or_error(record.pixel_spacing_mm, raw.spacing, record, record.file, where)
    return LoadedImage(raw.pixels, spacing, used_bits, file_spacing)


# --------------------------------------------------------------------------- ROI

def roi(record: ImageRecord, image, where: str | None = None) -> np.ndarray:
    """Boolean (H, W) ROI of `image` (a LoadedImage or an array): the union of the row's boxes and mask.

    Boxes reaching past the bottom/right edge are clipped; a box starting outside the
    image, a mask of another size, or a row without any ROI is an error.
    """
    shape = tuple(getattr(image, "pixels", image).shape)
    height, width = shape
    place = record.place
    if not record.has_roi:
        raise PerceptcoreError(f"{place}{record.file.name} has no ROI (roi_boxes and roi_mask are empty)", where)
    if record.roi_mask is not None:
        try:
            mask = _read_raw(record.roi_mask, where, mask=True).pixels
        except PerceptcoreError as exc:
            raise PerceptcoreError(f"{place}{exc.message}", exc.where) from None
        if mask.shape != shape:
            raise PerceptcoreError(
                f"{place}ROI mask {record.roi_mask} is {mask.shape[0]}x{mask.shape[1]} (rows x columns) but image "
                f"{record.file.name} is {height}x{width}", where)
        inside = mask != 0
    else:
        inside = np.zeros(shape, dtype=bool)
    for row0, col0, row1, col1 in record.roi_boxes:
        if row0 >= height or col0 >= width:
            raise PerceptcoreError(
                f"{place}ROI box '{row0} {col0} {row1} {col1}' lies outside the {height}x{width} (rows x columns) "
                f"image {record.file.name}", where)
        inside[row0:min(row1, height), col0:min(col1, width)] = True
    return inside
