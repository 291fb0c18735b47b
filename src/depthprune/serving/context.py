"""CE-CoLLM's cloud context manager: per-session KV caches of the cloud's layers, filled lazily, with an idle TTL and
a memory cap.

The edge uploads the layer-k state of every position (also those it decided itself) without waiting; the manager only
stores them (`append`). When a session next needs a token, every stored position is run through the cloud layers in
one batched forward, together with the other sessions that asked in the same round (`compute`): EE-LLM's recompute
strategy at the granularity of a session, exact because the uploaded states are exact. Sessions idle longer than
`ttl` are reaped; when the caches and stored states exceed `max_bytes`, least recently used sessions are evicted. A
reaped or evicted session answers "unknown session", and the edge rebuilds it by resending what it sent.

Session ids are unguessable (`secrets.token_urlsafe`) and bound to the API token's name that created them: another
token's id is reported unknown, exactly like an id that never existed.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from typing import Any

import torch
from torch import nn

from depthprune.errors import DepthpruneError
from depthprune.serving.split import CloudItem, check_split, cloud_forward


class ContextError(DepthpruneError, ValueError):
    """A request does not fit a session; `status` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Session:
    """One edge sequence on the cloud: cache of layers [first, n) for positions [0, length), then pending inputs."""

    id: str
    owner: str  # the API token's name
    first: int  # the split (layer-k states) or 0 (token ids: the cloud-only baseline)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    length: int = 0
    pending: list[torch.Tensor] = dataclasses.field(default_factory=list)
    pending_len: int = 0
    last_used: float = 0.0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        """Positions the session holds, computed or pending."""
        return self.length + self.pending_len

    def nbytes(self) -> int:
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
        return kv + sum(p.numel() * p.element_size() for p in self.pending)


@dataclasses.dataclass
class Stats:
    """What the cloud computed: layer-positions, seconds in forwards, forwards and requests served by them."""

    layer_tokens: int = 0
    compute_seconds: float = 0.0
    forwards: int = 0
    computed_requests: int = 0
    evicted: int = 0
    reaped: int = 0


class ContextManager:
    """Sessions of one model split at `split`; thread-safe (one lock for the table, the model runs under `run_lock`)."""

    def __init__(
        self,
        model: nn.Module,
        split: int,
        *,
        ttl: float = 300.0,
        max_bytes: int = 2 << 30,
        max_seq: int | None = None,
        sessions_per_owner: int = 64,
    ) -> None:
        self.num_layers = check_split(model, split)
        self.model, self.split, self.ttl, self.max_bytes = model, split, float(ttl), int(max_bytes)
        self.hidden_size = int(model.config.get_text_config(decoder=True).hidden_size)
        limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        self.max_seq = int(max_seq or limit or 2048)
        self.sessions_per_owner = int(sessions_per_owner)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.run_lock = threading.Lock()
        self.stats = Stats()

    # ---- the table -------------------------------------------------------------------------------------------------
    def create(self, owner: str, mode: str = "states") -> Session:
        if mode not in ("states", "ids"):
            raise ContextError(f"mode must be 'states' (layer-{self.split} states) or 'ids' (token ids), got {mode!r}")
        self.reap()
        with self.lock:
            mine = sum(1 for s in self.sessions.values() if s.owner == owner)
            if mine >= self.sessions_per_owner:
                raise ContextError(
                    f"this token holds {mine} sessions, the limit is {self.sessions_per_owner}; close one (DELETE) "
                    "or wait for idle ones to expire",
                    429,
                )
            sid = secrets.token_urlsafe(24)
            session = Session(sid, owner, self.split if mode == "states" else 0, last_used=time.monotonic())
            self.sessions[sid] = session
            return session

    def get(self, sid: str, owner: str) -> Session:
        """The session `sid` of `owner`; another owner's session is reported unknown (404), as a missing one."""
        with self.lock:
            session = self.sessions.get(sid)
            if session is None or not secrets.compare_digest(session.owner, owner):
                raise ContextError(
                    "unknown session (expired, evicted, the server restarted, or never created): create a new "
                    "session and resend the context",
                    404,
                )
            session.last_used = time.monotonic()
            return session

    def close(self, sid: str, owner: str) -> None:
        self.get(sid, owner)
        with self.lock:
            self.sessions.pop(sid, None)

    def reap(self, now: float | None = None) -> int:
        """Drop sessions idle longer than the TTL; return how many."""
        now = time.monotonic() if now is None else now
        with self.lock:
            dead = [sid for sid, s in self.sessions.items() if now - s.last_used > self.ttl and not s.lock.locked()]
            for sid in dead:
                del self.sessions[sid]
            self.stats.reaped += len(dead)
        return len(dead)

    def nbytes(self) -> int:
        with self.lock:
            return sum(s.nbytes() for s in self.sessions.values())

    def _enforce_cap(self, keep: set[str]) -> None:
        """Evict least recently used sessions (never those in `keep`) until the stored bytes fit `max_bytes`."""
        with self.lock:
            total = sum(s.nbytes() for s in self.sessions.values())
            for s in sorted(self.sessions.values(), key=lambda s: s.last_used):
                if total <= self.max_bytes:
                    break
                if s.id in keep:
                    continue
                total -= s.nbytes()
                del self.sessions[s.id]
                self.stats.evicted += 1

    # ---- requests --------------------------------------------------------------------------------------------------
    def check_append(self, session: Session, start: int, inputs: torch.Tensor) -> None:
        """Raise ContextError (4xx, with what was wrong) unless `inputs` continue `session` at position `start`."""
        if session.first > 0:
            if inputs.dim() != 2 or inputs.shape[1] != self.hidden_size:
                raise ContextError(
                    f"states must be [positions, {self.hidden_size}] (this model's hidden size), got "
                    f"{list(inputs.shape)}",
                    422,
                )
        elif inputs.dim() != 1:
            raise ContextError(f"token ids must be [positions], got {list(inputs.shape)}", 422)
        else:
            vocab = int(self.model.config.get_text_config(decoder=True).vocab_size)
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
                raise ContextError(f"token ids must lie in 0..{vocab - 1}", 422)
        if start != session.total:
            raise ContextError(
                f"position gap: the session holds positions [0, {session.total}), the request starts at {start}; "
                f"send from position {session.total} (or rebuild the session)",
                409,
            )
        if session.total + inputs.shape[0] > self.max_seq:
            raise ContextError(
                f"sequence too long: {session.total} + {inputs.shape[0]} positions exceed the limit of {self.max_seq}",
                413,
            )

    def append(self, session: Session, start: int, inputs: torch.Tensor) -> None:
        """Store new positions without computing them (they are filled when the session next wants a token)."""
        self.check_append(session, start, inputs)
        session.last_used = time.monotonic()
        if inputs.shape[0]:
            param = next(self.model.parameters())
            session.pending.append(inputs.to(param.dtype) if session.first > 0 else inputs.to(torch.long))
            session.pending_len += int(inputs.shape[0])
        self._enforce_cap({session.id})

    def compute(self, sessions: list[Session]) -> list[int]:
        """Fill every session's pending positions and return each one's next token, one forward per kind of session
        (states / ids). Every session must hold at least one pending position."""
        tokens: dict[str, int] = {}
        for first in sorted({s.first for s in sessions}):
            group = [s for s in sessions if s.first == first]
            items = [
                CloudItem(s.kv, s.length, torch.cat(s.pending) if len(s.pending) > 1 else s.pending[0], True)
                for s in group
            ]
            with self.run_lock:
                start = time.perf_counter()
                results = cloud_forward(self.model, first, items)
                seconds = time.perf_counter() - start
            with self.lock:
                self.stats.compute_seconds += seconds
                self.stats.forwards += 1
                self.stats.computed_requests += len(group)
                self.stats.layer_tokens += sum(s.pending_len for s in group) * (self.num_layers - first)
            for s, (kv, token) in zip(group, results, strict=True):
                s.kv, s.length = kv, s.length + s.pending_len
                s.pending, s.pending_len = [], 0
                tokens[s.id] = int(token)
        self._enforce_cap({s.id for s in sessions})
        return [tokens[s.id] for s in sessions]

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {
                "sessions": len(self.sessions),
                "stored_bytes": sum(s.nbytes() for s in self.sessions.values()),
                **dataclasses.asdict(self.stats),
            }


__all__ = ["ContextError", "ContextManager", "Session", "Stats"]
