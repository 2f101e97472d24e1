"""Optional API keys: off when none are configured; Bearer on HTTP, metadata on gRPC."""

from __future__ import annotations

import hmac

from ivl_proto.errors import ErrorCode, ServingError


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | None) -> None:
        """Raise UNAUTHENTICATED unless keys are off or `presented` is one of them (constant time)."""
        if not self._keys:
            return
        if not presented:
            raise ServingError(
                ErrorCode.UNAUTHENTICATED,
                "this gateway needs an API key: send 'Authorization: Bearer <key>' (HTTP) or "
                "'authorization: Bearer <key>' metadata (gRPC)",
            )
        candidate = presented.encode()
        if not any(hmac.compare_digest(candidate, key) for key in self._keys):
            raise ServingError(ErrorCode.UNAUTHENTICATED, "the API key is not valid")

    @staticmethod
    def from_authorization(header: str | None) -> str | None:
        """The key of an 'Authorization: Bearer KEY' header (or a bare key)."""
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer" and value:
            return value.strip()
        return header.strip() if not value else None
