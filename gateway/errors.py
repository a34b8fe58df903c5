"""Every error the gateway answers with, and the one function that renders them.

Errors always use Stripe's shape so the official SDK raises its usual
exceptions: ``{"error": {"type": ..., "code": ..., "message": ...}}``.

    CosignerError                      status, type, code, message
    ├── InvalidRequest                 400 invalid_request_error
    │   ├── DuplicateParameter         400 parameter_duplicated
    │   ├── InvalidPath                400 path_invalid
    │   └── InvalidBody                400 body_invalid
    ├── IdempotencyMismatch            400 idempotency_error
    ├── AuthenticationFailed           401 authentication_error
    ├── Forbidden                      403 invalid_request_error
    │   ├── Denied                     403 cosigner_denied (+ rule)
    │   └── ActionClosed               403 cosigner_rejected|expired|cancelled
    ├── NotFound                       404 resource_missing
    ├── MethodNotAllowed               405 method_not_allowed (+ Allow)
    ├── Conflict                       409 action_not_awaiting_approval
    ├── PayloadTooLarge                413 body_too_large
    ├── UnsupportedMediaType           415 content_type_unsupported
    ├── RateLimited                    429 rate_limit_error (+ Retry-After)
    ├── StripeKeyMissing               500 api_error (a gateway key with no Stripe key)
    └── UpstreamUnavailable            502 api_error
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.jsontext import compact


class CosignerError(Exception):
    """Base of every error answered to a client in Stripe's shape."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The Stripe-shaped error object."""
        err: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        err.update(self.extra)
        return {"error": err}


class InvalidRequest(CosignerError):
    """The request cannot be read unambiguously."""


class DuplicateParameter(InvalidRequest):
    """A parameter was given twice (body twice, or query and body)."""

    code = "parameter_duplicated"


class InvalidPath(InvalidRequest):
    """The path cannot be normalised safely."""

    code = "path_invalid"


class InvalidBody(InvalidRequest):
    """The body cannot be parsed by its content type."""

    code = "body_invalid"


class IdempotencyMismatch(CosignerError):
    """An Idempotency-Key was reused with a different request."""

    type = "idempotency_error"
    code = "idempotency_key_in_use"


class AuthenticationFailed(CosignerError):
    """No usable credential."""

    status = 401
    type = "authentication_error"
    code = "api_key_invalid"


class Forbidden(CosignerError):
    """The caller may not do this."""

    status = 403
    code = "forbidden"


class Denied(Forbidden):
    """A rule denied the request."""

    code = "cosigner_denied"


class ActionClosed(Forbidden):
    """The action was rejected, expired or cancelled; ``code`` says which."""


class NotFound(CosignerError):
    """No such resource."""

    status = 404
    code = "resource_missing"


class MethodNotAllowed(CosignerError):
    """A method Stripe's API does not use (only GET, HEAD, POST and DELETE pass)."""

    status = 405
    code = "method_not_allowed"


class Conflict(CosignerError):
    """The action is not in a state that allows this."""

    status = 409
    code = "action_not_awaiting_approval"


class PayloadTooLarge(CosignerError):
    """The body is larger than COSIGNER_MAX_BODY."""

    status = 413
    code = "body_too_large"


class UnsupportedMediaType(CosignerError):
    """A body whose content type the gateway cannot parse."""

    status = 415
    code = "content_type_unsupported"


class RateLimited(CosignerError):
    """Too many requests: ``reason``, and the whole seconds until one more is allowed."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit"

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(
            f"{reason} Retry after {retry_after} second(s).",
            headers={"Retry-After": str(retry_after)},
        )
        self.reason = reason
        self.retry_after = retry_after


class StripeKeyMissing(CosignerError):
    """A gateway key is valid but no Stripe key is configured to substitute for it."""

    status = 500
    type = "api_error"
    code = "stripe_key_missing"


class UpstreamUnavailable(CosignerError):
    """Stripe could not be reached for a synchronous forward."""

    status = 502
    type = "api_error"
    code = "upstream_unavailable"


def error_response(exc: CosignerError) -> web.Response:
    """Render any gateway error as Stripe would, never asking the SDK to retry."""
    headers = {"Stripe-Should-Retry": "false", **exc.headers}
    return web.Response(
        status=exc.status,
        text=compact(exc.body()),
        content_type="application/json",
        headers=headers,
    )


def error_from_http(exc: web.HTTPException) -> CosignerError:
    """Translate aiohttp's own HTTP errors (413, 404, 405 ...) into our tree."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("Request body is larger than the gateway accepts.")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("Unrecognized request URL.")
    err = CosignerError(exc.reason or "Bad request", code="http_error")
    err.status = exc.status
    return err
