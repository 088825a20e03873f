"""/ui: the dashboard, plain HTML, CSS and JavaScript shipped in this package (no CDN).

The page itself needs no key; every figure on it comes from the `/v1` routes, called by the
browser with the key the user enters once (kept in the browser's local storage).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

UI_FILES = files("api") / "ui"
MEDIA_TYPES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/")
def dashboard() -> FileResponse:
    return FileResponse(str(UI_FILES / "index.html"), media_type="text/html")


@router.get("/ui/{asset}")
def dashboard_asset(asset: str) -> FileResponse:
    if asset not in MEDIA_TYPES:
        # Only the files the page is made of: no path from a request reaches the filesystem.
        raise HTTPException(404, f"no dashboard file {asset!r}")
    return FileResponse(str(UI_FILES / asset), media_type=MEDIA_TYPES[asset])
