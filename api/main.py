"""The amid REST API: `uvicorn api.main:app`, or `create_app()` for a configured instance.

Torch-free by construction: it imports the store, the run settings and FastAPI only (a test
runs `import api.main` with torch made unimportable).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from api.deps import single_valued_query
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit
from api.overload import ConcurrencyLimit, sized_thread_pool
from api.routes import artifacts, files, health, jobs, prometheus, ui, webhooks, workers
from api.routes.docs import install_docs

DESCRIPTION = """
Submit AMiD knowledge-distillation jobs and follow them: status, progress, events, metrics,
checkpoints, and the final student as a download.

Every `/v1` route needs an API key, sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`
(create one with `amid keys create NAME`). A key sees and cancels its own jobs; an admin key
sees all. Any key sees the pool of workers (`/v1/workers`); an admin key drains one. Errors have one shape: `{"error": ClassName, "detail": message, "field": field}`.
"""


def create_app() -> FastAPI:
    app = FastAPI(
        title="amid",
        version="1",
        description=DESCRIPTION,
        # Body parsing errors, 404s and 405s use the same error shape as everything else.
        separate_input_output_schemas=False,
        lifespan=sized_thread_pool,
        # /docs is served from this package's assets (install_docs), not from a CDN.
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(single_valued_query)],
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    # Added last, so it runs first: a request over the limit is refused before anything else.
    app.add_middleware(ConcurrencyLimit)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(files.router)
    app.include_router(workers.router)
    app.include_router(prometheus.router)
    app.include_router(webhooks.router)
    app.include_router(ui.router)
    install_docs(app)
    return app


app = create_app()
