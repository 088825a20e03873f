"""/docs and /ui are served by the API from files in the installed packages, and the OpenAPI
document declares how a key is sent, so the docs page's Authorize button works."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.main import create_app

client = TestClient(create_app())


def test_docs_page_loads_its_assets_from_this_api() -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(source.startswith("/docs/assets/") for source in sources), sources
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 1000, source
    assert client.get("/redoc").status_code == 404  # no second page that would use a CDN


def test_openapi_declares_bearer_and_x_api_key() -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`",
    }
    assert schemes["APIKeyHeader"]["in"] == "header"
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key"
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert submit["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_dashboard_files_are_served_and_nothing_else() -> None:
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "/ui/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    script = client.get("/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "https://" not in script.text
    assert client.get("/ui/app.css").status_code == 200
    assert client.get("/ui/..%2Fmain.py").status_code == 404
    assert client.get("/ui/index.html").status_code == 404
