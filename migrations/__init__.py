"""Alembic migrations of the job store: the only way its schema changes.

Apply them with `amid db upgrade` or `store.db.upgrade(url)`. New revisions:
`alembic -c migrations/alembic.ini revision --autogenerate -m "what changed"`.
"""
