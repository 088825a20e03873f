"""API keys: the secret is shown once at creation; only its sha256 is stored.

Each key also has a webhook signing secret (its jobs' deliveries are signed with it) and may
have a default webhook URL for its jobs.
"""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.errors import AmidError
from store.models import ApiKey, new_id, utcnow

KEY_PREFIX = "amid_"
WEBHOOK_SECRET_PREFIX = "whsec_"


class InvalidKeySetting(AmidError):
    status_code = 422


def hash_secret(secret: str) -> str:
    # A plain sha256 suffices: the secrets are 256 random bits, not guessable passwords.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def create_api_key(
    session: Session,
    name: str,
    is_admin: bool = False,
    *,
    share: int = 1,
    max_running: int | None = None,
    webhook_url: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret (returned here only; it cannot be recovered later).

    `share` weighs the key's turns in the pool and `max_running` caps its running jobs (None:
    no cap); both are read by the claim (store.scheduling). `webhook_url` must have passed
    `store.webhooks.check_webhook_url`.
    """
    if share < 1:
        raise InvalidKeySetting("must be at least 1", field="share")
    if max_running is not None and max_running < 1:
        raise InvalidKeySetting("must be at least 1 (or no limit)", field="max_running")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id(),
        name=name,
        key_hash=hash_secret(secret),
        is_admin=is_admin,
        share=share,
        max_running=max_running,
        created_at=utcnow(),
        webhook_url=webhook_url,
        webhook_secret=new_webhook_secret(),
    )
    session.add(key)
    session.flush()
    return key, secret


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """The live key with this secret, or None (unknown or revoked)."""
    if not secret:
        return None
    return session.execute(
        sa.select(ApiKey).where(ApiKey.key_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()


def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key; False if there is no live key with that id."""
    result = session.execute(
        sa.update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.id)
    ).scalar_one_or_none()
    return result is not None


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.execute(sa.select(ApiKey).order_by(ApiKey.created_at)).scalars())


def lock_key(session: Session, key_id: str) -> None:
    """Row-lock the key until the transaction ends, serialising per-key checks such as the queued
    limit (two concurrent submissions could otherwise both see room for one more)."""
    session.execute(sa.select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())
