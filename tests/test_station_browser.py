"""The reading station in a real browser (headless Chromium driven by Selenium), end to end.

One reader logs in with their personal link, reads and answers exams, draws an ROI box, reloads
mid-exam, loses the server to SIGKILL mid-session (and keeps answering while it is down), submits
every exam and finds a submitted exam locked; a second reader sees only their own worklist; the
admin view shows progress; `perceptcore read-export` turns the database into the reads table a spec
reads, and `perceptcore run` analyses it. Expected values come from the design's own files
(assignment.csv, images.csv), not from the station.

Skipped, saying so, where Selenium, Chromium or chromedriver is missing (Debian: `apt-get install
chromium chromium-driver`; Selenium Manager cannot download a browser here, so both are given explicitly).
Screenshots go to docs/screenshots/ with PERCEPTCORE_SCREENSHOTS=1, else to the test's tmp folder; the
reading screenshot (station_reading.png) is of the demo's phantom mammograms, from the second test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from perceptcore.cli import main

import station_design

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.mouse_button import MouseButton
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install selenium)"),
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None,
                       reason="chromedriver is not installed (Debian: apt-get install chromium-driver)"),
]

REPO = Path(__file__).resolve().parents[1]
HANGING_ORDER = ["R-CC", "L-CC", "R-MLO", "L-MLO"]
WINDOW = (1600, 1000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def perceptcore(*args):
    # in this process: the command line is the same, and a second interpreter's start-up is saved
    assert main([str(arg) for arg in args]) == 0, f"perceptcore {' '.join(map(str, args))} failed (see stderr)"


class Station:
    """`perceptcore read` as a subprocess on a fixed port, so that it can be killed and started again."""

    def __init__(self, design: Path, log: Path):
        self.design, self.log, self.port = design, log, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "perceptcore.cli", "read", str(self.design), "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the station exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as response:
                    if json.load(response) == {"ok": True}:
                        return
            except (OSError, ValueError):
                time.sleep(0.2)
        pytest.fail(f"the station did not answer /healthz within 60 s:\n{self.log.read_text()[-3000:]}")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def api(self, method, path, token, body=None):
        """(status, JSON) of an API call made outside the browser, with the bearer token."""
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot_folder(tmp_path: Path) -> Path:
    if os.environ.get("PERCEPTCORE_SCREENSHOTS") == "1":
        folder = REPO / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def wait_until(driver, script, timeout=15, message=""):
    """Waits until the JavaScript expression is truthy; returns its value."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {script}"))
    except TimeoutException:
        state = driver.execute_script("return [document.body.dataset.ready, document.body.dataset.exam, "
                                      "(document.querySelector('#save-status')||{}).textContent, "
                                      "(document.querySelector('#error')||{}).textContent, "
                                      "(document.querySelector('#message')||{}).textContent]")
        raise AssertionError(f"timed out waiting for {message or script}; page state {state}") from None


def assert_no_script_errors(driver):
    """No uncaught JavaScript error so far (failed requests are expected: the server is killed, a change refused)."""
    errors = [entry["message"] for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE" and entry.get("source") == "javascript"]
    assert not errors, errors


def wait_ready(driver):
    wait_until(driver, "document.body.dataset.ready === 'true'", message="the page to load")


def wait_images(driver):
    wait_until(driver, "document.querySelectorAll('.pane').length > 0 && "
                       "[...document.querySelectorAll('.pane')].every(p => p.dataset.loaded === 'true')",
               message="every view's image")


def wait_saved(driver, timeout=15):
    wait_until(driver, "document.querySelector('#save-status').dataset.state === 'saved' && "
                       "[...document.querySelectorAll('.case')].every(c => c.dataset.state !== 'saving')",
               timeout, message="the answers to be saved")


def case_block(driver, case):
    return driver.find_element(By.CSS_SELECTOR, f'.case[data-case="{case}"]')


def type_probability(driver, case, value):
    box = case_block(driver, case).find_element(By.CSS_SELECTOR, ".probability-number")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))


def shown_probability(driver, case):
    block = case_block(driver, case)
    return (block.find_element(By.CSS_SELECTOR, ".probability-number").get_attribute("value"),
            block.find_element(By.CSS_SELECTOR, ".probability-slider").get_attribute("value"))


def expected_hanging(images: pd.DataFrame) -> list:
    """The view labels of one exam in hanging order, worked out from images.csv."""
    labels = [f"{'R' if lat == 'right' else 'L'}-{view.upper()}" for lat, view in zip(images.laterality, images.view)]
    known = [label for label in HANGING_ORDER if label in labels]
    return known + [label for label in labels if label not in HANGING_ORDER]


def drag_box(driver, label, start, size):
    """Drags a rectangle on the view's canvas from `start` (CSS px from the canvas centre) by `size`;
    returns the box in image pixels that the drag covers, computed from the canvas geometry."""
    canvas = driver.find_element(By.CSS_SELECTOR, f'.pane[data-label="{label}"] canvas')
    pane = driver.find_element(By.CSS_SELECTOR, f'.pane[data-label="{label}"]')
    left, top, width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", canvas)
    rows, columns = int(pane.get_attribute("data-image-rows")), int(pane.get_attribute("data-image-columns"))
    ActionChains(driver).move_to_element_with_offset(canvas, *start).click_and_hold() \
        .move_by_offset(*size).release().perform()
    # WebDriver's element centre is the floor of the middle of its box (in viewport pixels)
    x0, y0 = math.floor(left + width / 2) + start[0] - left, math.floor(top + height / 2) + start[1] - top
    x1, y1 = x0 + size[0], y0 + size[1]
    # the image is fitted to the canvas and centred
    fit = min(width / columns, height / rows)
    off_x, off_y = (width - columns * fit) / 2, (height - rows * fit) / 2
    top_row, bottom_row = sorted(((y0 - off_y) / fit, (y1 - off_y) / fit))
    left_col, right_col = sorted(((x0 - off_x) / fit, (x1 - off_x) / fit))
    return ([math.floor(top_row), math.floor(left_col), math.ceil(bottom_row), math.ceil(right_col)],
            int(pane.get_attribute("data-view")), math.ceil(1 / fit) + 1)


def shown_boxes(driver) -> list:
    """The box list's entries as (view label, 'rows a–b, columns c–d')."""
    return [(item.find_element(By.CSS_SELECTOR, ".box-name").text.split(" #")[0],
             item.find_element(By.CSS_SELECTOR, ".box-extent").text)
            for item in driver.find_elements(By.CSS_SELECTOR, "#boxes li[data-view]")]


def test_a_whole_reading_session_in_chromium(browser, tmp_path):
    design = station_design.make_design(tmp_path, readers=2, exams=3, calls="probability", roi=True,
                                        size=(400, 300), scheme="balanced")
    tokens = station_design.tokens(design)
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    images = pd.read_csv(design / "images.csv", dtype=str)
    reader, other = "reader01", "reader02"
    mine = assignment[assignment.reader == reader].assign(order=lambda t: t.order.astype(int)).sort_values("order")
    shots = screenshot_folder(tmp_path)

    station = Station(design, tmp_path / "station.log")
    station.start()
    try:
        driver = browser
        driver.get(f"{station.base}/r/{tokens[reader]}")
        wait_ready(driver)

        # the worklist is this reader's, in their reading order; the first exam is open
        assert driver.find_element(By.ID, "reader-name").text == reader
        progress = driver.find_element(By.ID, "progress")
        assert (progress.get_attribute("data-done"), progress.get_attribute("data-total")) == ("0", str(len(mine)))
        listed = [item.find_element(By.CSS_SELECTOR, ".exam-name").text
                  for item in driver.find_elements(By.CSS_SELECTOR, "#worklist li")]
        assert listed == list(mine.exam)
        assert driver.execute_script("return document.body.dataset.exam") == "1"
        assert "severity" not in driver.find_element(By.TAG_NAME, "body").text.lower()

        # the views hang in the standard order and their images load
        first = images[(images.reader == reader) & (images.order.astype(int) == 1)]
        labels = [pane.get_attribute("data-label") for pane in driver.find_elements(By.CSS_SELECTOR, ".pane")]
        assert labels == expected_hanging(first)
        wait_images(driver)

        # a window preset re-renders every view at the new window; the wheel zooms; reset undoes both
        default_width = 2 ** int(first.bits.iloc[0])
        driver.find_element(By.CSS_SELECTOR, '.preset[data-preset="narrow"]').click()
        wait_until(driver, f"[...document.querySelectorAll('.pane')].every(p => p.dataset.loaded === 'true' && "
                           f"p.dataset.src.includes('width={round(default_width / 1.5)}'))",
                   message="the narrower window's images")
        r_cc = driver.find_element(By.CSS_SELECTOR, '.pane[data-label="R-CC"] canvas')
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(r_cc), 0, -300).perform()
        wait_until(driver, "Number(document.querySelector('.pane[data-label=\"R-CC\"]').dataset.zoom) > 1.2",
                   message="the wheel to zoom in")
        driver.find_element(By.ID, "reset-view").click()
        wait_until(driver, f"[...document.querySelectorAll('.pane')].every(p => p.dataset.zoom === '1.000' && "
                           f"p.dataset.src.includes('width={default_width}'))", message="the reset")
        # right-drag: rightwards widens the window, downwards raises the level, on every view at once
        drag = ActionBuilder(driver)
        drag.pointer_action.move_to(r_cc).pointer_down(MouseButton.RIGHT).move_by(80, 40) \
            .pointer_up(MouseButton.RIGHT)
        drag.perform()
        wait_until(driver, f"[...document.querySelectorAll('.pane')].every(p => p.dataset.loaded === 'true' && "
                           f"Number(p.dataset.width) > {default_width} && Number(p.dataset.center) > "
                           f"{default_width // 2} && p.dataset.src.includes('width=' + p.dataset.width))",
                   message="the right-drag's window")
        driver.find_element(By.CSS_SELECTOR, '.preset[data-preset="default"]').click()

        # answer both breasts: one typed, one slid; each is saved at once
        right, left = (f"{mine.exam.iloc[0]}/right", f"{mine.exam.iloc[0]}/left")
        type_probability(driver, right, 73)
        slider = case_block(driver, left).find_element(By.CSS_SELECTOR, ".probability-slider")
        ActionChains(driver).move_to_element_with_offset(slider, slider.size["width"] // 4, 0).click().perform()
        slid = float(slider.get_attribute("value"))
        assert 60 <= slid <= 90, slid
        wait_saved(driver)
        assert driver.find_element(By.ID, "submit").is_enabled()
        status, exam = station.api("GET", "/api/exams/1", tokens[reader])
        assert status == 200
        assert {c["case"]: c["value"] for c in exam["cases"]} == {right: 73, left: slid}

        # draw a box on R-CC in ROI mode: saved in image pixels
        driver.find_element(By.ID, "roi-mode").click()
        expected_box, view_id, tolerance = drag_box(driver, "R-CC", (-40, -60), (70, 90))
        wait_until(driver, "document.querySelectorAll('#boxes li[data-view]').length === 1", message="the box")
        wait_saved(driver)
        # a second box, deleted again from the list
        drag_box(driver, "R-CC", (-60, 80), (40, 40))
        wait_until(driver, "document.querySelectorAll('#boxes li[data-view]').length === 2", message="a second box")
        driver.find_element(By.CSS_SELECTOR, '#boxes li[data-box="1"] .delete-box').click()
        wait_until(driver, "document.querySelectorAll('#boxes li[data-view]').length === 1", message="the deletion")
        wait_saved(driver)
        status, exam = station.api("GET", "/api/exams/1", tokens[reader])
        saved_boxes = exam["boxes"][str(view_id)]
        assert len(saved_boxes) == 1
        assert all(abs(a - b) <= tolerance for a, b in zip(saved_boxes[0], expected_box)), (saved_boxes, expected_box)

        # reload mid-exam: the same exam, the answers and the box come back from the server
        driver.refresh()
        wait_ready(driver)
        wait_images(driver)
        assert driver.execute_script("return document.body.dataset.exam") == "1"
        assert shown_probability(driver, right) == ("73", "73")
        assert float(shown_probability(driver, left)[0]) == slid
        row0, col0, row1, col1 = saved_boxes[0]
        box_shown = [("R-CC", f"rows {row0}–{row1}, columns {col0}–{col1}")]
        assert shown_boxes(driver) == box_shown
        driver.save_screenshot(str(tmp_path / "station_reading_noise.png"))  # the README's is the phantoms'

        # the server dies (SIGKILL) mid-session; an answer made while it is down is kept and sent
        # when it is back; after a reload everything is still there
        station.kill()
        type_probability(driver, left, 41)
        wait_until(driver, "document.querySelector('#save-status').dataset.state === 'offline'",
                   message="the page to notice the server is gone")
        station.start()
        wait_saved(driver, timeout=20)
        driver.refresh()
        wait_ready(driver)
        assert shown_probability(driver, right) == ("73", "73")
        assert shown_probability(driver, left) == ("41", "41")
        assert shown_boxes(driver) == box_shown

        # submit every exam; each submission opens the next
        answers = {right: 73, left: 41}
        for position, exam_id in enumerate(mine.exam, start=1):
            assert driver.execute_script("return document.body.dataset.exam") == str(position)
            if position > 1:
                wait_images(driver)
                answers[f"{exam_id}/right"], answers[f"{exam_id}/left"] = 10 * position, 100 - 10 * position
                type_probability(driver, f"{exam_id}/right", answers[f"{exam_id}/right"])
                assert driver.find_element(By.ID, "submit").get_attribute("disabled") is not None
                type_probability(driver, f"{exam_id}/left", answers[f"{exam_id}/left"])
                wait_saved(driver)
            driver.find_element(By.ID, "submit").click()
            wait_until(driver, f"document.querySelector('#progress').dataset.done === '{position}'",
                       message=f"exam {position} to be submitted")
        wait_until(driver, "document.body.dataset.allDone === 'true'", message="the end of the worklist")
        assert driver.find_element(By.ID, "progress-text").text == f"{len(mine)} / {len(mine)} exams"

        # a submitted exam opens read-only, and the server refuses changes to it
        driver.find_element(By.CSS_SELECTOR, '#worklist li[data-position="1"] button').click()
        wait_until(driver, "document.body.dataset.exam === '1' && document.body.dataset.submitted === 'true'",
                   message="the submitted exam to open")
        assert driver.find_element(By.ID, "locked").is_displayed()
        assert all(box.get_attribute("disabled") is not None
                   for box in driver.find_elements(By.CSS_SELECTOR, ".case input"))
        assert driver.find_element(By.ID, "submit").get_attribute("disabled") is not None
        assert driver.find_element(By.ID, "roi-mode").get_attribute("disabled") is not None
        assert shown_probability(driver, right) == ("73", "73")
        assert station.api("PUT", f"/api/exams/1/cases/{right}", tokens[reader], {"value": 5})[0] == 409

        assert_no_script_errors(driver)

        # the second reader's link: their own worklist, nothing of the first reader's answers
        theirs = assignment[assignment.reader == other].assign(order=lambda t: t.order.astype(int)).sort_values("order")
        driver.get(f"{station.base}/r/{tokens[other]}")
        wait_ready(driver)
        assert driver.find_element(By.ID, "reader-name").text == other
        assert [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#worklist .exam-name")] == \
            list(theirs.exam)
        assert driver.find_element(By.ID, "progress").get_attribute("data-done") == "0"
        their_cases = [c.get_attribute("data-case") for c in driver.find_elements(By.CSS_SELECTOR, ".case")]
        assert their_cases and all(shown_probability(driver, case)[0] == "" for case in their_cases)
        for case, value in zip(their_cases, (25, 35)):
            type_probability(driver, case, value)
        wait_saved(driver)

        # the exam is submitted elsewhere (another tab); a change made here is refused (409), the page
        # says so and shows the exam as the server holds it: locked, with the saved answers
        assert station.api("POST", "/api/exams/1/submit", tokens[other])[0] == 200
        type_probability(driver, their_cases[0], 45)
        wait_until(driver, "document.body.dataset.submitted === 'true' && "
                           "!document.querySelector('#error').hidden", message="the refusal to be shown")
        assert "submitted" in driver.find_element(By.ID, "error").text
        assert shown_probability(driver, their_cases[0])[0] == "25"

        # the admin view: progress per reader, refreshed while it is open
        driver.get(f"{station.base}/admin/{tokens['admin']}")
        wait_ready(driver)
        row = f'#admin-rows tr[data-reader="{reader}"]'
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .done").text == f"{len(mine)} / {len(mine)}"
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .answered").get_attribute("data-answered") == \
            str(2 * len(mine))
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .last-saved").text != "—"
        row = f'#admin-rows tr[data-reader="{other}"]'
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .done").text == f"1 / {len(theirs)}"
        assert driver.find_element(By.CSS_SELECTOR, f"{row} .answered").get_attribute("data-answered") == "2"
        second = theirs.exam.iloc[1]
        assert station.api("PUT", f"/api/exams/2/cases/{second}/left", tokens[other], {"value": 60})[0] == 200
        wait_until(driver, f"document.querySelector('{row} .answered').dataset.answered === '3'", timeout=12,
                   message="the admin view to refresh")
        driver.save_screenshot(str(shots / "station_admin.png"))
        assert_no_script_errors(driver)
    finally:
        station.stop()

    # export what was submitted and analyse it with a spec
    reads, rois = tmp_path / "reads.csv", tmp_path / "rois"
    perceptcore("read-export", design, "--out", reads, "--rois", rois)
    table = pd.read_csv(reads, dtype={"reader": str, "severity": str, "case": str})
    severity_of = dict(zip(assignment.reader + "|" + assignment.exam, assignment.severity))
    submitted = [(reader, case, value) for case, value in answers.items()] + \
        [(other, case, value) for case, value in zip(their_cases, (25, 35))]
    expected = pd.DataFrame([(who, severity_of[f"{who}|{case.split('/')[0]}"], case, value / 100)
                             for who, case, value in submitted], columns=["reader", "severity", "case", "prediction"])
    order = ["reader", "case"]
    got = table[["reader", "severity", "case", "prediction"]].sort_values(order).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.sort_values(order).reset_index(drop=True), check_dtype=False)
    manifest = pd.read_csv(rois / f"{reader}.csv", dtype=str, keep_default_na=False)
    boxed = manifest[manifest.roi_boxes != ""]
    assert len(boxed) == 1 and boxed.iloc[0].case == right and boxed.iloc[0].view.upper() == "CC"
    assert boxed.iloc[0].roi_boxes == " ".join(map(str, saved_boxes[0]))

    spec = station_design.write_reads_spec(tmp_path, reads, tmp_path / "cases.csv")
    perceptcore("run", spec, "--out", tmp_path / "run")
    confidence = pd.read_csv(tmp_path / "run" / "predictive_confidence.csv", dtype={"severity": str})
    assert set(confidence.observer) == {"radiologists"}
    assert set(confidence.severity) == set(station_design.SEVERITIES[1:])


def test_the_demo_phantoms_are_read_in_chromium(browser, tmp_path):
    """The demo's design (examples/demo/reading_station.yaml: phantom mammograms, one breast per exam,
    CC and MLO): every pane shows its own view, rendered at the default window, and a reader's call and
    box around the lesion are saved. With PERCEPTCORE_SCREENSHOTS=1 this is the README's screenshot."""
    _, design = station_design.demo_design(tmp_path / "demo", readers=2)
    token = station_design.tokens(design)["reader01"]
    images = pd.read_csv(design / "images.csv", dtype=str, keep_default_na=False)
    first = images[(images.reader == "reader01") & (images.order == "1")]
    manifest = pd.read_csv(json.loads((design / "design.json").read_text())["manifest"], dtype=str,
                           keep_default_na=False)
    station = Station(design, tmp_path / "station.log")
    station.start()
    try:
        driver = browser
        driver.get(f"{station.base}/r/{token}")
        wait_ready(driver)
        wait_images(driver)
        panes = driver.find_elements(By.CSS_SELECTOR, ".pane")
        assert [pane.get_attribute("data-label") for pane in panes] == expected_hanging(first)
        for pane in panes:
            row = images.loc[int(pane.get_attribute("data-view"))]  # a view's id is its row in images.csv
            assert (row.reader, row.order) == ("reader01", "1")
            assert pane.get_attribute("data-label") == f"{row.laterality[0].upper()}-{row.view.upper()}"
            assert (pane.get_attribute("data-image-rows"), pane.get_attribute("data-image-columns")) == \
                (row.height, row.width)
            bits, view_id = int(row.bits), pane.get_attribute("data-view")
            assert pane.get_attribute("data-src").startswith(  # the server's rendering at the default window
                f"/api/exams/1/views/{view_id}/image?center={2 ** (bits - 1)}&width={2 ** bits}")
            # the canvas shows a breast, not a blank: a good part of it lit, in many grey levels
            lit, levels = driver.execute_script(
                "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let lit = 0; const levels = new Set();"
                "for (let i = 0; i < d.length; i += 4) { if (d[i] > 16) lit++; levels.add(d[i]); }"
                "return [lit / (d.length / 4), levels.size];", pane.find_element(By.TAG_NAME, "canvas"))
            assert lit > 0.15 and levels > 50, (row.view, lit, levels)

        # a call for the exam's breast, and a box around the lesion on the CC view (its manifest ROI, a
        # little larger; the centre of the image for a normal breast)
        case = driver.find_element(By.CSS_SELECTOR, ".case").get_attribute("data-case")
        assert [case] == sorted(set(first.case))
        type_probability(driver, case, 85)
        cc = first[first.view.str.upper() == "CC"].iloc[0]
        lesion = manifest[(manifest.case == cc.case) & (manifest.view == cc.view)].roi_boxes.iloc[0].split(";")[0]
        rows, columns = int(cc.height), int(cc.width)
        row0, col0, row1, col1 = map(int, lesion.split()) if lesion else (rows // 3, columns // 3, 2 * rows // 3,
                                                                          2 * columns // 3)
        label = f"{cc.laterality[0].upper()}-{cc.view.upper()}"
        canvas = driver.find_element(By.CSS_SELECTOR, f'.pane[data-label="{label}"] canvas')
        left, top, width, height = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", canvas)
        fit = min(width / columns, height / rows)
        off_x, off_y = (width - columns * fit) / 2, (height - rows * fit) / 2
        margin = 6
        x0, y0 = off_x + max(col0 - margin, 0) * fit, off_y + max(row0 - margin, 0) * fit
        x1, y1 = off_x + min(col1 + margin, columns) * fit, off_y + min(row1 + margin, rows) * fit
        start = (round(x0 + left - math.floor(left + width / 2)), round(y0 + top - math.floor(top + height / 2)))
        driver.find_element(By.ID, "roi-mode").click()
        drawn, view_id, tolerance = drag_box(driver, label, start, (round(x1 - x0), round(y1 - y0)))
        wait_until(driver, "document.querySelectorAll('#boxes li[data-view]').length === 1", message="the box")
        wait_saved(driver)
        driver.save_screenshot(str(screenshot_folder(tmp_path) / "station_reading.png"))
        assert_no_script_errors(driver)

        status, exam = station.api("GET", "/api/exams/1", token)
        assert status == 200 and {c["case"]: c["value"] for c in exam["cases"]} == {case: 85}
        saved = exam["boxes"][str(view_id)]
        assert len(saved) == 1 and all(abs(a - b) <= tolerance for a, b in zip(saved[0], drawn)), (saved, drawn)
        assert saved[0][0] <= row0 and saved[0][1] <= col0 and saved[0][2] >= row1 and saved[0][3] >= col1, \
            (saved, lesion)

        # a wrong link's 403 page has the station's dark look
        driver.get(f"{station.base}/r/{'x' * len(token)}")
        assert driver.find_element(By.TAG_NAME, "h2").text == "Not allowed"
        assert driver.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(11, 13, 16)"
        driver.save_screenshot(str(tmp_path / "station_403.png"))
    finally:
        station.stop()
