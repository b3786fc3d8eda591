"""A small Python client of ``ttaperso serve`` (httpx; ``pip install 'ttaperso[serve]'``).

    from ttaperso.client import Client

    with Client("http://127.0.0.1:8000", token) as c:
        out = c.predict("patient-017", images=["face0.png", "face1.png"])
        out["names"], out["probs"], out["updated"], out["version"]

Frames go as PNG/JPEG files (``images=``: paths, bytes, PIL images or uint8/float arrays,
encoded as PNG) or as one ``.npy`` array (``array=``: ``(N, H, W)`` or ``(N, H, W, C)``,
uint8 or floats in [0, 1]). A refused request raises the error class the server names
(:class:`~ttaperso.errors.InputError`, :class:`~ttaperso.errors.StaleStateError`, ...) with
the server's message, or :class:`APIError`; every raised error has ``.status``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import numpy as np

from . import errors as _errors

__all__ = [
    "APIError",
    "Client",
    "NotFoundError",
    "UnavailableError",
    "encode_array",
    "encode_png",
]

ImageLike = Any  # str | Path | bytes | PIL.Image.Image | numpy.ndarray


class APIError(_errors.TTAPersoError):
    """A refused request whose error is not a ttaperso error class (401, 422, 5xx, ...)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class NotFoundError(APIError):
    """HTTP 404: no such subject, version or audit log (or the feature is off)."""


class UnavailableError(APIError):
    """HTTP 503: the store or the replica was unavailable; nothing was acknowledged, retry."""


def encode_png(image: ImageLike) -> bytes:
    """PNG bytes of an image: a path (sent as is), bytes (as is), a PIL image or an array."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image

    if isinstance(image, np.ndarray):
        pixels = image
        if pixels.dtype != np.uint8:
            pixels = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        image = Image.fromarray(pixels)
    if not isinstance(image, Image.Image):
        raise _errors.InputError(
            f"Expected an image path, bytes, PIL image or numpy array but got {type(image).__name__}"
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (no pickling: object arrays are refused)."""
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise _errors.InputError("Expected a numeric numpy array for `array`")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _raise_for(response: Any) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        error, detail = str(body.get("error", "")), str(body.get("detail", response.text))
    except ValueError:
        error, detail = "", response.text
    status = int(response.status_code)
    cls = getattr(_errors, error, None)
    exc: Exception
    if isinstance(cls, type) and issubclass(cls, _errors.TTAPersoError):
        exc = cls(detail)
    elif error == "PayloadTooLargeError":  # the server's subclass of InputError
        exc = _errors.InputError(detail)
    elif status == 404:
        exc = NotFoundError(status, error, detail)
    elif status == 503:
        exc = UnavailableError(status, error, detail)
    else:
        exc = APIError(status, error, detail)
    exc.status = status  # type: ignore[attr-defined]
    raise exc


class Client:
    """Calls one ``ttaperso serve`` server.

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``).
        token: the server token or a subject token (``ttaperso.serve.auth.subject_token``).
        timeout: seconds per request.
        **httpx_options: passed to ``httpx.Client`` (``transport=``, ``verify=``, ...).
    """

    def __init__(
        self, url: str, token: str, *, timeout: float = 60.0, **httpx_options: Any
    ) -> None:
        import httpx

        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            **httpx_options,
        )

    def __repr__(self) -> str:
        return f"Client({str(self._http.base_url)!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ---------------------------------------------------------- plumbing
    @staticmethod
    def _path(subject: str, action: str = "") -> str:
        return f"/v1/subjects/{quote(subject, safe='')}" + (f"/{action}" if action else "")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    @staticmethod
    def _files(
        field: str, images: Iterable[ImageLike] | None, array: np.ndarray | None
    ) -> list[tuple[str, tuple[str, bytes, str]]]:
        if (images is None) == (array is None):
            raise _errors.InputError("Pass exactly one of `images` or `array`")
        if array is not None:
            return [
                (
                    field.replace("frames", "array"),
                    ("frames.npy", encode_array(array), "application/octet-stream"),
                )
            ]
        return [
            (field, (f"frame{i}.png", encode_png(image), "image/png"))
            for i, image in enumerate(images or [])
        ]

    # --------------------------------------------------------- endpoints
    def health(self) -> dict[str, Any]:
        """``GET /health`` (no token needed)."""
        return self._request("GET", "/health").json()

    def info(self) -> dict[str, Any]:
        """The served model, labels, strategy, store and limits."""
        return self._request("GET", "/v1/info").json()

    def predict(
        self,
        subject: str,
        *,
        images: Iterable[ImageLike] | None = None,
        array: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Predict and adapt one subject; the answer has labels, names, probs, updated, version."""
        files = self._files("frames", images, array)
        return self._request("POST", self._path(subject, "predict"), files=files).json()

    def predict_many(
        self, frames: Mapping[str, Iterable[ImageLike] | np.ndarray]
    ) -> dict[str, Any]:
        """Several subjects in one request: ``{subject: images or array}`` -> ``{subject: answer}``."""
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        for subject, value in frames.items():
            if isinstance(value, np.ndarray):
                files += self._files(f"frames:{subject}", None, value)
            else:
                files += self._files(f"frames:{subject}", value, None)
        return self._request("POST", "/v1/predict_many", files=files).json()["results"]

    def calibrate(
        self,
        subject: str,
        *,
        images: Iterable[ImageLike] | None = None,
        array: np.ndarray | None = None,
        neutral_label: str | None = "neutral",
        margin: float | None = None,
    ) -> dict[str, Any]:
        """Neutral-baseline calibration from resting-face frames."""
        data: dict[str, str] = {"neutral_label": neutral_label or ""}
        if margin is not None:
            data["margin"] = repr(float(margin))
        files = self._files("frames", images, array)
        return self._request(
            "POST", self._path(subject, "calibrate"), files=files, data=data
        ).json()

    def reset(self, subject: str) -> dict[str, Any]:
        """Forget the subject's adaptation (a fresh state, stored as a new version)."""
        return self._request("POST", self._path(subject, "reset")).json()

    def versions(self, subject: str) -> dict[str, Any]:
        """``{"current": n, "versions": [{"version", "digest", "saved_at"}, ...]}``."""
        return self._request("GET", self._path(subject, "versions")).json()

    def rollback(self, subject: str, version: int) -> dict[str, Any]:
        """Make a kept version current again."""
        return self._request(
            "POST", self._path(subject, "rollback"), params={"version": version}
        ).json()

    def export(self, subject: str) -> bytes:
        """The subject's current state file (safetensors bytes)."""
        return self._request("GET", self._path(subject, "export")).content

    def delete(self, subject: str) -> dict[str, Any]:
        """Erase the subject's state and every kept version."""
        return self._request("DELETE", self._path(subject)).json()

    def audit(self, subject: str) -> dict[str, Any]:
        """The subject's audit records and their verification."""
        return self._request("GET", self._path(subject, "audit")).json()

    def subjects(self) -> list[str]:
        """Ids of the stored subjects (server token only)."""
        return self._request("GET", "/v1/subjects").json()["subjects"]

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        return self._request("GET", "/metrics").text
