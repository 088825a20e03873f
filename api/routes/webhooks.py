"""GET /v1/webhook-secret: the calling key's webhook signing secret and default URL.

The holder of an API key can read its signing secret at any time (as `amid keys create` prints
it once): the secret only lets a receiver check that a delivery came from this service for
this key's jobs, and whoever holds the key could see those jobs anyway.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CallerDep, SessionDep
from api.routes.jobs import ERRORS
from api.schemas import WebhookSecretOut
from store.models import ApiKey
from store.webhooks import SIGNATURE_HEADER

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get(
    "/webhook-secret",
    response_model=WebhookSecretOut,
    responses={401: ERRORS[401], 503: ERRORS[503]},
    summary="This key's webhook signing secret",
)
def webhook_secret(session: SessionDep, caller: CallerDep) -> WebhookSecretOut:
    # The key authenticated this very request, so its row is there.
    key = session.get_one(ApiKey, caller.key_id)
    return WebhookSecretOut(
        secret=key.webhook_secret,
        signature_header=SIGNATURE_HEADER,
        default_webhook_url=key.webhook_url,
    )
