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

    def is_valid(self, presented: str | None) -> bool:
        """True when `presented` is one of the keys (constant-time compare); False when keys are off."""
        if not self._keys or not presented:
            return False
        candidate = presented.encode()
        return any(hmac.compare_digest(candidate, key) for key in self._keys)

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

    @staticmethod
    def from_metadata(metadata: object) -> str | None:
        """The key of gRPC invocation metadata: 'authorization: Bearer KEY' or 'x-api-key: KEY'."""
        found: dict[str, str] = {}
        for item in metadata or ():  # type: ignore[attr-defined]
            key, value = item[0], item[1]
            if isinstance(value, str):
                found.setdefault(key.lower(), value)
        return ApiKeys.from_authorization(found.get("authorization")) or found.get("x-api-key")
