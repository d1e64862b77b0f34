"""The published mammogram preprocessing (architectures.md §0), step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from perceptcore_plugins.models import _mammography as mammo

from conftest import SHARED_DATA


class Ones:
    """A stand-in generator whose uniform draws are all +1 (or -1): the noise at its limit."""

    def __init__(self, sign: float = 1.0):
        self.sign = sign

    def uniform(self, low, high, size):
        return np.full(size, self.sign)


def breast_image(height=300, width=200, side="left", speck=True) -> np.ndarray:
    """A half-ellipse against the chest wall (left edge for a left breast, as acquired), with
    grey levels and an isolated bright speck (a marker) that the crop must drop."""
    rows, cols = np.mgrid[0:height, 0:width]
    inside = ((rows - height / 2) / (0.4 * height)) ** 2 + (cols / (0.6 * width)) ** 2 < 1
    image = np.where(inside, 500.0 + cols, 0.0)
    if speck:
        image[10:14, width - 14:width - 10] = 4000.0
    return image[:, ::-1].copy() if side == "right" else image


# --------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("laterality, horizontal_flip, flipped", [
    ("left", False, False), ("right", False, True), ("left", True, True), ("right", True, False),
    ("RIGHT", False, True)])
def test_flip_rule_makes_every_view_face_right(laterality, horizontal_flip, flipped):
    pixels = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    oriented, was_flipped = mammo.orient(pixels, laterality, horizontal_flip)
    assert was_flipped == flipped
    expected = pixels.flip(-1) if flipped else pixels
    assert torch.equal(oriented, expected)


def test_bad_laterality_is_refused():
    with pytest.raises(ValueError, match="laterality must be 'left' or 'right'"):
        mammo.needs_flip("both", False)


def test_view_kind_reads_any_mlo_spelling():
    assert [mammo.view_kind(v) for v in ("CC", "cc", "MLO", "mlo", "MLO-rotated", "XCCL", "ML")] == \
        ["CC", "CC", "MLO", "MLO", "MLO", "CC", "CC"]


# --------------------------------------------------------------------------- erosion and dilation

def random_masks():
    rng = np.random.default_rng(7)
    for shape in [(1, 1), (5, 7), (23, 31), (40, 40)]:
        for density in (0.5, 0.8, 0.97):
            noise = rng.random(shape)
            yield (ndimage.uniform_filter(noise, 3) if min(shape) >= 3 else noise) < density
    yield np.ones((12, 9), dtype=bool)
    yield np.zeros((12, 9), dtype=bool)


@pytest.mark.parametrize("iterations", [1, 2, 3, 6, 15])
def test_distance_transform_erosion_equals_scipys_iterated_erosion(iterations):
    for mask in random_masks():
        expected = ndimage.binary_erosion(mask, iterations=iterations)
        assert np.array_equal(mammo.erode(mask, iterations), expected), mask.shape


@pytest.mark.parametrize("iterations", [1, 2, 3, 6, 15])
def test_distance_transform_dilation_equals_scipys_iterated_dilation(iterations):
    for mask in random_masks():
        sparse = mask & (np.random.default_rng(iterations).random(mask.shape) < 0.05)
        for source in (sparse, ~mask):
            expected = ndimage.binary_dilation(source, iterations=iterations)
            assert np.array_equal(mammo.dilate(source, iterations), expected), source.shape


def test_zero_iterations_change_nothing():
    mask = np.random.default_rng(0).random((9, 9)) < 0.5
    assert np.array_equal(mammo.erode(mask, 0), mask)
    assert np.array_equal(mammo.dilate(mask, 0), mask)


# The full-size mask's speed (3328 x 2560, 100 iterations) is measured, not asserted: a wall-clock
# bound fails on a loaded machine. benchmarks/gmic_forward.py times the whole preprocessing of the
# 3328 x 2560 sample mammogram, this mask included (README, Benchmarks).


# --------------------------------------------------------------------------- background crop

def test_crop_keeps_the_breast_drops_the_speck_and_buffers_away_from_the_chest_wall():
    image = breast_image()  # faces right; the breast spans rows 31..269 (0.4 * 300 = 120 either side of 150)
    mask = mammo.breast_mask(image, iterations=5)
    reference = ndimage.binary_dilation(_largest(ndimage.binary_erosion(image > 0, iterations=5)), iterations=5)
    assert np.array_equal(mask, reference)
    assert not mask[10:14, 186:190].any()  # the speck is gone
    top, bottom, left, right = mammo.bounding_box(mask)
    breast_rows = np.flatnonzero((image > 0)[:, :100].any(axis=1))
    assert (top, left) == (breast_rows[0], 0) and bottom == breast_rows[-1] + 1
    assert right <= 120  # the breast reaches 0.6 * 200 = 120 columns
    assert mammo.crop_box(mask, buffer=7) == (top - 7, bottom + 7, 0, right + 7)
    assert mammo.crop_box(mask, buffer=50) == (0, 300, 0, right + 50)  # clipped to the image


def _largest(mask):
    labels, count = ndimage.label(mask)
    sizes = [(labels == i).sum() for i in range(1, count + 1)]
    return labels == 1 + int(np.argmax(sizes))


def test_largest_component_is_kept():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True
    mask[5:9, 5:9] = True
    mask[0, 8] = True
    assert np.array_equal(mammo.largest_component(mask), np.pad(np.ones((4, 4), bool), ((5, 1), (5, 1))))


def test_a_small_image_whose_mask_vanishes_falls_back_to_the_unereoded_bounding_box():
    image = np.zeros((40, 30))
    image[5:12, 0:9] = 100.0
    image[30, 20] = 50.0
    mask = mammo.breast_mask(image, iterations=100)
    assert np.array_equal(mask, image > 0)
    assert mammo.crop_box(mask, buffer=2) == (3, 33, 0, 23)
    blank = np.zeros((20, 10))
    assert mammo.crop_box(mammo.breast_mask(blank, 100), 50) == (0, 20, 0, 10)
    prepared = mammo.prepare(torch.zeros(20, 10), "left", "CC", (16, 8))
    assert torch.equal(prepared.image, torch.zeros(16, 8))


def test_extreme_points():
    mask = np.zeros((30, 20), dtype=bool)
    mask[2:5, 0:19] = True  # the top third: ignored for the rightmost point
    mask[10:28, 0:12] = True
    mask[14:17, 12:15] = True
    assert mammo.rightmost_points(mask) == ((14, 16), 14)
    assert mammo.bottommost_points(mask) == (27, (0, 11))
    upper_only = np.zeros((30, 20), dtype=bool)
    upper_only[1:4, 3:9] = True
    assert mammo.rightmost_points(upper_only) == ((1, 3), 8)


# --------------------------------------------------------------------------- optimal centre

def two_blocks(first_rows, second_rows, height=30, width=12):
    nonzero = np.zeros((height, width), dtype=bool)
    nonzero[first_rows, 2:8] = True
    nonzero[second_rows, 2:8] = True
    nonzero[0:10, 8:12] = True  # outside the window's columns: must not count
    return nonzero


def test_cc_centre_prefers_the_fullest_window():
    nonzero = two_blocks(slice(5, 9), slice(17, 20))  # 4 rows beat 3 rows
    # W = 6, rightmost x = 9: cx = 9 - 3 - 1 = 5, window columns 2..7; best window rows 5..8 -> cy = 5 + 2
    assert mammo.cc_center(nonzero, (4, 6), 9) == (7, 5)


def test_cc_centre_ties_go_to_the_centre_nearest_the_image_centre():
    nonzero = two_blocks(slice(5, 9), slice(17, 21))  # centres 7 and 19, image centre 15
    assert mammo.cc_center(nonzero, (4, 6), 9) == (19, 5)
    nonzero = two_blocks(slice(9, 13), slice(17, 21))  # centres 11 and 19: equally near 15 -> the upper
    assert mammo.cc_center(nonzero, (4, 6), 9) == (11, 5)
    uniform = np.ones((20, 6), dtype=bool)  # every window ties -> the one centred on row 10
    assert mammo.cc_center(uniform, (8, 6), 5) == (10, 1)


def test_cc_centre_of_an_image_shorter_than_the_window():
    nonzero = np.ones((5, 6), dtype=bool)
    assert mammo.cc_center(nonzero, (8, 4), 5) == (4, 2)


def test_mlo_centre_is_the_single_bottom_right_candidate():
    nonzero = np.zeros((50, 30), dtype=bool)
    nonzero[0:46, 0:8] = True  # pectoral muscle and breast near the chest wall reach row 45
    nonzero[5:41, 8:26] = True  # within the rightmost 10 columns the breast ends at row 40
    # H = 20, W = 10: cy = min(45, 40) - 10 - 1 = 29, cx = 25 - 5 - 1 = 19
    assert mammo.mlo_center(nonzero, (20, 10), rightmost_x=25, bottommost_y=45) == (29, 19)
    assert mammo.mlo_center(nonzero, (20, 10), rightmost_x=25, bottommost_y=35) == (24, 19)
    image = nonzero.astype(float)
    assert mammo.optimal_center(image, "MLO", (20, 10), ((0, 40), 25), (45, (0, 7))) == (29, 19)


# --------------------------------------------------------------------------- window placement

def test_window_around_the_centre_when_the_image_is_large_enough():
    placement = mammo.place_window((200, 150), (100, 70), "CC", (80, 60), (5, 5), 5)
    assert placement.padding == (0, 0, 0)
    assert placement.window == (60, 140, 40, 100)


def test_window_is_shifted_back_inside():
    assert mammo.place_window((200, 150), (10, -30), "CC", (80, 60)).window == (0, 80, 0, 60)
    assert mammo.place_window((200, 150), (190, 140), "MLO", (80, 60)).window == (120, 200, 90, 150)


def test_cc_vertical_padding_is_split_and_the_window_starts_at_the_margin():
    # m = 5 + 5 = 10: an image of 90 rows < 80 + 20 is padded by 10 rows, 5 above and 5 below
    placement = mammo.place_window((90, 150), (20, 70), "CC", (80, 60), (5, 5), 5)
    assert placement.padding == (5, 5, 0)
    assert placement.window[:2] == (10, 90)
    placement = mammo.place_window((91, 150), (20, 70), "CC", (80, 60), (5, 5), 5)
    assert placement.padding == (4, 5, 0) and placement.window[:2] == (10, 90)
    assert mammo.place_window((100, 150), (50, 70), "CC", (80, 60), (5, 5), 5).padding == (0, 0, 0)


def test_mlo_vertical_padding_is_at_the_bottom_and_the_window_starts_at_zero():
    placement = mammo.place_window((85, 150), (60, 70), "MLO", (80, 60), (5, 5), 5)
    assert placement.padding == (0, 5, 0)
    assert placement.window[:2] == (0, 80)
    assert mammo.place_window((90, 150), (60, 70), "MLO", (80, 60), (5, 5), 5).padding == (0, 0, 0)


def test_horizontal_padding_is_on_the_right_and_the_window_starts_at_zero():
    placement = mammo.place_window((200, 65), (100, 50), "CC", (80, 60), (5, 5), 5)
    assert placement.padding == (0, 0, 5)
    assert placement.window[2:] == (0, 60)
    assert placement.padded_shape((200, 65)) == (200, 70)


# --------------------------------------------------------------------------- noise

def test_position_noise_moves_both_borders_away_from_a_touched_edge_within_the_margin():
    shifts = set()
    for seed in range(200):
        top, bottom, left, right = mammo.add_position_noise((0, 80, 30, 90), (200, 93), (20, 20),
                                                            np.random.default_rng(seed))
        assert bottom - top == 80 and right - left == 60
        assert 0 <= top <= 20  # touches the top: moves down only, by at most the noise
        assert -20 <= left - 30 <= 3  # three columns free on the right
        shifts.add(left - 30)
    assert min(shifts) <= -15 and max(shifts) == 3


def test_position_noise_at_its_limit():
    # rows move up by the full 20; the window touches the left edge, so it moves right (by 30) all the same
    assert mammo.add_position_noise((50, 130, 0, 60), (200, 100), (20, 30), Ones(-1)) == (30, 110, 30, 90)
    assert mammo.add_position_noise((50, 130, 10, 70), (200, 100), (20, 30), Ones(1)) == (70, 150, 40, 100)


def test_size_noise_limits_are_the_published_ones():
    big = (10_000, 10_000)
    cc = mammo.add_size_noise((1000, 3677, 1000, 2942), big, (2677, 1942), 100, Ones())
    assert cc == (1100, 3777, 1073, 3015)  # 100 * 1942 / 2677 = 72.5 -> 73 px horizontally
    mlo = mammo.add_size_noise((1000, 3974, 1000, 2748), big, (2974, 1748), 100, Ones(-1))
    assert mlo == (900, 3874, 941, 2689)  # 100 * 1748 / 2974 = 58.8 -> 59 px
    # limited by the smallest of the four margins (here 20 on the left; 20 * 60 / 80 = 15 horizontally)
    assert mammo.add_size_noise((100, 180, 20, 80), (300, 200), (80, 60), 50, Ones()) == (120, 200, 35, 95)


def test_size_noise_never_collapses_a_small_window():
    for seed in range(50):
        top, bottom, left, right = mammo.add_size_noise((200, 216, 200, 228), (600, 600), (16, 28), 100,
                                                        np.random.default_rng(seed))
        assert bottom - top >= 2 and right - left >= 2


# --------------------------------------------------------------------------- extraction and standardisation

def test_extract_pads_with_zeros_and_resizes_bicubically():
    image = torch.arange(1, 31, dtype=torch.float32).reshape(5, 6)
    placement = mammo.Placement((2, 1, 3), (0, 4, 4, 9))
    window = mammo.extract(image, placement, placement.window, (4, 5))
    assert torch.equal(window[:2], torch.zeros(2, 5))
    assert torch.equal(window[2:, :2], image[:2, 4:6])
    assert torch.equal(window[2:, 2:], torch.zeros(2, 3))
    constant = torch.full((40, 30), 7.0)
    resized = mammo.extract(constant, mammo.Placement((0, 0, 0), (0, 40, 0, 30)), (3, 33, 2, 27), (20, 16))
    assert resized.shape == (20, 16)
    assert torch.allclose(resized, torch.full((20, 16), 7.0))
    ramp = torch.arange(40, dtype=torch.float32)[:, None].expand(40, 30).contiguous()
    resized = mammo.extract(ramp, mammo.Placement((0, 0, 0), (0, 40, 0, 30)), (0, 40, 0, 30), (20, 30))
    # align_corners=False: output row i samples input row 2i + 0.5; a linear ramp is reproduced
    # exactly away from the borders
    assert torch.allclose(resized[2:-2, 5], 2 * torch.arange(2, 18, dtype=torch.float32) + 0.5, atol=1e-4)


def test_standardise_gives_mean_zero_and_sd_one():
    image = torch.from_numpy(np.random.default_rng(3).gamma(2.0, 100.0, (50, 40)).astype(np.float32))
    standardised = mammo.standardise(image)
    assert abs(float(standardised.mean())) < 1e-5
    assert float(standardised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    values = image.double().numpy()
    assert np.allclose(standardised.numpy(), (values - values.mean()) / values.std(), atol=1e-5)
    assert torch.equal(mammo.standardise(torch.full((4, 4), 3.0)), torch.zeros(4, 4))


# --------------------------------------------------------------------------- the whole chain

def test_prepare_on_a_synthetic_breast():
    image = torch.from_numpy(breast_image(side="right").astype(np.float32))
    prepared = mammo.prepare(image, "right", "CC", (120, 80), iterations=5, buffer=4)
    assert prepared.flipped
    assert prepared.image.shape == (120, 80) and prepared.image.dtype == torch.float32
    top, bottom, left, right = prepared.crop
    assert right == 200 and left > 60  # in the original orientation the breast is on the right
    breast = breast_image(side="right", speck=False) > 0
    rows, cols = np.flatnonzero(breast.any(1)), np.flatnonzero(breast.any(0))
    assert top == rows[0] - 4 and bottom == rows[-1] + 1 + 4 and left == cols[0] - 4
    height = bottom - top
    assert prepared.window[1] - prepared.window[0] == 120 and 0 <= prepared.window[0] <= height - 120
    assert abs(float(prepared.image.mean())) < 1e-5
    assert float(prepared.image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    again = mammo.prepare(image, "right", "CC", (120, 80), iterations=5, buffer=4)
    assert torch.equal(again.image, prepared.image)


def test_prepare_with_a_generator_is_reproducible_and_noisy():
    image = torch.from_numpy(breast_image(400, 260, speck=False).astype(np.float32))

    def noisy(seed):
        return mammo.prepare(image, "left", "MLO", (200, 120), generator=np.random.default_rng(seed),
                             max_crop_noise=(10, 10), max_crop_size_noise=10, iterations=5, buffer=4)

    a, b, c = noisy(1), noisy(1), noisy(2)
    assert torch.equal(a.image, b.image) and a.window == b.window
    assert a.window != c.window
    assert a.image.shape == (200, 120)
    plain = mammo.prepare(image, "left", "MLO", (200, 120), iterations=5, buffer=4)
    assert plain.window[1] - plain.window[0] == 200 and plain.window[3] - plain.window[2] == 120


MAMMOGRAMS = SHARED_DATA / "mammograms"


@pytest.mark.skipif(not (MAMMOGRAMS / "dmv_1_R_CC.png").is_file(),
                    reason=f"published sample mammograms not available at {MAMMOGRAMS}")
def test_prepare_on_a_published_mammogram_frames_the_breast():
    from PIL import Image

    raw = np.array(Image.open(MAMMOGRAMS / "dmv_1_R_CC.png")).astype(np.float32)
    pixels = torch.from_numpy(raw)
    prepared = mammo.prepare(pixels, "right", "CC", (2677, 1942))
    top, bottom, left, right = prepared.crop
    breast = mammo.breast_mask(raw, 100)
    assert breast[:, : raw.shape[1] // 2].sum() < 0.05 * breast.sum()  # a right view faces left as acquired
    b_top, b_bottom, b_left, b_right = mammo.bounding_box(breast)
    assert top <= b_top and bottom >= b_bottom and left <= b_left and right == raw.shape[1] == b_right
    flipped = np.ascontiguousarray(breast[top:bottom, left:right][:, ::-1])
    w_top, w_bottom, w_left, w_right = prepared.window
    in_window = flipped[max(w_top, 0):w_bottom, max(w_left, 0):w_right].sum()
    assert in_window >= 0.95 * flipped.sum()  # the window frames the breast
    assert flipped[:, 0].any()  # chest wall on the left after flipping
    assert prepared.image.shape == (2677, 1942)
    assert float(prepared.image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
