"""The cloud half as an HTTP service (FastAPI on uvicorn): sessions of the context manager, batched forwards.

API (every route but /v1/health needs `Authorization: Bearer TOKEN`):
- GET  /v1/health: model facts, no secrets.
- POST /v1/sessions  JSON {"mode": "states" | "ids"} -> 201 {"session", "split", "hidden_size", "num_layers", "max_seq"}
  and the header X-Session-Id (the edge sends it back on every request of the session: a load balancer's affinity key)
- POST /v1/sessions/{id}/positions  body: a `transfer` frame (states [m, hidden] in any state codec, or ids [m])
  with meta {"start": first position, "want_token": bool} -> {"token": int | null, "length": positions held}.
  Without want_token the positions are only stored (filled lazily); with it, every stored position is computed and
  the next token returned. Requests of many sessions that wait at the same moment share one forward.
- DELETE /v1/sessions/{id} -> 204;  GET /v1/stats -> what was computed (layer-positions, seconds), sessions, bytes.

Security: tokens come from a file or the environment (`load_tokens`), are compared with `hmac.compare_digest`
against every known token, and are never logged or echoed; a session is bound to the name of the token that created
it. Limits: body bytes (413, checked while reading), positions per request and sequence length (413), sessions per
token (429), requests per second per token (429, token bucket). Every field is checked and answered with a 4xx and
a message; unexpected failures answer 500 without details and leave the server running.
"""

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
from typing import Any

import torch
from torch import nn

from depthprune.errors import DepthpruneError
from depthprune.serving.context import ContextError, ContextManager, Session
from depthprune.serving.transfer import FrameError, FrameTooLarge, decode

LOG = logging.getLogger("depthprune.serving")
TOKENS_ENV = "DEPTHPRUNE_CLOUD_TOKENS"
SESSION_HEADER = "X-Session-Id"
"""Set on POST /v1/sessions answers and sent by the edge with every request of the session: session affinity."""
_SID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class ServerConfigError(DepthpruneError, ValueError):
    """The server cannot start as configured (no tokens, bad limits)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-server limits. rate: requests per second per token (burst: the bucket's size)."""

    max_body: int = 4 << 20
    max_positions: int = 2048
    max_seq: int | None = None
    sessions_per_token: int = 64
    rate: float = 200.0
    burst: int = 400
    ttl: float = 300.0
    max_bytes: int = 2 << 30
    batch_window: float = 0.002
    max_batch: int = 64

    def __post_init__(self) -> None:
        for name in ("max_body", "max_positions", "sessions_per_token", "burst", "max_batch", "max_bytes"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rate <= 0 or self.ttl <= 0 or self.batch_window < 0:
            raise ServerConfigError("rate and ttl must be > 0 and batch_window >= 0")


def load_tokens(path: str | os.PathLike | None = None, env: str = TOKENS_ENV) -> dict[str, str]:
    """API tokens {name: token} from a file (one per line, `name:token` or just `token`; # comments) or, without a
    file, from the environment variable `env` (comma-separated, same forms). Raises unless at least one is found."""
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            entries = [line.strip() for line in fh]
        where = f"the tokens file {path}"
    else:
        entries = [e.strip() for e in os.environ.get(env, "").split(",")]
        where = f"the environment variable {env}"
    tokens: dict[str, str] = {}
    for i, entry in enumerate(e for e in entries if e and not e.startswith("#")):
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = f"token-{i}", entry
        if len(token) < 16:
            raise ServerConfigError(f"an API token in {where} is shorter than 16 characters; use long random tokens")
        tokens[name.strip()] = token.strip()
    if not tokens:
        raise ServerConfigError(
            f"no API tokens in {where}: give --tokens-file FILE (lines 'name:token') or set {env}='name:token,...'"
        )
    return tokens


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst, self.level, self.at = rate, float(burst), float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


class Batcher:
    """One worker thread that runs the cloud layers: requests waiting at the same moment share one forward."""

    def __init__(self, manager: ContextManager, window: float, max_batch: int) -> None:
        self.manager, self.window, self.max_batch = manager, window, max_batch
        self.queue: queue.Queue[tuple[Session, concurrent.futures.Future] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="depthprune-batcher", daemon=True)
        self.thread.start()

    def submit(self, session: Session) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((session, future))
        return future

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            if self.window:
                time.sleep(self.window)
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                tokens = self.manager.compute([s for s, _ in batch])
            except Exception as err:  # noqa: BLE001 - answered per request, the worker goes on
                LOG.exception("cloud forward failed")
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            for (_, fut), token in zip(batch, tokens, strict=True):
                fut.set_result(token)


def create_app(model: nn.Module, split: int, tokens: dict[str, str], limits: Limits | None = None) -> Any:
    """The FastAPI app serving layers [split, n) of `model` (and the whole model for token-id sessions)."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.responses import JSONResponse

    if not tokens:
        raise ServerConfigError("the server needs at least one API token (see depthprune.serving.server.load_tokens)")
    limits = limits or Limits()
    model.eval()
    manager = ContextManager(
        model,
        split,
        ttl=limits.ttl,
        max_bytes=limits.max_bytes,
        max_seq=limits.max_seq,
        sessions_per_owner=limits.sessions_per_token,
    )
    secrets_list = [(name, token.encode()) for name, token in tokens.items()]
    buckets = {name: _Bucket(limits.rate, limits.burst) for name in tokens}
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(min(limits.ttl / 2, 5.0)):
            manager.reap()

    state: dict[str, Any] = {}

    async def lifespan(app: Any):
        state["batcher"] = Batcher(manager, limits.batch_window, limits.max_batch)
        thread = threading.Thread(target=reaper, name="depthprune-reaper", daemon=True)
        thread.start()
        yield
        stop.set()
        state["batcher"].stop()

    app = FastAPI(title="depthprune cloud", lifespan=lifespan)
    app.state.manager = manager

    @app.exception_handler(ContextError)
    async def _context_error(request: Request, err: ContextError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(FrameError)
    async def _frame_error(request: Request, err: FrameError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=413 if isinstance(err, FrameTooLarge) else 400)

    def owner_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        found = None
        given_b = given.strip().encode()
        for name, token in secrets_list:  # every token is compared, in constant time each
            if hmac.compare_digest(given_b, token) and scheme.lower() == "bearer":
                found = name
        if found is None:
            raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})
        if not buckets[found].take():
            raise HTTPException(
                429, f"rate limit: at most {limits.rate:g} requests per second per token", headers={"Retry-After": "1"}
            )
        return found

    def session_of(request: Request, sid: str) -> Session:
        owner = owner_of(request)
        if not _SID.match(sid):
            raise ContextError("unknown session (malformed id)", 404)
        return manager.get(sid, owner)

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body):
            raise HTTPException(413, f"payload too large: the limit is {limits.max_body} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body:
                raise HTTPException(413, f"payload too large: the limit is {limits.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_type": model.config.model_type,
            "num_layers": manager.num_layers,
            "split": split,
            "hidden_size": manager.hidden_size,
        }

    @app.post("/v1/sessions", status_code=201)
    async def create(request: Request) -> JSONResponse:
        owner = owner_of(request)
        body = await read_body(request)
        mode = "states"
        if body:
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HTTPException(400, 'the body must be JSON, e.g. {"mode": "states"}') from None
            if not isinstance(data, dict) or set(data) - {"mode"}:
                raise HTTPException(422, "the body takes one field: mode ('states' or 'ids')")
            mode = data.get("mode", "states")
        session = manager.create(owner, mode)
        body = {
            "session": session.id,
            "mode": mode,
            "split": split,
            "hidden_size": manager.hidden_size,
            "num_layers": manager.num_layers,
            "max_seq": manager.max_seq,
        }
        # the header a load balancer keys session affinity on (the edge sends it back with every request)
        return JSONResponse(body, status_code=201, headers={SESSION_HEADER: session.id})

    @app.post("/v1/sessions/{sid}/positions")
    async def positions(sid: str, request: Request) -> dict[str, Any]:
        session = session_of(request, sid)
        body = await read_body(request)
        tensor, codec, meta = decode(body, max_elements=limits.max_positions * manager.hidden_size)
        start, want = meta.get("start"), meta.get("want_token", False)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise HTTPException(422, f"meta.start must be a non-negative integer, got {start!r}")
        if not isinstance(want, bool):
            raise HTTPException(422, f"meta.want_token must be true or false, got {want!r}")
        if (codec == "ids") != (session.first == 0):
            kind = (
                "token ids (codec 'ids')" if session.first == 0 else "layer states (fp32/fp16/bf16/int8/int8-outlier)"
            )
            raise HTTPException(422, f"this session takes {kind}, the frame holds codec {codec!r}")
        if tensor.shape[0] > limits.max_positions:
            raise HTTPException(413, f"{tensor.shape[0]} positions in one request; the limit is {limits.max_positions}")
        if not session.lock.acquire(blocking=False):
            raise HTTPException(409, "another request for this session is in progress; send one at a time")
        try:
            manager.append(session, start, tensor)
            if not want:
                return {"token": None, "length": session.total}
            if session.pending_len == 0:
                raise HTTPException(422, "want_token needs at least one new position (the last one decides the token)")
            try:
                token = await asyncio.wrap_future(state["batcher"].submit(session))
            except Exception:  # noqa: BLE001 - logged by the batcher; the client gets no internals
                raise HTTPException(500, "the cloud forward failed; the session was kept, retry the request") from None
            return {"token": token, "length": session.total}
        finally:
            session.last_used = time.monotonic()
            session.lock.release()

    @app.delete("/v1/sessions/{sid}", status_code=204, response_class=Response)
    async def close(sid: str, request: Request):
        session = session_of(request, sid)
        manager.close(session.id, session.owner)
        return Response(status_code=204)

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        owner_of(request)
        return manager.describe()

    return app


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the app with uvicorn (blocking); TLS through uvicorn's own certificate options."""
    import uvicorn

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ServerConfigError("TLS needs both --ssl-certfile and --ssl-keyfile (PEM files)")
    for path in (ssl_certfile, ssl_keyfile):
        if path is not None and not os.path.isfile(path):
            raise ServerConfigError(f"no such TLS file: {path}")
    torch.set_grad_enabled(False)
    uvicorn.run(app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, log_level=log_level)


class ServerThread:
    """uvicorn serving `app` in a background thread of this process (tests, benchmarks): `start()`, `stop()`."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port, self.tls = host, port, ssl_certfile is not None
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="depthprune-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


__all__ = [
    "SESSION_HEADER",
    "Batcher",
    "Limits",
    "ServerConfigError",
    "ServerThread",
    "create_app",
    "load_tokens",
    "serve",
]
