"""/docs: Swagger UI served from this API's own files, so it renders with no network access.

FastAPI's default page loads Swagger UI from a CDN, which leaves it blank on a machine that
cannot reach one. The assets here come from the `fastapi-offline` package (a Swagger UI 5 build,
which reads the OpenAPI 3.1 document FastAPI writes).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Serve /docs and its assets; the app must be created with `docs_url=None`."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=f"{DOCS_PATH}/oauth2-redirect",
            # Keep the key entered in Authorize across reloads of the page.
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get(f"{DOCS_PATH}/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
