"""Real peers for tests: the fake Stripe upstream (a subprocess) and an SMTP sink.

Independent of pytest, so that fixtures and subprocess-based tests can both use
them. Everything binds to 127.0.0.1, every wait is bounded, and every process or
thread started here is stopped by the context manager that started it.

This module must not import localstripe (it would warn at import time in the
test process); the fake runs in its own process: ``tests/support/fake_stripe.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import email.policy
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, cast

import stripe
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TEST_STRIPE_KEY = "sk_test_cosigner0000000000000000006789"
REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

# Same value as fake_stripe.SETUP_HEADER (not imported: that module imports localstripe).
SETUP_HEADER = "X-Fake-Stripe-Setup"
# localstripe's canonical test card (a fresh card payment method on every use).
TEST_PAYMENT_METHOD = "pm_card_visa"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (callers retry if they lose the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (98, 48, 10048)  # EADDRINUSE (Linux/mac/Win)


# ---------------------------------------------------------------------------
# Fake Stripe upstream
# ---------------------------------------------------------------------------


class FakeStripeProcess:
    """Run ``python -m tests.support.fake_stripe`` as a subprocess on 127.0.0.1.

    ``with FakeStripeProcess() as fake: fake.url`` — started and answering on
    entry, stopped on exit (SIGTERM, then SIGKILL). The child also exits by
    itself if this process dies.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._requested_port = port
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake Stripe is not running")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def output(self) -> str:
        """Everything the child wrote to stdout/stderr so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def start(self) -> Self:
        if self.process is not None:
            raise RuntimeError("already started")
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port or free_port()
            try:
                self._start_once(port)
                return self
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise RuntimeError(f"fake Stripe: port {port} in use") from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start_once(self, port: int) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.port = port
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_stripe",
                "--port",
                str(port),
                "--parent-pid",
                str(os.getpid()),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out = self.output()
                if "address already in use" in out.lower():
                    raise _PortTaken()
                raise RuntimeError(
                    f"fake Stripe exited with {self.process.returncode} on start:\n{out}"
                )
            if self._answers():
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"fake Stripe did not answer within {self.startup_timeout}s:\n{self.output()}"
        )

    def _answers(self) -> bool:
        """True once *our* child (not whoever else may hold the port) answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/_test/health", timeout=1.0) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("pid") == self.pid

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            atexit.unregister(self.stop)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _PortTaken(Exception):
    pass


class Upstream:
    """Drive and observe a running fake Stripe (see fake_stripe.py for the routes).

    Setup calls made through this helper (charges, payment intents, listing
    refunds...) are marked as setup: never faulted, excluded from `requests()`
    by default and from `counts()`.
    """

    def __init__(self, url: str, api_key: str = TEST_STRIPE_KEY, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http_client = stripe.RequestsClient(timeout=timeout)
        self._clients: dict[str, stripe.StripeClient] = {}

    def close(self) -> None:
        self._http_client.close()  # type: ignore[no-untyped-call]
        self._clients.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw control API ---------------------------------------------------

    def _control(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            exc.close()
            raise RuntimeError(f"{method} {path} -> {exc.code}: {body}") from None

    # -- observation -----------------------------------------------------------

    def requests(
        self,
        *,
        method: str | None = None,
        path: str | None = None,
        include_setup: bool = False,
    ) -> list[dict[str, Any]]:
        """What the upstream received, oldest first: dicts with method, path,
        target (raw path and query as sent), query, params, body, headers
        (no Authorization), idempotency_key, stripe_account, api_key
        (fingerprint `sk_test_…6789`), api_key_last4, status (None if
        dropped), fault, replayed, handled, setup, time, duration,
        request_id, seq."""
        entries: list[dict[str, Any]] = self._control("GET", "/_test/requests")
        return [
            e
            for e in entries
            if (include_setup or not e["setup"])
            and (method is None or e["method"] == method.upper())
            and (path is None or e["path"] == path)
        ]

    def clear_requests(self) -> None:
        self._control("DELETE", "/_test/requests")

    def counts(self) -> dict[str, dict[str, int]]:
        """{"POST /v1/refunds": {"received", "faulted", "replayed", "handled"}, ...}.

        handled = reached localstripe (not faulted before it, not replayed)."""
        counts: dict[str, dict[str, int]] = self._control("GET", "/_test/counts")
        return counts

    def count(self, method: str, path: str, kind: str = "handled") -> int:
        """How many `method path` requests were `kind` (received/faulted/replayed/handled)."""
        return self.counts().get(f"{method.upper()} {path}", {}).get(kind, 0)

    def wait_for_requests(
        self,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Block until at least `count` matching requests have been answered.

        Blocks the calling thread: from async tests whose gateway runs on the
        same event loop, use `wait_for_requests_async`."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._finished(method, path)
            if len(found) >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if len(found) < count:
            raise TimeoutError(f"{len(found)}/{count} {method} {path} requests after {timeout}s")
        return found

    async def wait_for_requests_async(
        self,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """`wait_for_requests` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self._finished, method, path)
            if len(found) >= count or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if len(found) < count:
            raise TimeoutError(f"{len(found)}/{count} {method} {path} requests after {timeout}s")
        return found

    def _finished(self, method: str | None, path: str | None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.requests(method=method, path=path)
            if e["duration"] is not None  # answered (or dropped), not in flight
        ]

    # -- faults ----------------------------------------------------------------

    def fault(
        self,
        path_prefix: str = "/",
        *,
        method: str | None = None,
        fail: Iterable[int | str | None] = (),
        delay: float = 0.0,
        should_retry: bool | None = None,
        times: int | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer the next matching requests specially; returns the rule.

        `fail`: one entry per matching request, in order: an HTTP status
        (Stripe-shaped error, never reaches localstripe), "drop" (connection
        closed unanswered, never handled), "drop_after" (handled, then the
        connection is closed unanswered) or None (handled normally).
        `delay`: seconds slept before each matching request (the request still
        takes effect if the client gave up). `times` defaults to len(fail) or 1.
        `should_retry` sets `Stripe-Should-Retry`; `error` overrides fields of
        the error body."""
        rule: dict[str, Any] = {
            "path_prefix": path_prefix,
            "method": method,
            "fail": list(fail),
            "delay": delay,
            "should_retry": should_retry,
        }
        if times is not None:
            rule["times"] = times
        if error is not None:
            rule["error"] = error
        result: dict[str, Any] = self._control("POST", "/_test/faults", rule)
        return result

    def faults(self) -> list[dict[str, Any]]:
        """Fault rules not yet used up."""
        rules: list[dict[str, Any]] = self._control("GET", "/_test/faults")
        return rules

    def clear_faults(self) -> None:
        self._control("DELETE", "/_test/faults")

    # -- Stripe objects (through the real SDK, straight at the upstream) -------

    def client(self, api_key: str | None = None) -> stripe.StripeClient:
        """A StripeClient pointed straight at the upstream, no retries."""
        key = api_key or self.api_key
        if key not in self._clients:
            self._clients[key] = stripe.StripeClient(
                key,
                base_addresses={"api": self.url},
                max_network_retries=0,
                http_client=self._http_client,
            )
        return self._clients[key]

    def _setup_options(self) -> stripe.RequestOptions:
        return {"headers": {SETUP_HEADER: "1"}}

    def create_charge(
        self,
        amount: int = 5000,
        currency: str = "usd",
        *,
        api_key: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """A succeeded, captured card charge (localstripe wants `source` pm_/card_/src_;
        `pm_card_visa` gives a fresh test card, no customer needed)."""
        charge = self.client(api_key).v1.charges.create(
            cast(Any, {"amount": amount, "currency": currency, "source": TEST_PAYMENT_METHOD})
            | params,
            self._setup_options(),
        )
        return charge.to_dict()

    def create_payment_intent(
        self,
        amount: int = 5000,
        currency: str = "usd",
        *,
        api_key: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """A confirmed payment intent: status `succeeded`, its charge captured."""
        intent = self.client(api_key).v1.payment_intents.create(
            cast(
                Any,
                {
                    "amount": amount,
                    "currency": currency,
                    "payment_method": TEST_PAYMENT_METHOD,
                    "confirm": True,
                },
            )
            | params,
            self._setup_options(),
        )
        return intent.to_dict()

    def create_dispute(
        self,
        charge_id: str,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
    ) -> dict[str, Any]:
        """A `needs_response` dispute on the charge (test-control route: Stripe has
        no API to open one)."""
        payload: dict[str, Any] = {"charge": charge_id, "reason": reason}
        if amount is not None:
            payload["amount"] = amount
        dispute: dict[str, Any] = self._control("POST", "/_test/disputes", payload)
        return dispute

    def refunds(
        self,
        charge_id: str | None = None,
        *,
        payment_intent: str | None = None,
        api_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Refunds in the upstream, newest first (optionally for one charge or intent)."""
        params: dict[str, Any] = {"limit": 100}
        if charge_id is not None:
            params["charge"] = charge_id
        if payment_intent is not None:
            params["payment_intent"] = payment_intent
        listing = self.client(api_key).v1.refunds.list(cast(Any, params), self._setup_options())
        return [r.to_dict() for r in listing.data]

    def charge(self, charge_id: str, *, api_key: str | None = None) -> dict[str, Any]:
        return (
            self.client(api_key)
            .v1.charges.retrieve(charge_id, None, self._setup_options())
            .to_dict()
        )

    def payment_intent(self, intent_id: str, *, api_key: str | None = None) -> dict[str, Any]:
        return (
            self.client(api_key)
            .v1.payment_intents.retrieve(intent_id, None, self._setup_options())
            .to_dict()
        )

    def dispute(self, dispute_id: str, *, api_key: str | None = None) -> dict[str, Any]:
        return (
            self.client(api_key)
            .v1.disputes.retrieve(dispute_id, None, self._setup_options())
            .to_dict()
        )


# ---------------------------------------------------------------------------
# SMTP sink
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    auth_login: str | None  # the user that authenticated, if any
    tls: bool  # True if delivered over TLS (STARTTLS or implicit)


@dataclass(frozen=True)
class SelfSignedCert:
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def generate(cls, hostname: str = "localhost") -> SelfSignedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(hostname),
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


class _SinkHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Enforced here rather than with aiosmtpd's auth_required, which warns
        # (and so errors under pytest) when AUTH is allowed without TLS.
        if self.sink.username is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        message = BytesParser(policy=email.policy.default).parsebytes(raw)
        auth = session.auth_data
        auth_login = None
        if session.authenticated:
            auth_login = auth.login.decode() if isinstance(auth, LoginPassword) else str(auth)
        transport = server.transport
        self.sink._add(
            ReceivedMail(
                message=message,
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                auth_login=auth_login,
                tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
            )
        )
        return "250 Message accepted for delivery"


class SmtpSink:
    """An SMTP server on 127.0.0.1 (aiosmtpd, in a thread) that keeps what it receives.

    Options: ``username``/``password`` (AUTH PLAIN/LOGIN offered without TLS,
    and required before MAIL), ``starttls`` (self-signed certificate made at
    start; STARTTLS required unless ``require_starttls=False``),
    ``implicit_tls`` (SMTPS), ``port`` (default: a free one). ``cert_path`` /
    ``cert_pem`` let clients trust it.
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        require_starttls: bool | None = None,
        implicit_tls: bool = False,
        ready_timeout: float = 10.0,
        port: int | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if starttls and implicit_tls:
            raise ValueError("starttls and implicit_tls are exclusive")
        self.username = username
        self.password = password
        self.starttls = starttls
        self.require_starttls = starttls if require_starttls is None else require_starttls
        self.implicit_tls = implicit_tls
        self.ready_timeout = ready_timeout
        self.host = LOOPBACK
        self._requested_port = port  # e.g. a mail server coming back where it was
        self.port: int | None = None
        self.cert: SelfSignedCert | None = None
        self.cert_path: str | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._controller: Controller | None = None
        self._received: list[ReceivedMail] = []
        self._cond = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        if self._controller is not None:
            raise RuntimeError("already started")
        try:
            tls = self._server_tls_context() if (self.starttls or self.implicit_tls) else None
            for attempt in range(3):
                port = self._requested_port or free_port()
                controller = self._make_controller(port, tls)
                try:
                    controller.start()
                except OSError as exc:
                    with contextlib.suppress(Exception):
                        controller.stop(no_assert=True)
                    if _port_in_use_error(exc) and attempt < 2 and not self._requested_port:
                        continue
                    raise
                self._controller, self.port = controller, port
                break
        except BaseException:
            self.stop()
            raise
        return self

    def _make_controller(self, port: int, tls: ssl.SSLContext | None) -> Controller:
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": port,
            "server_hostname": "localhost",  # else socket.getfqdn(): a DNS lookup
            "ready_timeout": self.ready_timeout,
        }
        if self.username is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = False
        if self.starttls:
            kwargs["tls_context"] = tls
            kwargs["require_starttls"] = self.require_starttls
        if self.implicit_tls:
            kwargs["ssl_context"] = tls
        return Controller(_SinkHandler(self), **kwargs)

    def _server_tls_context(self) -> ssl.SSLContext:
        self.cert = SelfSignedCert.generate()
        self._tmpdir = tempfile.TemporaryDirectory(prefix="smtp-sink-")
        cert_file = Path(self._tmpdir.name, "cert.pem")
        key_file = Path(self._tmpdir.name, "key.pem")
        cert_file.write_bytes(self.cert.cert_pem)
        key_file.write_bytes(self.cert.key_pem)
        key_file.chmod(0o600)
        self.cert_path = str(cert_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        return context

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self.port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for clients -------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes | None:
        return self.cert.cert_pem if self.cert is not None else None

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this sink's certificate."""
        if self.cert is None:
            raise RuntimeError("this sink has no TLS")
        return ssl.create_default_context(cadata=self.cert.cert_pem.decode())

    @property
    def url(self) -> str:
        """`smtp://[user:pass@]127.0.0.1:PORT[?starttls=true]` (`smtps://` for implicit TLS)."""
        if self.port is None:
            raise RuntimeError("SMTP sink is not running")
        scheme = "smtps" if self.implicit_tls else "smtp"
        auth = ""
        if self.username is not None and self.password is not None:
            auth = (
                urllib.parse.quote(self.username, safe="")
                + ":"
                + urllib.parse.quote(self.password, safe="")
                + "@"
            )
        query = "?starttls=true" if self.starttls else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{query}"

    # -- what arrived ------------------------------------------------------------

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.username is not None
            and self.password is not None
            and auth_data.login == self.username.encode()
            and auth_data.password == self.password.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _add(self, mail: ReceivedMail) -> None:
        with self._cond:
            self._received.append(mail)
            self._cond.notify_all()

    @property
    def received(self) -> list[ReceivedMail]:
        with self._cond:
            return list(self._received)

    @property
    def messages(self) -> list[EmailMessage]:
        return [mail.message for mail in self.received]

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """Block until `count` messages arrived; returns them all.

        Blocks the calling thread: from async tests whose sender runs on the
        same event loop, use `wait_for_async`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= count, timeout):
                raise TimeoutError(f"{len(self._received)}/{count} mails after {timeout}s")
            return [mail.message for mail in self._received]

    async def wait_for_async(self, count: int = 1, timeout: float = 5.0) -> list[EmailMessage]:
        """`wait_for` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(self.received)}/{count} mails after {timeout}s")
            await asyncio.sleep(0.02)
        return self.messages
