"""Who may call the gateway, over what, and how many calls at once.

- TLS on the gRPC port, optionally mutual (a client CA): :func:`server_credentials`. The files
  are re-read when they change (a rotated Kubernetes Secret), on the next handshake.
- API keys: ``authorization: Bearer <key>`` metadata checked against a key file
  (:class:`ApiKeys`, :class:`KeyFile`). Only SHA-256 digests of the keys are kept in memory;
  a presented key is hashed and compared with every digest in constant time
  (``hmac.compare_digest``), and no key ever reaches a log line or a status message.
- :class:`CallGuard`, the one server interceptor: authorises each call, bounds the calls in
  progress (beyond the bound: RESOURCE_EXHAUSTED at once, never an unbounded queue), and turns a
  request message that does not parse (truncated, a string that is not UTF-8) into
  INVALID_ARGUMENT instead of gRPC's default UNKNOWN.

Health (and reflection, when configured) stays open: Kubernetes probes carry no key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable

import grpc

from .errors import ServingError

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
BEARER = "bearer"
ALL_SERVICES = "*"
MIN_KEY_CHARS = 16  # shorter keys are guessable; `openssl rand -hex 32` gives 64


def _short(service: str) -> str:
    """``clipserve.v1.EmbeddingService`` -> ``EmbeddingService``."""
    return service.rsplit(".", 1)[-1]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def unauthenticated(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.PERMISSION_DENIED, message)


@dataclass(frozen=True)
class ApiKeys:
    """The accepted API keys, as digests, each with the services it may call.

    Attributes:
        entries: (SHA-256 of the key, short service names it may call or ``{"*"}``).
    """

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, text: str, services: Collection[str], source: str = "key file") -> "ApiKeys":
        """Parse a key file's text.

        Format: one key per line; blank lines and lines starting with ``#`` are ignored. A key
        may be followed by whitespace and a comma-separated list of the services it may call
        (``EmbeddingService,ModelService``; full names work too); without one it may call all.

        Args:
            text: the file's content.
            services: fully qualified names of the services keys may be scoped to.
            source: how messages name the file.

        Raises:
            ValueError: no keys, a short or non-ASCII key, a repeated key, or an unknown
                service. Messages name the line, never the key.
        """
        known = {_short(s) for s in services}
        entries: list[tuple[bytes, frozenset[str]]] = []
        seen: dict[bytes, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, *scope_names = re.split(r"[\s,]+", line)
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(f"{source} line {number}: the key is shorter than "
                                 f"{MIN_KEY_CHARS} characters")
            if not key.isascii() or not key.isprintable():
                raise ValueError(f"{source} line {number}: the key has characters other than "
                                 "printable ASCII (it could not be sent as metadata)")
            digest = _digest(key)
            if digest in seen:
                raise ValueError(f"{source} line {number} repeats the key of line {seen[digest]}")
            seen[digest] = number
            scopes = frozenset(_short(s) for s in scope_names if s) or frozenset({ALL_SERVICES})
            unknown = sorted(scopes - known - {ALL_SERVICES})
            if unknown:
                raise ValueError(f"{source} line {number}: unknown service(s) {', '.join(unknown)};"
                                 f" valid: {', '.join(sorted(known))} or {ALL_SERVICES}")
            entries.append((digest, scopes))
        if not entries:
            raise ValueError(f"{source} holds no keys (to serve without keys, leave "
                             "api_keys_file unset)")
        return cls(tuple(entries))

    @classmethod
    def from_file(cls, path: Path, services: Collection[str]) -> "ApiKeys":
        """Read and parse ``path``; raises ValueError (unreadable or invalid)."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read API key file {path}: {exc}") from None
        return cls.parse(text, services, source=f"API key file {path}")

    def authorize(self, metadata: Iterable, service: str) -> None:
        """Check a call's ``authorization`` metadata for ``service`` (fully qualified).

        Raises:
            ServingError: UNAUTHENTICATED when the header is missing, repeated, not
                ``Bearer <key>``, or the key is unknown; PERMISSION_DENIED when the key may not
                call ``service``.
        """
        values = [value for key, value in metadata if key == AUTH_HEADER]
        if not values:
            raise unauthenticated(f"missing API key: send metadata '{AUTH_HEADER}: Bearer <key>'")
        if len(values) > 1:
            raise unauthenticated(f"send one '{AUTH_HEADER}' header, not {len(values)}")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token:
            raise unauthenticated(f"malformed '{AUTH_HEADER}' header: expected 'Bearer <key>'")
        candidate = _digest(token)
        scopes: frozenset[str] | None = None
        for digest, entry_scopes in self.entries:  # no early exit: time does not say which
            if hmac.compare_digest(candidate, digest):
                scopes = entry_scopes
        if scopes is None:
            raise unauthenticated("invalid API key")
        if ALL_SERVICES not in scopes and _short(service) not in scopes:
            raise permission_denied(f"this API key may not call {service}")


class KeyFile:
    """The API key file, re-read when it changes (a Secret update swaps the file in) or on
    :meth:`reload`. A file that fails to load at start raises; a bad reload is logged and the
    previous keys stay in force.

    Args:
        path: the key file.
        services: fully qualified service names keys may be scoped to.
    """

    def __init__(self, path: Path, services: Collection[str]):
        self._path = Path(path)
        self._services = tuple(services)
        self._stamp = self._file_stamp()
        self.keys = ApiKeys.from_file(self._path, self._services)
        log.info("API keys: %d loaded from %s", len(self.keys.entries), self._path)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def reload(self) -> bool:
        """Re-read the file now; returns whether new keys took effect."""
        self._stamp = self._file_stamp()
        try:
            keys = ApiKeys.from_file(self._path, self._services)
        except ValueError as exc:
            log.error("API keys not reloaded, keeping the previous ones: %s", exc)
            return False
        if keys != self.keys:
            self.keys = keys
            log.info("API keys reloaded: %d from %s", len(keys.entries), self._path)
        return True

    def check(self) -> bool:
        """Reload if the file's stat changed since the last read."""
        if self._file_stamp() == self._stamp:
            return False
        return self.reload()

    async def watch(self, interval_s: float) -> None:
        """Check every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.check()


# -- TLS -------------------------------------------------------------------------------------

def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not PEM (no '-----BEGIN' line)")
    return data


class TlsFiles:
    """The server's certificate chain and key, and optionally the client CA (mTLS), as
    gRPC credentials that pick up changed files on the next handshake.

    Args:
        cert_file: PEM certificate chain, leaf first.
        key_file: PEM private key of the leaf.
        client_ca_file: PEM CA bundle; when given, clients must present a certificate it
            signed (mutual TLS), else the handshake fails.

    Raises:
        ValueError: a file is unreadable or not PEM, or the key does not match the certificate.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
        self._files = {"certificate": Path(cert_file), "private key": Path(key_file)}
        if client_ca_file is not None:
            self._files["client CA"] = Path(client_ca_file)
        self.mutual = client_ca_file is not None
        self._stamp = self._stamps()
        self._initial = self._configuration()

    def _stamps(self) -> tuple:
        stamps = []
        for path in self._files.values():
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _configuration(self):
        pem = {what: _read_pem(path, what) for what, path in self._files.items()}
        # gRPC would only fail at the first handshake: check the pair (and the CA) now. An
        # encrypted key fails here too (the empty password), instead of prompting on a tty.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._files["certificate"], self._files["private key"],
                                    password=lambda: b"")
            if "client CA" in self._files:
                context.load_verify_locations(cafile=self._files["client CA"])
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"TLS files {', '.join(map(str, self._files.values()))} do not "
                             f"load (certificate and key must match; key unencrypted): "
                             f"{exc}") from None
        return grpc.ssl_server_certificate_configuration(
            [(pem["private key"], pem["certificate"])], root_certificates=pem.get("client CA"))

    def _fetch(self):
        # Called by gRPC core before each handshake: None keeps the current configuration.
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
            self._stamp = stamp
            log.info("TLS files changed; new handshakes use them")
            return configuration
        except Exception as exc:  # never raise into gRPC core; keep serving the old files
            log.error("TLS files not reloaded, keeping the previous ones: %s", exc)
            return None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port``."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual)


# -- the interceptor -------------------------------------------------------------------------

class _Malformed:
    """Stands in for a request message that did not parse, so the handler can answer
    INVALID_ARGUMENT (gRPC itself would answer UNKNOWN, with the parser's exception text)."""

    __slots__ = ()


_MALFORMED = _Malformed()


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:
            return _MALFORMED
    return deserialize


def _malformed(method: str) -> ServingError:
    return ServingError.invalid_argument(
        f"the request to {method} is not a valid message (truncated, a wrong field type, or a "
        "string that is not UTF-8)")


def _handler_like(handler: grpc.RpcMethodHandler, behavior, deserializer):
    """A method handler of the same kind as ``handler`` with another behavior."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(behavior, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)


def _original(handler: grpc.RpcMethodHandler):
    return (handler.stream_stream or handler.stream_unary or handler.unary_stream
            or handler.unary_unary)


class CallGuard(grpc.aio.ServerInterceptor):
    """Authorise, bound and sanity-check every call to the guarded services.

    Args:
        keys: returns the current :class:`ApiKeys`, or None to accept calls without a key.
        open_services: fully qualified services that need no key and are not counted
            (health; reflection when configured).
        max_concurrent_calls: calls in progress at once (a stream counts as one for its whole
            life); more get RESOURCE_EXHAUSTED immediately. 0: no bound.
        on_reject: called with (full method name, status code) for each call refused here.
    """

    def __init__(self, *, keys: Callable[[], ApiKeys | None], open_services: Collection[str],
                 max_concurrent_calls: int,
                 on_reject: Callable[[str, grpc.StatusCode], None] | None = None):
        self._keys = keys
        self._open = frozenset(open_services)
        self._limit = max_concurrent_calls
        self._on_reject = on_reject
        self.in_flight = 0
        # method -> (the servicer's handler, its guarded wrapper): built on a method's first
        # call, not on every call. Only registered methods get here, so it stays small.
        self._guarded_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        service = method.lstrip("/").rpartition("/")[0]
        if service in self._open:
            return handler
        keys = self._keys()
        if keys is not None:
            try:
                keys.authorize(handler_call_details.invocation_metadata or (), service)
            except ServingError as exc:
                log.debug("refused a call to %s: %s", method, exc.message)
                return self._refusing(handler, method, exc)
        return self._guarded(handler, method)

    def enter(self) -> None:
        """Count a call that does not pass through the interceptor (the HTTP API) against the
        same bound; pair with :meth:`leave`.

        Raises:
            ServingError: RESOURCE_EXHAUSTED when the bound is reached.
        """
        if self._limit and self.in_flight >= self._limit:
            raise ServingError.resource_exhausted(
                f"the server is at its limit of {self._limit} concurrent calls; retry with "
                "backoff")
        self.in_flight += 1

    def leave(self) -> None:
        """End a call counted by :meth:`enter`."""
        self.in_flight -= 1

    def _reject(self, method: str, code: grpc.StatusCode) -> None:
        if self._on_reject is not None:
            try:
                self._on_reject(method, code)
            except Exception:
                log.exception("on_reject callback failed")

    def _refusing(self, handler, method: str, error: ServingError):
        """A handler that answers ``error`` without reading the request (built per refused
        call: it carries that call's message)."""
        async def refuse(request, context):
            self._reject(method, error.code)
            await context.abort(error.code, error.message)

        async def refuse_streaming(request, context):
            self._reject(method, error.code)
            await context.abort(error.code, error.message)
            yield  # pragma: no cover - makes this an async generator

        behavior = refuse_streaming if handler.response_streaming else refuse
        return _handler_like(handler, behavior, lambda data: None)

    def _guarded(self, handler, method: str):
        cached = self._guarded_handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, method)
        self._guarded_handlers[method] = (handler, guarded)
        return guarded

    def _guard(self, handler, method: str):
        """``handler`` wrapped: the concurrency bound, and INVALID_ARGUMENT for a request that
        does not parse."""
        original = _original(handler)

        async def admit(context) -> None:
            if self._limit and self.in_flight >= self._limit:
                self._reject(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is at its limit of {self._limit} concurrent calls; retry with "
                    "backoff")

        async def checked(requests):
            async for request in requests:
                if request is _MALFORMED:
                    raise _malformed(method)
                yield request

        async def invalid(context) -> None:
            error = _malformed(method)
            self._reject(method, error.code)
            await context.abort(error.code, error.message)

        if handler.response_streaming:
            async def behavior(request, context):
                if not handler.request_streaming and request is _MALFORMED:
                    await invalid(context)
                await admit(context)
                self.in_flight += 1
                try:
                    source = checked(request) if handler.request_streaming else request
                    async for response in original(source, context):
                        yield response
                finally:
                    self.in_flight -= 1
        else:
            async def behavior(request, context):
                if not handler.request_streaming and request is _MALFORMED:
                    await invalid(context)
                await admit(context)
                self.in_flight += 1
                try:
                    source = checked(request) if handler.request_streaming else request
                    return await original(source, context)
                finally:
                    self.in_flight -= 1

        return _handler_like(handler, behavior, _tolerant(handler.request_deserializer))
