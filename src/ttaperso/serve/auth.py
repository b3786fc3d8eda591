"""Bearer tokens: the server's token, and tokens scoped to one subject.

The server token (``--token`` or ``$TTAPERSO_TOKEN``) authorises every endpoint. A
*subject token*, ``subject_token(server_token, subject)`` (an HMAC-SHA256 of the id under
the server token), authorises only the endpoints of that one subject: hand it to a
subject's own device or app, and it can neither read nor change another subject's state.
Comparisons are constant-time (:func:`hmac.compare_digest`); tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["Authorizer", "generate_token", "subject_token"]

#: a server token shorter than this is refused (guessable)
MIN_TOKEN_LENGTH = 16


def generate_token() -> str:
    """A random server token (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def subject_token(server_token: str, subject: str) -> str:
    """The token that authorises requests for ``subject`` only."""
    mac = hmac.new(server_token.encode(), b"ttaperso-subject:" + subject.encode(), hashlib.sha256)
    return "s." + mac.hexdigest()


class Authorizer:
    """Checks ``Authorization: Bearer <token>`` headers against the server token."""

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"Expected a server token of at least {MIN_TOKEN_LENGTH} characters "
                "(ttaperso serve --token, or $TTAPERSO_TOKEN)"
            )
        self._token = token.encode()

    def __repr__(self) -> str:
        return "Authorizer(<token hidden>)"

    @staticmethod
    def bearer(header: str | None) -> str | None:
        """The token of an ``Authorization`` header value (None when not a Bearer header)."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()

    def is_server(self, token: str | None) -> bool:
        """True for the server token."""
        return token is not None and hmac.compare_digest(token.encode(), self._token)

    def allows(self, token: str | None, subjects: list[str]) -> bool:
        """True when ``token`` may act on every subject in ``subjects`` (server token: all)."""
        if token is None:
            return False
        if self.is_server(token):
            return True
        if not subjects:
            return False  # subject tokens never reach server-wide endpoints
        secret = self._token.decode()
        return all(
            hmac.compare_digest(token.encode(), subject_token(secret, s).encode()) for s in subjects
        )
