"""The reading station's web application (FastAPI): pages, the readers' API and the admin's.

Access: each reader has a token (tokens.csv), given to them as a link `/r/<token>` that sets
the HttpOnly cookie `pc_reader`; the admin's link `/admin/<token>` sets `pc_admin`. API calls
authenticate by that cookie or by `Authorization: Bearer <token>`. No credential is 401, a wrong
one 403; a reader's token is refused on admin routes and the admin's on reader routes.

A reader addresses only their own worklist, by position (1..n in their reading order), and
views by the ids listed for that exam; anything else is 404, whoever else it may belong to.
Responses never hold a severity, a label, the assignment or another reader's name or answers:
the design object the app holds has none of them but the reader names, and only the admin's
progress lists those.

Endpoints are plain functions (not coroutines): FastAPI runs them in its thread pool, so
rendering and SQLite writes for one reader do not hold up another.
"""

from __future__ import annotations

import hmac
import logging
from html import escape
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from perceptcore.errors import PerceptcoreError

from .design import Design
from .render import MAX_SIDE, MIN_SIDE, Renderer
from .store import Incomplete, Locked, Store

READER_COOKIE = "pc_reader"
ADMIN_COOKIE = "pc_admin"
STATIC = Path(__file__).resolve().parent / "static"
IMAGE_CACHE_CONTROL = "private, max-age=3600"
LARGEST_WINDOW = 2.0 ** 20
log = logging.getLogger("perceptcore.station")


class Answer(BaseModel):
    # strict: "50" and true are not numbers; NaN and Infinity (which Python's JSON parser accepts) are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    value: float


class Boxes(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    boxes: Annotated[list[Annotated[list[int], Field(min_length=4, max_length=4)]], Field(max_length=100)]


# --------------------------------------------------------------------------- authentication

class _Tokens:
    """Who a presented token belongs to, compared in constant time against every known token."""

    def __init__(self, design: Design):
        self.readers = [(reader, token.encode()) for reader, token in design.reader_tokens.items()]
        self.admin = design.admin_token.encode()

    def reader(self, token: str) -> str | None:
        presented = token.encode("utf-8", "replace")
        found = None
        for reader, known in self.readers:  # no early exit: the time taken does not tell which one matched
            if hmac.compare_digest(presented, known):
                found = reader
        return found

    def is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.admin)


def _presented(request: Request, cookie: str) -> str | None:
    """The token a request carries: the bearer header if there is one, else the cookie."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "expected the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        return token.strip()
    return request.cookies.get(cookie)


def current_reader(request: Request) -> str:
    token = _presented(request, READER_COOKIE)
    if not token:
        raise HTTPException(401, "not signed in: open your personal reading link",
                            headers={"WWW-Authenticate": "Bearer"})
    reader = request.app.state.tokens.reader(token)
    if reader is None:
        raise HTTPException(403, "this token is not a reader's token of this study")
    return reader


def current_admin(request: Request) -> None:
    token = _presented(request, ADMIN_COOKIE)
    if not token:
        raise HTTPException(401, "not signed in: open the admin link", headers={"WWW-Authenticate": "Bearer"})
    if not request.app.state.tokens.is_admin(token):
        raise HTTPException(403, "this token is not the admin token of this study")


Reader = Annotated[str, Depends(current_reader)]


def _sign_in(token: str, valid: bool, cookie: str, target: str, refusal: str):
    """A personal link: the token becomes a session cookie and the page opens, or a 403 page."""
    if not valid:
        return _page(403, refusal)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
    return response


def create_app(design: Design, renderer: Renderer | None = None) -> FastAPI:
    """The station for a design (`design.load_design(folder)`, which reports a bad one before anything
    is served)."""
    store = Store(design.folder)
    renderer = renderer or Renderer()
    tokens = _Tokens(design)
    app = FastAPI(title="perceptcore reading station", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.design, app.state.store, app.state.renderer, app.state.tokens = design, store, renderer, tokens

    # ------------------------------------------------------------------- errors

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors():
            location = error.get("loc", ())
            if error.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON (at character {location[-1]})")
                continue
            place = ".".join(str(part) for part in location)
            problems.append(f"{place}: {error.get('msg', 'invalid')}" if place else error.get("msg", "invalid"))
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(PerceptcoreError)
    def broken_design_file(request: Request, exc: PerceptcoreError):
        # The file's path and problem are for the study team's log, not for the reader's screen.
        log.error("%s: %s", request.url.path, exc)
        return JSONResponse({"detail": "this image cannot be read from the design folder; tell the study team"},
                            status_code=500)

    def reading_of(reader: str, position: int):
        reading = design.reading(reader, position)
        if reading is None:
            raise HTTPException(404, f"no exam at position {position} of your worklist")
        return reading

    def view_of(reading, view_id: int):
        for view in reading.views:
            if view.id == view_id:
                return view
        raise HTTPException(404, f"no view {view_id} in the exam at position {reading.position}")

    def next_open(reader: str, submitted) -> int | None:
        return next((r.position for r in design.worklists[reader] if r.position not in submitted), None)

    # ------------------------------------------------------------------- pages

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/r/{token}")
    def reader_link(token: str):
        return _sign_in(token, tokens.reader(token) is not None, READER_COOKIE, "/",
                        "This reading link is not valid for this study. Ask the study team for yours.")

    @app.get("/admin/{token}")
    def admin_link(token: str):
        return _sign_in(token, tokens.is_admin(token), ADMIN_COOKIE, "/admin",
                        "This admin link is not valid for this study.")

    def signed_in_page(request: Request, who, name: str):
        """The front end's page `name` for whoever `who(request)` accepts, else a page saying why."""
        try:
            who(request)
        except HTTPException as exc:
            return _arrived_from_elsewhere(request, exc) or _page(exc.status_code, exc.detail)
        return _static_page(name)

    @app.get("/")
    def index(request: Request):
        return signed_in_page(request, current_reader, "index.html")

    @app.get("/admin")
    def admin_page(request: Request):
        return signed_in_page(request, current_admin, "admin.html")

    # check_dir=False: the front end's files may be installed after the app is created.
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    # ------------------------------------------------------------------- reading

    @app.get("/api/worklist")
    def worklist(reader: Reader):
        answered, submitted = store.worklist_state(reader)
        readings = design.worklists[reader]
        return {"reader": reader, "calls": design.calls, "roi": design.roi, "max_boxes": design.max_boxes,
                "exams": [{"position": r.position, "exam": r.exam, "submitted": r.position in submitted,
                           "answered": answered.get(r.position, 0), "cases": len(r.cases)} for r in readings],
                "done": len(submitted), "total": len(readings), "next": next_open(reader, submitted)}

    @app.get("/api/exams/{position}")
    def exam(position: int, reader: Reader):
        reading = reading_of(reader, position)
        answers, boxes, submitted_at = store.exam_state(reader, position)
        return {"position": position, "exam": reading.exam, "submitted": submitted_at is not None,
                "views": [{"id": v.id, "case": v.case, "laterality": v.laterality, "view": v.view, "label": v.label,
                           "height": v.height, "width": v.width, "bits": v.bits,
                           "window": {"center": v.window_center, "width": v.window_width}} for v in reading.views],
                "cases": [{"case": c.case, "laterality": c.laterality, "label": c.label, "value": answers.get(c.case)}
                          for c in reading.cases],
                "boxes": {str(v.id): boxes.get(v.id, []) for v in reading.views}}

    @app.get("/api/exams/{position}/views/{view_id}/image")
    def image(position: int, view_id: int, reader: Reader,
              center: Annotated[float | None, Query(ge=-LARGEST_WINDOW, le=LARGEST_WINDOW, allow_inf_nan=False)] = None,
              width: Annotated[float | None, Query(ge=1, le=LARGEST_WINDOW, allow_inf_nan=False)] = None,
              max_side: Annotated[int | None, Query(ge=MIN_SIDE, le=MAX_SIDE)] = None):
        view = view_of(reading_of(reader, position), view_id)
        png = renderer.png(view.file, (view.height, view.width),
                           view.window_center if center is None else center,
                           view.window_width if width is None else width, max_side)
        return Response(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE_CONTROL})

    @app.put("/api/exams/{position}/cases/{case:path}")
    def save_answer(position: int, case: str, answer: Answer, reader: Reader):
        reading = reading_of(reader, position)
        if case not in {c.case for c in reading.cases}:
            raise HTTPException(404, f"no case {case!r} in the exam at position {position}")
        problem = _out_of_range(design.calls, answer.value)
        if problem:
            raise HTTPException(422, problem)
        try:
            saved_at = store.save_answer(reader, position, reading.exam, case, answer.value)
        except Locked:
            raise HTTPException(409, f"the exam at position {position} is submitted; its answers are locked") from None
        return {"saved": True, "position": position, "case": case, "value": answer.value, "saved_at": saved_at}

    @app.put("/api/exams/{position}/views/{view_id}/boxes")
    def save_boxes(position: int, view_id: int, body: Boxes, reader: Reader):
        view = view_of(reading_of(reader, position), view_id)
        if not design.roi:
            raise HTTPException(404, "this study does not collect ROI boxes")
        problem = _bad_boxes(body.boxes, design.max_boxes, view.height, view.width)
        if problem:
            raise HTTPException(422, problem)
        try:
            saved_at = store.save_boxes(reader, position, view_id, body.boxes)
        except Locked:
            raise HTTPException(409, f"the exam at position {position} is submitted; its boxes are locked") from None
        return {"saved": True, "position": position, "view": view_id, "boxes": body.boxes, "saved_at": saved_at}

    @app.post("/api/exams/{position}/submit")
    def submit(position: int, reader: Reader):
        reading = reading_of(reader, position)
        try:
            submitted_at = store.submit(reader, position, reading.exam, [c.case for c in reading.cases])
        except Locked:
            raise HTTPException(409, f"the exam at position {position} is already submitted") from None
        except Incomplete as exc:
            labels = {c.case: c.label for c in reading.cases}
            missing = ", ".join(f"{labels[case]} (case {case})" for case in exc.missing)
            raise HTTPException(409, f"not every breast has a call yet: {missing}") from None
        _, submitted = store.worklist_state(reader)
        return {"submitted": True, "position": position, "submitted_at": submitted_at,
                "next": next_open(reader, submitted)}

    # ------------------------------------------------------------------- admin

    @app.get("/api/admin/progress", dependencies=[Depends(current_admin)])
    def progress():
        summary = store.progress()
        rows = []
        for reader in design.readers:
            state = summary.get(reader, {"done": 0, "answered_cases": 0, "last_saved": None})
            readings = design.worklists[reader]
            rows.append({"reader": reader, "done": state["done"], "total": len(readings),
                         "answered_cases": state["answered_cases"],
                         "total_cases": sum(len(r.cases) for r in readings), "last_saved": state["last_saved"]})
        return {"readers": rows}

    return app


def _out_of_range(calls: str, value: float) -> str | None:
    if calls == "probability" and not 0 <= value <= 100:
        return f"{value:g} is out of range: a probability of malignancy is 0 to 100 (%)"
    if calls == "binary" and value not in (0, 1):
        return f"{value:g} is out of range: a binary call is 0 or 1"
    if calls == "birads" and not (value.is_integer() and 1 <= value <= 5):
        return f"{value:g} is out of range: a BI-RADS category is a whole number from 1 to 5"
    return None


def _bad_boxes(boxes: list, max_boxes: int, height: int, width: int) -> str | None:
    """What is wrong with ROI boxes: half-open pixel ranges [row0, row1) x [col0, col1) inside the image."""
    if len(boxes) > max_boxes:
        return f"{len(boxes)} boxes; at most {max_boxes} per view"
    for k, (row0, col0, row1, col1) in enumerate(boxes, start=1):
        if not (0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width):
            return (f"box {k} [{row0}, {col0}, {row1}, {col1}] must satisfy 0 <= row0 < row1 <= {height} and "
                    f"0 <= col0 < col1 <= {width} (half-open pixel ranges inside the image)")
    return None


def _arrived_from_elsewhere(request: Request, problem: HTTPException) -> HTMLResponse | None:
    """A page that loads itself again when a link on another site (a webmail, a chat) led here.

    Browsers do not send SameSite=Strict cookies anywhere along a navigation another site started,
    so the redirect from a personal link, clicked in an e-mail, arrives without the cookie the link
    has just set, and reloading does not help. Navigating again from this page is same-origin, so
    the cookie goes along. Sec-Fetch-Site is "same-origin" on that second request: no loop.
    """
    if problem.status_code != 401 or request.headers.get("sec-fetch-site") != "cross-site":
        return None
    target = escape(request.url.path)
    return HTMLResponse(f'<!doctype html><meta charset=utf-8><meta http-equiv="refresh" content="0; url={target}">'
                        f'<title>Opening the reading station</title><p><a href="{target}">Open the reading station</a>',
                        headers={"Cache-Control": "no-store"})


def _static_page(name: str):
    path = STATIC / name
    if not path.is_file():
        return _page(404, f"the station's front end ({name}) is not installed")
    return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-store"})


def _page(status: int, message: str) -> HTMLResponse:
    """A short error page in the station's own (dark) style: its top bar and a centred message."""
    title = {401: "Sign in", 403: "Not allowed", 404: "Not found"}.get(status, "Reading station")
    return HTMLResponse(f'<!doctype html><html lang="en"><meta charset="utf-8">'
                        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                        f'<title>{title} · perceptcore</title><link rel="icon" href="data:,">'
                        f'<link rel="stylesheet" href="/static/station.css">'
                        f'<body class="station"><header class="topbar"><div class="brand">perceptcore '
                        f'<span>reading station</span></div></header>'
                        f'<main class="message"><h2>{title}</h2><p>{escape(str(message))}</p></main>',
                        status_code=status)
