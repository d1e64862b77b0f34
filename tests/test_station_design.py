"""What design-reader-study writes for the reading station: design.json, tokens.csv (owner-only,
distinct secrets), images.csv describing every written image, and images whose pixels are the
runner's perturbation of the originals."""

from __future__ import annotations

import json
import stat

import attrs
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from perceptcore.cli import main
from perceptcore.images import load_manifest, read_image
from perceptcore.runner import perturb_image
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass
from station_design import SEVERITIES, VIEWS, make_design, tokens, write_cases_and_images


@pytest.fixture(scope="module")
def design(tmp_path_factory):
    return make_design(tmp_path_factory.mktemp("station"), readers=3, exams=3)


def test_the_design_folder_holds_the_station_files_and_nothing_half_written(design):
    names = {p.name for p in design.iterdir()}
    assert {"assignment.csv", "exams.csv", "worksheets", "images", "design.json", "tokens.csv", "images.csv"} <= names
    assert not list(design.parent.glob(".*partial*"))


def test_design_json_records_how_the_design_was_made(design):
    record = json.loads((design / "design.json").read_text())
    assert record == {
        "version": 1, "calls": "probability", "roi": True, "max_boxes": 3, "severities": SEVERITIES,
        "perturbation": "gaussian_lowpass", "options": attrs.asdict(GaussianLowpass.Options(unit="mm")),
        "manifest": str((design.parent / "manifest.csv").resolve()), "seed": 0, "scheme": "uniform",
        "readers": ["reader01", "reader02", "reader03"],
    }


def test_tokens_are_owner_only_distinct_secrets(design):
    path = design / "tokens.csv"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["role", "reader", "token"]
    assert list(table.role) == ["reader"] * 3 + ["admin"] and list(table.reader) == ["reader01", "reader02",
                                                                                       "reader03", ""]
    found = tokens(design)
    assert len(set(found.values())) == 4
    # token_urlsafe(24): 24 random bytes, 32 URL-safe characters.
    assert all(len(t) == 32 and set(t) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
               for t in found.values())


def test_every_design_gets_new_tokens(tmp_path):
    first = make_design(tmp_path / "a", readers=2, exams=1)
    second = make_design(tmp_path / "b", readers=2, exams=1)
    assert not set(tokens(first).values()) & set(tokens(second).values())


def test_images_csv_lists_every_image_of_every_reading(design):
    images = pd.read_csv(design / "images.csv", dtype={"exam": str, "case": str})
    assert list(images.columns) == ["reader", "order", "exam", "case", "laterality", "view", "file", "bits",
                                    "height", "width", "window_center", "window_width"]
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    cases = pd.read_csv(design.parent / "cases.csv", dtype=str)
    expected = {(a.reader, int(a.order), a.exam, c.case, c.case.split("/")[1], view)
                for a in assignment.itertuples() for c in cases[cases.exam == a.exam].itertuples() for view in VIEWS}
    listed = set(zip(images.reader, images.order, images.exam, images.case, images.laterality, images.view))
    assert listed == expected and len(images) == len(expected)
    assert images.window_center.isna().all() and images.window_width.isna().all()  # PNG sources: no window
    assert set(images.bits) == {12}
    on_disk = {p.relative_to(design).as_posix() for p in (design / "images").rglob("*.png")}
    assert set(images.file) == on_disk
    for row in images.itertuples():
        with Image.open(design / row.file) as png:
            assert (png.height, png.width) == (row.height, row.width) == (64, 48)


def test_the_images_are_the_runners_perturbation_of_the_originals(design):
    record = json.loads((design / "design.json").read_text())
    manifest = load_manifest(design.parent / "manifest.csv", "manifest")
    images = pd.read_csv(design / "images.csv", dtype={"exam": str, "case": str})
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    severity_of = {(a.reader, a.exam): a.severity for a in assignment.itertuples()}
    options = GaussianLowpass.Options(unit="mm")
    perturbed = 0
    for row in images.itertuples():
        source = next(r for r in manifest.for_case(row.case) if r.view == row.view)
        image = read_image(source, "test")
        label = severity_of[(row.reader, row.exam)]
        expected = perturb_image(GaussianLowpass(), options, source, torch.from_numpy(image.pixels.astype(np.float32)),
                                 image, float(label), SEVERITIES.index(label), record["seed"])
        expected = np.clip(np.rint(expected.numpy()), 0, 4095).astype(np.uint16)
        shown = np.asarray(Image.open(design / row.file))
        assert np.array_equal(shown, expected), row.file
        if label == "0":
            assert np.array_equal(shown, image.pixels)
        else:
            perturbed += 1
            assert not np.array_equal(shown, image.pixels)
    assert perturbed  # the design does show filtered images


@pytest.mark.parametrize("calls, roi", [("binary", False), ("birads", True)])
def test_calls_and_roi_are_recorded(tmp_path, calls, roi):
    record = json.loads((make_design(tmp_path, readers="ana,ben", exams=1, calls=calls, roi=roi)
                         / "design.json").read_text())
    assert (record["calls"], record["roi"], record["readers"]) == (calls, roi, ["ana", "ben"])


def test_a_design_without_images_has_no_images_csv_and_defaults_to_probability_calls(tmp_path):
    cases, _ = write_cases_and_images(tmp_path, exams=2)
    assert main(["design-reader-study", str(cases), "--readers", "2", "--severities", "0", "1",
                 "--out", str(tmp_path / "d")]) == 0
    record = json.loads((tmp_path / "d" / "design.json").read_text())
    assert (record["calls"], record["roi"], record["perturbation"], record["manifest"]) == ("probability", False,
                                                                                           None, None)
    assert not (tmp_path / "d" / "images.csv").exists() and (tmp_path / "d" / "tokens.csv").exists()


def test_roi_needs_images(tmp_path, capsys):
    cases, _ = write_cases_and_images(tmp_path, exams=1)
    code = main(["design-reader-study", str(cases), "--readers", "1", "--severities", "0", "1", "--roi",
                 "--out", str(tmp_path / "d")])
    assert code == 1 and "--roi: ROI boxes are drawn on the readers' images" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_unknown_calls_are_refused(tmp_path, capsys):
    cases, _ = write_cases_and_images(tmp_path, exams=1)
    with pytest.raises(SystemExit):
        main(["design-reader-study", str(cases), "--readers", "1", "--severities", "0", "1", "--calls", "percent",
              "--out", str(tmp_path / "d")])
    assert "invalid choice: 'percent'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_failing_image_leaves_no_design_and_no_staging_folder(tmp_path, capsys):
    cases, manifest = write_cases_and_images(tmp_path, exams=2)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table[table.case != "E2/right"].to_csv(manifest, index=False)  # a case of the last exam has no image
    code = main(["design-reader-study", str(cases), "--readers", "2", "--severities", "0", "1", "--images",
                 str(manifest), "--perturbation", "gaussian_lowpass", "--out", str(tmp_path / "d")])
    assert code == 1 and "case 'E2/right' of exam 'E2' has no image" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d*"))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_tags_are_carried_into_images_csv(tmp_path, photometric):
    import pydicom

    from test_images import write_dicom

    pixels = (np.arange(32 * 24).reshape(32, 24) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "view.dcm", pixels, photometric=photometric, pixel_spacing=(0.1, 0.1))
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = ["1200", "2000"], ["800", "3000"]  # multi-valued: the first is the default
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"  # windows are in rescaled units
    ds.save_as(path)
    pd.DataFrame({"case": ["X/left"], "view": ["CC"], "laterality": ["L"], "file": ["view.dcm"]}).to_csv(
        tmp_path / "manifest.csv", index=False)
    pd.DataFrame({"exam": ["X"], "case": ["X/left"]}).to_csv(tmp_path / "cases.csv", index=False)
    assert main(["design-reader-study", str(tmp_path / "cases.csv"), "--readers", "1", "--severities", "0", "1",
                 "--images", str(tmp_path / "manifest.csv"), "--perturbation", "gaussian_lowpass",
                 "--out", str(tmp_path / "d")]) == 0
    row = pd.read_csv(tmp_path / "d" / "images.csv").iloc[0]
    stored_center = (1200 - -100) / 2  # stored = (rescaled - intercept) / slope
    expected = stored_center if photometric == "MONOCHROME2" else 4095 - stored_center  # read inverted
    assert (row.window_center, row.window_width, row.bits) == (expected, 400, 12)
