"""The reading station under 10 readers at once, and the time to render one full-field view.

    python benchmarks/station_load.py [--readers 10] [--exams 3] [--saves-per-case 5]

Builds a design folder in a temporary directory, in the station's format (design.json,
tokens.csv, assignment.csv, exams.csv, images.csv; see plugins/station/design.py): every reader
reads every exam, 4 views per exam (R-CC, L-CC, R-MLO, L-MLO), each a 3328 x 2560 12-bit
16-bit PNG with a breast on a black background. The design step itself (design-reader-study)
would perturb every view with an FFT, minutes for 120 full-field views, and the station serves
whatever files the design holds, so the folder is written directly: 4 synthetic views saved
as design-reader-study saves them (Pillow's default PNG compression), copied to a file of its
own for every reader and exam, so no reader is served another's cached pixels.

Then:
1. Render one view in-process (plugins/station/render.py), median of 3: uncached (a new
   Renderer: decode + window + encode), pixels cached with a new window, and cached PNG; at
   full resolution and at max_side 1600.
2. Serve the design with uvicorn in a subprocess on a free localhost port. Each of the readers
   (one thread and one httpx client each, started together) reads their worklist, and for each
   exam fetches its 4 views at max_side 1600, then the 4 at full resolution. All wait for each
   other; then every reader saves an answer for every case `--saves-per-case` times (the last
   value is the one kept, as a reader moving a slider), all at once; then submits every exam.
   Prints the image responses' median and slowest, the answers saved per second (all answer
   requests / the wall time from the first one's start to the last one's end), and checks
   through the API that every reader's last answers were kept and nobody else's were seen.
The temporary folder and the server are removed at the end, also after an error.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HEIGHT, WIDTH, BITS = 3328, 2560, 12
VIEWS = (("right", "CC"), ("left", "CC"), ("right", "MLO"), ("left", "MLO"))
SEVERITIES = ["0", "0.5", "1", "2"]
SCREEN_SIDE = 1600
SERVER = ("import sys, uvicorn; from pathlib import Path; from perceptcore_plugins.station.app import create_app; from perceptcore_plugins.station.design import load_design; "
          "uvicorn.run(create_app(load_design(Path(sys.argv[1]))), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")


# --------------------------------------------------------------------------- the design folder

def synthetic_view(rng: np.random.Generator, side: str) -> np.ndarray:
    """A 12-bit breast (half ellipse against the chest wall) with smooth texture and noise, on black."""
    from PIL import Image

    rows, cols = np.ogrid[0:HEIGHT, 0:WIDTH]
    wall = 0 if side == "right" else WIDTH - 1  # the chest wall on the side the breast hangs from
    breast = ((rows - HEIGHT / 2) / (0.45 * HEIGHT)) ** 2 + ((cols - wall) / (0.8 * WIDTH)) ** 2 <= 1
    coarse = Image.fromarray(rng.standard_normal((26, 20)).astype(np.float32))
    texture = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))
    noise = rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)
    tissue = 2000 + 400 * texture + 40 * noise
    return np.where(breast, np.clip(tissue, 1, 2 ** BITS - 1), 0).astype(np.uint16)


def write_design(folder: Path, readers: int, exams: int, seed: int = 0) -> dict:
    """The design files; {reader: token, "admin": token}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"reader{i:02d}" for i in range(1, readers + 1)]
    sources = []
    for k, (side, view) in enumerate(VIEWS):
        path = folder / f"source_{side}_{view}.png"
        Image.fromarray(synthetic_view(rng, side)).save(path)  # as reader_study.write_images saves
        sources.append(path)
    tokens = {name: secrets.token_urlsafe(24) for name in names}
    tokens["admin"] = secrets.token_urlsafe(24)
    (folder / "design.json").write_text(json.dumps({
        "version": 1, "calls": "probability", "roi": True, "max_boxes": 3, "severities": SEVERITIES,
        "perturbation": None, "options": {}, "manifest": None, "seed": seed, "scheme": "uniform", "readers": names}))
    token_lines = ["role,reader,token"] + [f"reader,{n},{tokens[n]}" for n in names] + [f"admin,,{tokens['admin']}"]
    (folder / "tokens.csv").write_text("\n".join(token_lines) + "\n")
    os.chmod(folder / "tokens.csv", 0o600)
    exam_ids = [f"E{e}" for e in range(1, exams + 1)]
    (folder / "exams.csv").write_text("exam,case\n" + "".join(f"{e},{e}/right\n{e},{e}/left\n" for e in exam_ids))
    assignment = ["reader,order,exam,severity"]
    images = ["reader,order,exam,case,laterality,view,file,bits,height,width,window_center,window_width"]
    for name in names:
        (folder / "images" / name).mkdir(parents=True)
        for order, e in enumerate(rng.permutation(exams) + 1, start=1):
            exam = f"E{e}"
            assignment.append(f"{name},{order},{exam},{SEVERITIES[rng.integers(len(SEVERITIES))]}")
            for (side, view), source in zip(VIEWS, sources):
                file = f"images/{name}/{order:04d}_{exam}_{exam}-{side}_{side}_{view}.png"
                shutil.copyfile(source, folder / file)
                images.append(f"{name},{order},{exam},{exam}/{side},{side},{view},{file},{BITS},{HEIGHT},{WIDTH},,")
    (folder / "assignment.csv").write_text("\n".join(assignment) + "\n")
    (folder / "images.csv").write_text("\n".join(images) + "\n")
    return tokens


# --------------------------------------------------------------------------- rendering in-process

def median_ms(call, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def render_figures(file: Path) -> None:
    from perceptcore_plugins.station.render import Renderer

    shape, center, width = (HEIGHT, WIDTH), 2 ** (BITS - 1), 2 ** BITS
    for label, side in (("full resolution", None), (f"max_side {SCREEN_SIDE}", SCREEN_SIDE)):
        uncached = median_ms(lambda: Renderer().png(file, shape, center, width, side))
        renderer = Renderer()
        renderer.pixels(file, shape)
        windows = iter(range(1000, 4000, 7))  # a new window each call: only the pixels are cached
        new_window = median_ms(lambda: renderer.png(file, shape, next(windows), 1500, side))
        renderer.png(file, shape, center, width, side)
        cached = median_ms(lambda: renderer.png(file, shape, center, width, side))
        size = len(renderer.png(file, shape, center, width, side))
        print(f"render one {HEIGHT} x {WIDTH} {BITS}-bit view, {label}: uncached {uncached:.0f} ms, pixels cached "
              f"+ new window {new_window:.0f} ms, cached {cached:.3f} ms (PNG {size / 1e6:.2f} MB; median of 3)")


# --------------------------------------------------------------------------- the load test

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(design: Path, log: Path) -> tuple:
    import httpx

    port = free_port()
    with open(log, "wb") as output:  # the child keeps its own handle
        process = subprocess.Popen([sys.executable, "-c", SERVER, str(design), str(port)], stdout=output,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.1)
    process.terminate()
    raise SystemExit("the server did not start within 60 s")


def load_test(port: int, tokens: dict, readers: list, saves_per_case: int) -> None:
    import httpx

    images = {"screen": [], "full": []}
    answers, submits, errors = [], [], []
    kept: dict = {}
    lock = threading.Lock()
    start_reading, start_answering = threading.Barrier(len(readers)), threading.Barrier(len(readers))

    def timed(record, call):
        start = time.perf_counter()
        response = call()
        end = time.perf_counter()
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                               f"{response.text[:200]}")
        with lock:
            record.append((start, end))
        return response

    def read(index: int, reader: str):
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300,
                              headers={"Authorization": f"Bearer {tokens[reader]}"}) as http:
                start_reading.wait()
                worklist = http.get("/api/worklist").json()
                exams = []
                for item in worklist["exams"]:
                    exam = http.get(f"/api/exams/{item['position']}").json()
                    exams.append(exam)
                    for kind, params in (("screen", {"max_side": SCREEN_SIDE}), ("full", {})):
                        for view in exam["views"]:
                            url = f"/api/exams/{exam['position']}/views/{view['id']}/image"
                            timed(images[kind], lambda: http.get(url, params=params))
                start_answering.wait()
                for exam in exams:
                    for k, case in enumerate(exam["cases"]):
                        for attempt in range(saves_per_case):
                            value = (index * 7 + exam["position"] * 3 + k + attempt) % 101
                            url = f"/api/exams/{exam['position']}/cases/{case['case']}"
                            timed(answers, lambda: http.put(url, json={"value": value}))
                        kept[(reader, exam["position"], case["case"])] = float(value)
                start_answering.wait()
                for exam in exams:
                    timed(submits, lambda: http.post(f"/api/exams/{exam['position']}/submit"))
        except Exception as exc:  # reported below; the barriers must not wait for a dead reader
            errors.append(f"{reader}: {exc!r}")
            start_reading.abort()
            start_answering.abort()

    threads = [threading.Thread(target=read, args=(i, r)) for i, r in enumerate(readers)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit("load test failed:\n" + "\n".join(errors))
    print(f"load: {len(readers)} readers at once, {time.perf_counter() - began:.1f} s in all")
    every = images["screen"] + images["full"]
    for label, record in (("all images", every), (f"max_side {SCREEN_SIDE}", images["screen"]),
                          ("full resolution", images["full"])):
        durations = [end - start for start, end in record]
        print(f"  {label}: {len(durations)} responses, median {statistics.median(durations):.3f} s, "
              f"slowest {max(durations):.3f} s")
    durations = [end - start for start, end in answers]
    span = max(end for _, end in answers) - min(start for start, _ in answers)
    print(f"  answers: {len(answers)} saved in {span:.2f} s = {len(answers) / span:.0f} answers saved per second "
          f"(each: median {1000 * statistics.median(durations):.0f} ms, slowest {1000 * max(durations):.0f} ms); "
          f"{len(submits)} exams submitted")
    checked = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for reader in readers:
            headers = {"Authorization": f"Bearer {tokens[reader]}"}
            for item in http.get("/api/worklist", headers=headers).json()["exams"]:
                exam = http.get(f"/api/exams/{item['position']}", headers=headers).json()
                for case in exam["cases"]:
                    if not exam["submitted"] or case["value"] != kept[(reader, item["position"], case["case"])]:
                        raise SystemExit(f"{reader}, position {item['position']}, case {case['case']}: "
                                         f"{case['value']} kept, {kept[(reader, item['position'], case['case'])]} "
                                         "was the last saved")
                    checked += 1
    print(f"  checked: all {checked} cases hold their reader's last answer; every exam submitted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--exams", type=int, default=3, help="exams per reader (4 views each)")
    parser.add_argument("--saves-per-case", type=int, default=5)
    args = parser.parse_args()

    began = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="station_load_"))
    process = None
    try:
        tokens = write_design(folder, args.readers, args.exams)
        # Written out now, so that the answers' fsyncs do not wait for the design's 800 MB to reach the disk.
        os.sync()
        print(f"design: {args.readers} readers x {args.exams} exams x {len(VIEWS)} views of {HEIGHT} x {WIDTH} "
              f"({BITS}-bit) written in {time.perf_counter() - began:.1f} s; {os.cpu_count()} CPUs")
        render_figures(sorted((folder / "images" / "reader01").iterdir())[0])
        process, port = start_server(folder, folder / "server.log")
        load_test(port, tokens, [r for r in tokens if r != "admin"], args.saves_per_case)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"total {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
