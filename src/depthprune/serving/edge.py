"""The edge half: `EdgeClient` generates greedily with layers [0, k) and its exits, asking the cloud when unsure.

Modes: "standalone" (never asks: the token of the first confident exit, else of the deepest edge exit),
"collaborative" (CE-CoLLM: a confident exit decides on the edge and the layer-k state is uploaded in the background
without waiting; otherwise the state goes up with a request for the token), "cloud" (the baseline: the edge sends
token ids and the cloud runs the whole model, through the same server and transport).

Faults: the client keeps every position's input it produced; when the cloud answers "unknown session" (restart,
eviction, TTL) or reports a position gap, it opens a new session and resends everything, so greedy output is unchanged.
When the cloud cannot be reached (connection error, timeout, 5xx), the token is decided on the edge as in standalone
mode and flagged ("fallback"); the cloud is tried again after `retry_interval` seconds, and the positions it missed
are sent with the next request. `Shaper` adds a stated latency and bandwidth to every request of the transport.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any

import torch
from torch import nn

from depthprune.errors import DepthpruneError
from depthprune.exits.lm_heads import ExitHeadsLike
from depthprune.exits.token_criteria import TokenCriterion, parse_criterion
from depthprune.serving.context import ContextError, ContextManager
from depthprune.serving.server import SESSION_HEADER
from depthprune.serving.split import EdgeState, check_split
from depthprune.serving.transfer import STATE_CODECS, decode, encode

MODES = ("standalone", "collaborative", "cloud")


class CloudUnavailable(DepthpruneError, ConnectionError):
    """The cloud could not be reached or failed (the edge falls back to standalone decisions)."""


class SessionLost(DepthpruneError, LookupError):
    """The cloud no longer knows the session (or reports a position gap): rebuild it from what the edge sent."""


class CloudRejected(DepthpruneError, ValueError):
    """The cloud refused a request with a 4xx (message included): a client bug or a limit, not a fault to hide."""


@dataclasses.dataclass(frozen=True)
class Shaper:
    """A network's cost, added in the client: rtt seconds per request (half before sending, half after the answer)
    and bandwidth in megabits per second up and down (None: unlimited)."""

    rtt: float = 0.0
    up_mbps: float | None = None
    down_mbps: float | None = None

    def up(self, nbytes: int) -> float:
        return self.rtt / 2 + (nbytes * 8 / (self.up_mbps * 1e6) if self.up_mbps else 0.0)

    def down(self, nbytes: int) -> float:
        return self.rtt / 2 + (nbytes * 8 / (self.down_mbps * 1e6) if self.down_mbps else 0.0)


def _header_bytes(headers: Any) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) if hasattr(headers, "raw") else 0


class CloudTransport:
    """HTTP(S) to one cloud server (httpx, one connection kept alive), with the shaper's delays and byte counts
    (bodies plus headers, both directions). verify: True (the system's CAs), a CA file path, or an SSLContext; a
    certificate that fails verification raises CloudRejected (a configuration error: the edge does not fall back)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        shaper: Shaper | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
    ) -> None:
        import ssl

        import httpx

        self.url, self.shaper = url.rstrip("/"), shaper or Shaper()
        self._auth = {"Authorization": f"Bearer {token}"}
        if isinstance(verify, str):  # a CA bundle: the cloud's private certificate authority (or a self-signed cert)
            try:
                verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(f"cannot read the CA file {verify}: {err}") from None
        self.client = httpx.Client(timeout=timeout, verify=verify)
        self.bytes_up = self.bytes_down = self.requests = 0
        self.cloud_split: int | None = None  # the split the cloud reported when the last session was created
        self.lock = threading.Lock()

    def _call(self, method: str, path: str, sid: str | None = None, **kwargs: Any) -> Any:
        import httpx

        headers = self._auth if sid is None else {**self._auth, SESSION_HEADER: sid}  # affinity at a balancer
        request = self.client.build_request(method, self.url + path, headers=headers, **kwargs)
        up = len(request.content or b"") + _header_bytes(request.headers)
        time.sleep(self.shaper.up(up))
        try:
            response = self.client.send(request)
        except httpx.HTTPError as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):  # a configuration error, not an outage: never fall back
                raise CloudRejected(
                    f"the cloud at {self.url} presented a certificate this edge does not trust: give its CA "
                    "(or self-signed certificate) with --ca-file PEM / CloudTransport(verify='ca.pem')"
                ) from None
            raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {type(err).__name__}") from None
        down = len(response.content) + _header_bytes(response.headers)
        time.sleep(self.shaper.down(down))
        with self.lock:
            self.bytes_up += up
            self.bytes_down += down
            self.requests += 1
        if response.status_code >= 500:
            raise CloudUnavailable(f"the cloud failed ({response.status_code}): {_detail(response)}")
        if response.status_code in (404, 409):
            raise SessionLost(_detail(response))
        if response.status_code == 429:
            raise CloudUnavailable(f"the cloud is rate limiting this token: {_detail(response)}")
        if response.status_code >= 400:
            raise CloudRejected(f"the cloud refused the request ({response.status_code}): {_detail(response)}")
        return response.json() if response.content else None

    def create(self, mode: str) -> str:
        answer = self._call("POST", "/v1/sessions", json={"mode": mode})
        self.cloud_split = answer.get("split")
        return answer["session"]

    def positions(self, sid: str, frame: bytes) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{sid}/positions", sid, content=frame)

    def close_session(self, sid: str) -> None:
        try:
            self._call("DELETE", f"/v1/sessions/{sid}", sid)
        except (SessionLost, CloudUnavailable):
            pass

    def close(self) -> None:
        self.client.close()


class LocalTransport:
    """The cloud's context manager in this process, behind the same interface as `CloudTransport` and through the
    same frames, without HTTP: what a calibration run (`serving.calibrate`) and tests use to run the real edge and
    cloud code side by side. bytes_up / bytes_down count frame bytes only (no HTTP headers)."""

    OWNER = "local"

    def __init__(self, manager: ContextManager) -> None:
        self.manager, self.cloud_split = manager, manager.split
        self.bytes_up = self.bytes_down = self.requests = 0
        self.lock = threading.Lock()

    def create(self, mode: str) -> str:
        self.requests += 1
        self.cloud_split = self.manager.split
        return self.manager.create(self.OWNER, mode).id

    def positions(self, sid: str, frame: bytes) -> dict[str, Any]:
        tensor, _, meta = decode(frame)
        try:
            session = self.manager.get(sid, self.OWNER)
            self.manager.append(session, int(meta["start"]), tensor)
        except ContextError as err:
            if err.status in (404, 409):
                raise SessionLost(str(err)) from None
            raise CloudRejected(f"the cloud refused the request ({err.status}): {err}") from None
        with self.lock:
            self.bytes_up += len(frame)
            self.requests += 1
        token = None
        if meta.get("want_token"):
            [token] = self.manager.compute([session])
        return {"token": token, "length": session.total}

    def close_session(self, sid: str) -> None:
        try:
            self.manager.close(sid, self.OWNER)
        except ContextError:
            pass

    def close(self) -> None:
        pass


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail"))
    except Exception:  # noqa: BLE001 - any non-JSON answer
        return response.text[:200]


@dataclasses.dataclass
class EdgeOutput:
    """tokens: the new tokens; sources[i]: "edge" (a confident exit), "cloud", or "fallback" (decided on the edge
    because the cloud was unreachable: flagged); exit_layers[i]: the edge exit that decided (None for the cloud);
    confident[i]: an edge exit's criterion fired (in standalone mode the others come from the deepest edge exit);
    step_times: seconds per token (the first includes the prompt); rebuilds: sessions rebuilt by resending."""

    tokens: list[int]
    sources: list[str]
    exit_layers: list[int | None]
    step_times: list[float]
    confident: list[bool] = dataclasses.field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    rebuilds: int = 0
    bytes_up_prompt: int = 0  # of bytes_up: sent before the first token (session + the prompt's states)

    @property
    def flagged(self) -> list[bool]:
        return [s == "fallback" for s in self.sources]

    def edge_share(self) -> float:
        return sum(s != "cloud" for s in self.sources) / max(1, len(self.sources))


class EdgeClient:
    """One edge device: the model's layers [0, split) with exit heads and a criterion, and a cloud transport."""

    def __init__(
        self,
        model: nn.Module,
        split: int,
        heads: ExitHeadsLike | None = None,
        criterion: TokenCriterion | str | None = None,
        *,
        transport: CloudTransport | LocalTransport | None = None,
        mode: str = "collaborative",
        codec: str = "fp16",
        async_upload: bool = True,
        retry_interval: float = 5.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if codec not in STATE_CODECS:
            raise ValueError(f"codec must be one of {STATE_CODECS}, got {codec!r}")
        check_split(model, split, heads)
        if mode != "cloud" and (heads is None or not heads.layers) and mode == "standalone":
            raise ValueError("standalone mode needs exit heads at or below the split (it never asks the cloud)")
        if mode != "standalone" and transport is None:
            raise ValueError(f"{mode} mode needs a cloud transport (CloudTransport(url, token))")
        self.model, self.split, self.heads, self.mode, self.codec = model, split, heads, mode, codec
        self.criterion = parse_criterion(criterion) if isinstance(criterion, str) else criterion
        self.transport, self.async_upload, self.retry_interval = transport, async_upload, retry_interval
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="depthprune-edge-upload")

    # ---- the session with the cloud ----------------------------------------------------------------------------------
    def _sync(self, run: dict[str, Any], upto: int, want: bool) -> int | None:
        """Send positions [synced, upto) (rebuilding the session when the cloud lost it); the token when `want`."""
        history = run["history"]
        rebuilt = False
        while True:
            if run["sid"] is None:
                run["sid"], run["synced"] = self.transport.create("ids" if self.mode == "cloud" else "states"), 0
                served = getattr(self.transport, "cloud_split", None)
                if self.mode != "cloud" and served is not None and served != self.split:
                    raise CloudRejected(
                        f"the cloud serves layers [{served}, n) but this edge runs layers [0, {self.split}): start "
                        f"the edge with --split {served} (or the cloud with --split {self.split})"
                    )
            start = run["synced"]
            chunk = torch.cat(history)[start:upto]
            codec = "ids" if self.mode == "cloud" else self.codec
            frame = encode(chunk, codec, {"start": start, "want_token": want})
            try:
                answer = self.transport.positions(run["sid"], frame)
            except SessionLost:
                if rebuilt:
                    raise
                run["sid"], rebuilt = None, True
                run["rebuilds"] += 1
                continue
            run["synced"] = upto
            return answer["token"] if want else None

    def _upload(self, run: dict[str, Any], upto: int) -> None:
        if time.monotonic() < run["down_until"]:
            return
        try:
            self._sync(run, upto, False)
        except CloudUnavailable:
            run["down_until"] = time.monotonic() + self.retry_interval

    def _ask(self, run: dict[str, Any], upto: int) -> int | None:
        """The cloud's token after position upto - 1, or None when it cannot be reached (then retried later)."""
        if time.monotonic() < run["down_until"]:
            return None
        try:
            return self._sync(run, upto, True)
        except CloudUnavailable:
            run["down_until"] = time.monotonic() + self.retry_interval
            return None

    # ---- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor | list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = None
    ) -> EdgeOutput:
        """Greedy continuation of one prompt (token ids [P] or [1, P]); stops at an eos id when given."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() == 0 or max_new_tokens < 1:
            raise ValueError("give a non-empty prompt and max_new_tokens >= 1")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        t = self.transport
        before = (t.bytes_up, t.bytes_down, t.requests) if t is not None else (0, 0, 0)
        run: dict[str, Any] = {"sid": None, "synced": 0, "history": [], "rebuilds": 0, "down_until": 0.0}
        edge = EdgeState(self.model, self.split, self.heads, self.criterion) if self.mode != "cloud" else None
        out = EdgeOutput([], [], [], [])
        pending: list[concurrent.futures.Future] = []
        feed, total = ids, 0
        try:
            for _ in range(max_new_tokens):
                start = time.perf_counter()
                if edge is not None:
                    step = edge.run(feed)
                    run["history"].append(step.states.detach().float().cpu())
                else:
                    run["history"].append(feed)
                total += feed.numel()
                if self.mode == "standalone":
                    deepest = edge.exits[-1]
                    token, source = step.standalone_token, "edge"
                    layer = step.exit_layer if step.exit_layer is not None else deepest
                elif self.mode == "collaborative" and step.token is not None:
                    token, source, layer = step.token, "edge", step.exit_layer
                    if self.async_upload:
                        pending.append(self.pool.submit(self._upload, run, total))
                    else:
                        self._upload(run, total)
                else:
                    for fut in pending:  # the uploads go first, in order (one worker)
                        fut.result()
                    pending.clear()
                    token = self.pool.submit(self._ask, run, total).result()
                    source, layer = "cloud", None
                    if token is None:
                        if edge is None:
                            raise CloudUnavailable("the cloud is unreachable and cloud mode has no edge exits")
                        token, source, layer = step.standalone_token, "fallback", edge.exits[-1] if edge.exits else None
                        if token is None:
                            raise CloudUnavailable("the cloud is unreachable and the edge has no exit heads")
                out.tokens.append(int(token))
                out.sources.append(source)
                out.exit_layers.append(layer)
                out.confident.append(edge is not None and step.token is not None)
                out.step_times.append(time.perf_counter() - start)
                if t is not None and len(out.tokens) == 1:
                    for fut in pending:
                        fut.result()
                    out.bytes_up_prompt = t.bytes_up - before[0]
                if int(token) in eos:
                    break
                feed = torch.tensor([int(token)])
        finally:
            for fut in pending:
                fut.result()
            if run["sid"] is not None:
                self.transport.close_session(run["sid"])
        if t is not None:
            out.bytes_up, out.bytes_down, out.requests = (
                t.bytes_up - before[0],
                t.bytes_down - before[1],
                t.requests - before[2],
            )
        out.rebuilds = run["rebuilds"]
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.transport is not None:
            self.transport.close()


__all__ = [
    "MODES",
    "CloudRejected",
    "CloudTransport",
    "CloudUnavailable",
    "EdgeClient",
    "EdgeOutput",
    "LocalTransport",
    "SessionLost",
    "Shaper",
]
