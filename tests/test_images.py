"""Image input: the case manifest, the PNG/DICOM/NumPy readers, spacing and bits rules, ROI masks."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from perceptcore.errors import PerceptcoreError
from perceptcore.images import (ImageRecord, LoadedImage, image_format, load_manifest, parse_boxes, read_file,
                                read_image, roi)
from perceptcore.perturbation import roi_mask

MAMMOGRAMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mammograms"
WHERE = "images.manifest"


# --------------------------------------------------------------------------- writers

def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(pixels: np.ndarray, depth: int, colour: int) -> bytes:
    """A minimal PNG written by hand (for kinds Pillow cannot write, e.g. 16-bit grey+alpha)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = pixels.shape[:2]  # (H, W) or (H, W, channels)
    raw = b"".join(b"\x00" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_dicom(path: Path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12,
                pixel_spacing=None, imager_spacing=None) -> Path:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if pixel_spacing is not None:
        ds.PixelSpacing = [str(v) for v in pixel_spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [str(v) for v in imager_spacing]
    ds.PixelData = pixels.astype("<u2").tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def ramp(shape=(6, 5), top=4095) -> np.ndarray:
    return np.linspace(0, top, num=shape[0] * shape[1]).round().astype(np.uint16).reshape(shape)


# --------------------------------------------------------------------------- PNG

def test_16_bit_png_round_trip_is_exact(tmp_path):
    pixels = np.array([[0, 1, 255, 256, 4095], [4096, 30000, 65534, 65535, 1000]], dtype=np.uint16)
    image = read_file(write_png(tmp_path / "a.png", pixels), WHERE, pixel_spacing_mm=0.1)
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.bits == 16 and image.max_value == 65535
    assert image.pixel_spacing_mm == 0.1 and image.file_pixel_spacing_mm is None


def test_bits_are_inferred_from_the_maximum_unless_given(tmp_path):
    twelve = write_png(tmp_path / "twelve.png", ramp(top=4095))
    image = read_file(twelve, WHERE)
    np.testing.assert_array_equal(image.pixels, ramp(top=4095))
    assert image.bits == 12 and image.max_value == 4095 and image.pixel_spacing_mm is None
    assert read_file(write_png(tmp_path / "sixteen.png", ramp(top=4096)), WHERE).bits == 16
    assert read_file(twelve, WHERE, bits=16).bits == 16
    with pytest.raises(PerceptcoreError, match="values up to 4095 exceed the 10-bit range"):
        read_file(twelve, WHERE, bits=10)


def test_8_bit_png_keeps_its_values_as_8_bit(tmp_path):
    pixels = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    image = read_file(write_png(tmp_path / "eight.png", pixels), WHERE)
    assert image.pixels.dtype == np.uint16 and image.bits == 8
    np.testing.assert_array_equal(image.pixels, pixels)


@pytest.mark.parametrize("depth, colour, channels, kind", [(8, 2, 3, "RGB"), (16, 4, 2, "greyscale+alpha")])
def test_colour_and_alpha_pngs_are_refused_not_reduced(tmp_path, depth, colour, channels, kind):
    pixels = np.full((3, 4, channels), 300 if depth == 16 else 30)
    path = tmp_path / "colour.png"
    path.write_bytes(png_bytes(pixels, depth, colour))
    with Image.open(path) as opened:  # what Pillow would hand over: 8 bits per channel, even from 16
        assert np.asarray(opened).dtype == np.uint8
    with pytest.raises(PerceptcoreError, match=re.escape(f"{depth}-bit {kind} PNG is not a grey-level image")) as err:
        read_file(path, WHERE)
    assert str(path) in err.value.message and err.value.where == WHERE


def test_not_a_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"hello")
    with pytest.raises(PerceptcoreError, match="not a PNG file"):
        read_file(path, WHERE)


# --------------------------------------------------------------------------- NumPy

def test_npy_integer_and_float_images(tmp_path):
    np.save(tmp_path / "u16.npy", ramp(top=5000))
    image = read_file(tmp_path / "u16.npy", WHERE)
    assert image.pixels.dtype == np.uint16 and image.bits == 16
    np.save(tmp_path / "i32.npy", ramp(top=4095).astype(np.int32))
    image = read_file(tmp_path / "i32.npy", WHERE)
    assert image.pixels.dtype == np.uint16 and image.bits == 12
    np.testing.assert_array_equal(image.pixels, ramp(top=4095))
    floats = ramp(top=4095).astype(np.float32) / 2
    np.save(tmp_path / "f32.npy", floats)
    image = read_file(tmp_path / "f32.npy", WHERE)
    assert image.pixels.dtype == np.float32 and image.bits == 12
    np.testing.assert_array_equal(image.pixels, floats)
    np.save(tmp_path / "u8.npy", np.ones((3, 3), np.uint8))
    assert read_file(tmp_path / "u8.npy", WHERE).bits == 8


def test_object_npy_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    with pytest.raises(PerceptcoreError) as err:
        read_file(path, WHERE)
    message = err.value.message
    assert str(path) in message and "Python objects" in message and "allow_pickle=False" in message
    assert "\n" not in message


@pytest.mark.parametrize("array, problem", [
    (np.zeros((2, 3, 4), np.uint16), r"shape \(2, 3, 4\) is not a 2-D image"),
    (np.array([[-1, 2]], np.int16), r"grey levels must lie in 0..65535; found -1..2"),
    (np.array([[70000, 2]], np.int64), r"grey levels must lie in 0..65535; found 2..70000"),
    (np.array([[np.nan, 2.0]]), "NaN or infinite"),
    (np.array([[True, False]]), "dtype bool is not numeric grey levels"),
    (np.array([[1 + 2j]]), "is not numeric grey levels"),
])
def test_bad_npy_images(tmp_path, array, problem):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(PerceptcoreError, match=problem):
        read_file(path, WHERE)


# --------------------------------------------------------------------------- DICOM

def test_dicom_monochrome2_pixels_spacing_and_bits(tmp_path):
    pixels = ramp(top=4095)
    path = write_dicom(tmp_path / "mono2.dcm", pixels, pixel_spacing=(0.07, 0.07), imager_spacing=(0.085, 0.085))
    image = read_file(path, WHERE)
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.pixel_spacing_mm == pytest.approx(0.07)  # PixelSpacing wins over ImagerPixelSpacing
    assert image.bits == 12 and image.max_value == 4095


def test_dicom_monochrome1_is_inverted_so_bright_is_dense(tmp_path):
    pixels = ramp(top=4095)
    mono1 = read_file(write_dicom(tmp_path / "mono1.dcm", pixels, photometric="MONOCHROME1",
                                  pixel_spacing=(0.1, 0.1)), WHERE)
    np.testing.assert_array_equal(mono1.pixels, 4095 - pixels.astype(int))
    assert mono1.pixels.dtype == np.uint16 and mono1.bits == 12
    # The same tissue written both ways reads the same.
    mono2 = read_file(write_dicom(tmp_path / "mono2.dcm", 4095 - pixels, pixel_spacing=(0.1, 0.1)), WHERE)
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)


def test_dicom_imager_pixel_spacing_is_the_fallback(tmp_path):
    image = read_file(write_dicom(tmp_path / "imager.dcm", ramp(), imager_spacing=(0.085, 0.085)), WHERE)
    assert image.pixel_spacing_mm == pytest.approx(0.085)


def test_dicom_without_spacing_needs_it_in_the_manifest(tmp_path):
    path = write_dicom(tmp_path / "nospacing.dcm", ramp())
    assert read_file(path, WHERE).pixel_spacing_mm is None
    record = ImageRecord("1", "CC", "left", path, manifest=tmp_path / "m.csv", row=7)
    with pytest.raises(PerceptcoreError) as err:
        read_image(record, WHERE)
    assert err.value.message == (f"{tmp_path / 'm.csv'}: row 7: {path} has no PixelSpacing or ImagerPixelSpacing; "
                                 "give pixel_spacing_mm in the manifest")
    assert read_image(attrs.evolve(record, pixel_spacing_mm=0.05), WHERE).pixel_spacing_mm == 0.05


def test_dicom_non_square_pixels_are_an_error_unless_the_manifest_chooses(tmp_path):
    path = write_dicom(tmp_path / "rect.dcm", ramp(), pixel_spacing=(0.1, 0.2))
    record = ImageRecord("1", "CC", "left", path, manifest=tmp_path / "m.csv", row=3)
    with pytest.raises(PerceptcoreError, match=r"row 3: .*PixelSpacing 0.1\\0.2 mm: the pixels are not square"):
        read_image(record, WHERE)
    image = read_image(attrs.evolve(record, pixel_spacing_mm=0.15), WHERE)
    assert image.pixel_spacing_mm == 0.15 and image.file_pixel_spacing_mm == pytest.approx(0.1)


def test_manifest_spacing_wins_over_a_differing_file_spacing(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp(), pixel_spacing=(0.07, 0.07))
    image = read_image(ImageRecord("1", "CC", "left", path, pixel_spacing_mm=0.1), WHERE)
    assert image.pixel_spacing_mm == 0.1 and image.file_pixel_spacing_mm == pytest.approx(0.07)


def test_dicom_without_suffix_is_found_by_its_preamble(tmp_path):
    path = write_dicom(tmp_path / "1.2.840.99999.1", ramp(), pixel_spacing=(0.1, 0.1))
    bare = tmp_path / "IMG0001"
    bare.write_bytes(path.read_bytes())
    assert image_format(path) == image_format(bare) == "dicom"
    np.testing.assert_array_equal(read_file(bare, WHERE).pixels, ramp())
    other = tmp_path / "notes"
    other.write_bytes(b"\0" * 200)
    assert image_format(other) is None
    with pytest.raises(PerceptcoreError, match="unsupported format"):
        read_file(other, WHERE)


def test_not_a_dicom_file(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"not dicom at all")
    with pytest.raises(PerceptcoreError, match=f"{path}: not a"):
        read_file(path, WHERE)


# --------------------------------------------------------------------------- real mammograms

@pytest.fixture(scope="module")
def mammograms() -> Path:
    if not any(MAMMOGRAMS.glob("*.png")):
        pytest.skip(f"sample mammograms not available at {MAMMOGRAMS}")
    return MAMMOGRAMS


@pytest.mark.parametrize("name", ["gmic_0_L-CC.png", "gmic_0_R-MLO.png"])
def test_real_gmic_mammograms_are_12_bit(mammograms, name):
    image = read_file(mammograms / name, WHERE, pixel_spacing_mm=0.1)
    assert image.pixels.dtype == np.uint16 and image.pixels.ndim == 2
    assert 2000 <= image.shape[0] <= 2750 and 800 <= image.shape[1] <= 1010
    assert image.pixels.max() == 4095 and image.bits == 12 and image.max_value == 4095


def test_real_dmv_mammogram_is_16_bit(mammograms):
    image = read_file(mammograms / "dmv_1_L_CC.png", WHERE, pixel_spacing_mm=0.1)
    assert image.pixels.dtype == np.uint16 and image.shape == (3328, 2560)
    assert image.pixels.max() == 65535 and image.bits == 16


def test_real_segmentation_mask_of_another_size_is_refused(mammograms, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"case,view,laterality,file,pixel_spacing_mm,roi_mask\n"
                        f"0,CC,R,{mammograms / 'gmic_0_R-CC.png'},0.1,{mammograms / 'gmic_seg_0_R-CC_benign.png'}\n")
    record = load_manifest(manifest, WHERE)[0]
    image = read_image(record, WHERE)
    with pytest.raises(PerceptcoreError) as err:
        roi(record, image, WHERE)
    assert err.value.message == (f"{manifest}: row 2: ROI mask {mammograms / 'gmic_seg_0_R-CC_benign.png'} is "
                                 "2944x1920 (rows x columns) but image gmic_0_R-CC.png is 2144x801")


# --------------------------------------------------------------------------- manifest

@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with a PNG, an .npy, DICOMs with and without spacing, and a mask."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "a.png", ramp((6, 5)))
    np.save(folder / "b.npy", ramp((6, 5)))
    write_dicom(folder / "c.dcm", ramp((6, 5)), pixel_spacing=(0.07, 0.07))
    write_dicom(folder / "nospacing.dcm", ramp((6, 5)))
    mask = np.zeros((6, 5), np.uint8)
    mask[4:6, 0:2] = 255
    write_png(folder / "mask.png", mask)
    write_png(folder / "rgb.png", np.zeros((6, 5, 3), np.uint8))
    (folder / "notes.txt").write_text("x")
    return folder


def write_manifest(folder: Path, rows: list[str], header="case,view,laterality,file,pixel_spacing_mm,roi_boxes,roi_mask"):
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_manifest_reads_and_normalises(images, tmp_path):
    path = write_manifest(tmp_path, [
        "0,CC,L,images/a.png,0.1,1 2 3 4; 0 0 6 5;,",
        f"0,MLO,right,{images / 'b.npy'},0.05,,images/mask.png",
        "1,CC,Left,images/c.dcm,,,",
    ])
    manifest = load_manifest(path, WHERE)
    assert len(manifest) == 3 and manifest.cases == ["0", "1"]
    first, second, third = manifest
    assert (first.case, first.view, first.laterality) == ("0", "CC", "left")
    assert first.file == tmp_path / "images" / "a.png" and first.pixel_spacing_mm == 0.1
    assert first.roi_boxes == ((1, 2, 3, 4), (0, 0, 6, 5)) and first.roi_mask is None
    assert first.manifest == path and first.row == 2
    assert second.laterality == "right" and second.file == images / "b.npy" and second.roi_mask == images / "mask.png"
    assert third.pixel_spacing_mm is None and not third.has_roi and third.row == 4
    assert read_image(third, WHERE).pixel_spacing_mm == pytest.approx(0.07)
    assert [r.case for r in manifest.for_case("0")] == ["0", "0"]


def test_manifest_id_columns_are_joined_like_case_ids(images, tmp_path):
    path = write_manifest(tmp_path, ["3,left,CC,L,images/a.png,0.1"],
                          header="exam_id,side,view,laterality,file,pixel_spacing_mm")
    assert load_manifest(path, WHERE, id_columns=("exam_id", "side"))[0].case == "3/left"


def test_manifest_missing_columns_list_those_present(images, tmp_path):
    path = write_manifest(tmp_path, ["0,CC,images/a.png"], header="case,view,path")
    with pytest.raises(PerceptcoreError) as err:
        load_manifest(path, WHERE)
    assert err.value.message == (f"{path}: missing column(s) 'laterality', 'file'; the table has 'case', 'view', "
                                 "'path'")
    assert err.value.where == WHERE


GOOD = "0,CC,L,images/a.png,0.1,,"


@pytest.mark.parametrize("rows, line, fragments", [
    ([GOOD, "1,CC,L,images/missing.png,0.1,,"], 3, ["column 'file'", "file not found", "missing.png"]),
    ([GOOD, "1,CC,X,images/a.png,0.1,,"], 3, ["column 'laterality'", "'X' is not L, R, left or right"]),
    (["0,CC,,images/a.png,0.1,,"], 2, ["column 'laterality'", "is empty"]),
    (["0,,L,images/a.png,0.1,,"], 2, ["column 'view'", "is empty"]),
    ([",CC,L,images/a.png,0.1,,"], 2, ["column 'case'", "is empty"]),
    ([GOOD, "1,CC,L,images/a.png,abc,,"], 3, ["column 'pixel_spacing_mm'", "'abc' is not a positive number"]),
    ([GOOD, "1,MLO,R,images/a.png,0.1,,", "1,CC,L,images/a.png,-0.1,,"], 4, ["column 'pixel_spacing_mm'", "'-0.1' is not a positive"]),
    (["0,CC,L,images/a.png,,,"], 2, ["column 'pixel_spacing_mm' is empty", "a.png does not record a pixel spacing"]),
    (["0,CC,L,images/nospacing.dcm,,,"], 2,
     ["column 'pixel_spacing_mm' is empty", "nospacing.dcm has no PixelSpacing or ImagerPixelSpacing",
      "give pixel_spacing_mm in the manifest"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,1 2 3,"], 3, ["column 'roi_boxes'", "box 1 '1 2 3' has 3 number(s)"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,0 0 4 4; 1.5 2 3 4,"], 3, ["column 'roi_boxes'", "box 2", "whole pixel"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,3 0 1 4,"], 3, ["column 'roi_boxes'", "empty or reversed", "row0 < row1"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,-1 0 2 4,"], 3, ["column 'roi_boxes'", "must not be negative"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,;0 0 1 1,"], 3, ["column 'roi_boxes'", "box 1 is empty"]),
    ([GOOD, "1,CC,L,images/a.png,0.1,,images/nomask.png"], 3, ["column 'roi_mask'", "file not found", "nomask.png"]),
    ([GOOD, "1,CC,L,images/notes.txt,0.1,,"], 3, ["column 'file'", "notes.txt: unsupported format"]),
    ([GOOD, "1,CC,L,images/rgb.png,0.1,,"], 3, ["column 'file'", "8-bit RGB PNG is not a grey-level image"]),
    ([GOOD, "1,CC,L,images,0.1,,"], 3, ["column 'file'", "is not a file"]),
])
def test_bad_manifests_name_file_row_and_column(images, tmp_path, rows, line, fragments):
    path = write_manifest(tmp_path, rows)
    with pytest.raises(PerceptcoreError) as err:
        load_manifest(path, WHERE)
    message = err.value.message
    assert message.startswith(f"{path}: row {line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and err.value.where == WHERE


def test_duplicate_rows_name_both_lines(images, tmp_path):
    path = write_manifest(tmp_path, [GOOD, "0,MLO,L,images/a.png,0.1,,", f"0,CC,left,{images / 'a.png'},0.2,,"])
    with pytest.raises(PerceptcoreError) as err:
        load_manifest(path, WHERE)
    assert err.value.message == (f"{path}: rows 2 and 4: the same image is listed twice (case '0', view 'CC', left, "
                                 f"file {images / 'a.png'})")


def test_bad_bits_column(images, tmp_path):
    path = write_manifest(tmp_path, ["0,CC,L,images/a.png,0.1,12", "1,CC,L,images/a.png,0.1,twelve"],
                          header="case,view,laterality,file,pixel_spacing_mm,bits")
    with pytest.raises(PerceptcoreError, match=r"row 3: column 'bits': 'twelve' is not a whole number of bits"):
        load_manifest(path, WHERE)


def test_manifest_bits_column_wins(images, tmp_path):
    path = write_manifest(tmp_path, ["0,CC,L,images/a.png,0.1,16", "1,CC,L,images/a.png,0.1,10"],
                          header="case,view,laterality,file,pixel_spacing_mm,bits")
    first, second = load_manifest(path, WHERE)
    assert read_image(first, WHERE).bits == 16
    with pytest.raises(PerceptcoreError, match=rf"{path}: row 3: .*exceed the 10-bit range given in the manifest"):
        read_image(second, WHERE)


def test_object_npy_in_a_manifest_is_refused_with_its_row(images, tmp_path):
    np.save(images / "objects.npy", np.array([[object()]], dtype=object), allow_pickle=True)
    path = write_manifest(tmp_path, [GOOD, "1,CC,L,images/objects.npy,0.1,,"])
    with pytest.raises(PerceptcoreError, match=r"row 3: column 'file': .*objects.npy: holds Python objects"):
        load_manifest(path, WHERE)


def test_parse_boxes():
    assert parse_boxes("0 0 2 3") == ((0, 0, 2, 3),)
    assert parse_boxes(" 1 2 3 4 ;5,6,7,8; ") == ((1, 2, 3, 4), (5, 6, 7, 8))
    with pytest.raises(ValueError, match="col0 < col1"):
        parse_boxes("0 3 2 3")


# --------------------------------------------------------------------------- ROI

def test_roi_from_boxes_matches_perturbation_roi_mask(tmp_path):
    record = ImageRecord("0", "CC", "left", tmp_path / "x.png", roi_boxes=((1, 1, 3, 4), (4, 0, 6, 2)))
    inside = roi(record, np.zeros((6, 5), np.uint16))
    assert inside.dtype == bool and inside.sum() == 6 + 4
    np.testing.assert_array_equal(inside, roi_mask((6, 5), record.roi_boxes).numpy())


def test_roi_boxes_are_clipped_at_the_edge_but_not_outside(tmp_path):
    image = LoadedImage(np.zeros((6, 5), np.uint16), 0.1, 12)
    record = ImageRecord("0", "CC", "left", tmp_path / "x.png", roi_boxes=((4, 3, 100, 100),),
                         manifest=tmp_path / "m.csv", row=5)
    expected = np.zeros((6, 5), bool)
    expected[4:, 3:] = True
    np.testing.assert_array_equal(roi(record, image), expected)
    outside = attrs.evolve(record, roi_boxes=((0, 0, 2, 2), (0, 5, 2, 9)))
    with pytest.raises(PerceptcoreError) as err:
        roi(outside, image, WHERE)
    assert err.value.message == f"{tmp_path / 'm.csv'}: row 5: ROI box '0 5 2 9' lies outside the 6x5 (rows x " \
                                "columns) image x.png"


def test_roi_from_mask_file_and_boxes(images, tmp_path):
    path = write_manifest(tmp_path, ["0,CC,L,images/a.png,0.1,0 3 1 5,images/mask.png",
                                     "1,CC,L,images/b.npy,0.1,,"])
    record, no_roi = load_manifest(path, WHERE)
    inside = roi(record, read_image(record, WHERE))
    expected = np.zeros((6, 5), bool)
    expected[4:6, 0:2] = True  # the mask
    expected[0:1, 3:5] = True  # the box
    np.testing.assert_array_equal(inside, expected)
    file_mask = torch.from_numpy(np.asarray(Image.open(images / "mask.png")) != 0)
    assert torch.equal(roi_mask((6, 5), record.roi_boxes, file_mask), torch.from_numpy(inside))
    with pytest.raises(PerceptcoreError, match=r"row 3: b.npy has no ROI \(roi_boxes and roi_mask are empty\)"):
        roi(no_roi, read_image(no_roi, WHERE), WHERE)


def test_npy_mask_and_size_mismatch(tmp_path):
    np.save(tmp_path / "mask.npy", np.eye(4, dtype=bool))
    record = ImageRecord("0", "CC", "left", tmp_path / "x.png", roi_mask=tmp_path / "mask.npy",
                         manifest=tmp_path / "m.csv", row=9)
    np.testing.assert_array_equal(roi(record, np.zeros((4, 4))), np.eye(4, dtype=bool))
    with pytest.raises(PerceptcoreError) as err:
        roi(record, np.zeros((4, 5)), WHERE)
    assert err.value.message == (f"{tmp_path / 'm.csv'}: row 9: ROI mask {tmp_path / 'mask.npy'} is 4x4 (rows x "
                                 "columns) but image x.png is 4x5")
