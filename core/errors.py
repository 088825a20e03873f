"""The one error base of amid.

Every expected failure (bad input, a refused model pair, a job in the wrong state) is an
`AmidError` subclass defined beside the code that raises it. The API renders any of them as
`{"error": ClassName, "detail": message, "field": field}` with the subclass's status code, and
the worker stores the same class name as the job's error code. Torch-free on purpose.
"""

from __future__ import annotations


class AmidError(Exception):
    """An expected failure with a user-facing message."""

    status_code: int = 400

    def __init__(self, message: str, *, field: str | None = None, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if status_code is not None:
            self.status_code = status_code

    @property
    def code(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, str | None]:
        return {"error": self.code, "detail": self.message, "field": self.field}


class InvalidSettings(AmidError):
    """A run setting that is well-typed but unusable (e.g. a λ that makes the loss vanish)."""

    status_code = 422
