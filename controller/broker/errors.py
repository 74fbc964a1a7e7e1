"""OSB error responses: ``{"error": <code>, "description": <text>}``."""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """An answer other than success; ``description`` is shown to users, so it never holds a secret."""

    def __init__(self, status: int, error: str, description: str, *, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.body = body

    def document(self) -> dict[str, Any]:
        if self.body is not None:
            return self.body
        return {"error": self.error, "description": self.description}


def bad_request(description: str) -> BrokerError:
    return BrokerError(400, "BadRequest", description)


def async_required() -> BrokerError:
    return BrokerError(
        422, "AsyncRequired", "This service plan requires client support for asynchronous service operations."
    )


def concurrency_error(description: str) -> BrokerError:
    return BrokerError(422, "ConcurrencyError", description)


def gone() -> BrokerError:
    # 410 is a success signal for deletes: the spec wants an empty object.
    return BrokerError(410, "Gone", "", body={})
