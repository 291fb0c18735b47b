"""Cloud-edge split inference (depthprune.serving) on tiny random decoders: the split equals the full model, the
context manager's lazy fill equals a hand computation, frames round-trip, and a real server on loopback answers
concurrent sessions, wrong tokens, foreign sessions, oversized and malformed payloads, killed clients, restarts and
an unreachable cloud as a user expects, without changing any other session's output."""

import dataclasses
import json
import shutil
import struct
import subprocess
import threading
import time

import httpx
import pytest
import torch
from tiny_models import build

from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.serving.context import ContextError, ContextManager
from depthprune.serving.edge import CloudRejected, CloudTransport, EdgeClient, Shaper
from depthprune.serving.server import Limits, ServerConfigError, ServerThread, create_app, load_tokens
from depthprune.serving.split import CloudItem, EdgeState, SplitError, cloud_forward
from depthprune.serving.transfer import FrameError, decode, encode

SPLIT = 2
NEW = 6
NEVER = "max_prob:1.0"
ALICE, BOB, CAROL = "alice-" + "a" * 26, "bob-" + "b" * 28, "carol-" + "c" * 26
TOKENS = {"alice": ALICE, "bob": BOB, "carol": CAROL}


@dataclasses.dataclass(frozen=True)
class Sign:
    """Exits when the first hidden feature is positive: deterministic, fires on some tokens and not on others."""

    threshold: float = 0.0
    name = "sign"
    needs = ("hidden",)

    def decide(self, state):
        return state.hidden[:, 0] > self.threshold


def prompt(seed, length=5):
    return torch.randint(3, 99, (length,), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new=NEW):
    out = model.generate(ids[None], max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.numel() :].tolist()


# ---- transfer ------------------------------------------------------------------------------------------------------
def test_frames_round_trip_and_bounds():
    x = torch.randn(5, 32) * 3
    for codec, cast in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        exact = x.to(cast).float()  # representable values come back exactly
        y, got, meta = decode(encode(exact, codec, {"start": 3}))
        assert got == codec and meta == {"start": 3} and torch.equal(y, exact)
    y, _, _ = decode(encode(x, "fp32"))
    assert torch.equal(y, x)
    y, _, _ = decode(encode(x, "int8"))
    bound = x.abs().amax(-1, keepdim=True) / 254 + 1e-6
    assert bool(((y - x).abs() <= bound).all())
    assert len(encode(x, "int8")) < len(encode(x, "fp16")) < len(encode(x, "fp32"))
    ids, codec, _ = decode(encode(torch.tensor([5, 7, 98]), "ids"))
    assert codec == "ids" and ids.tolist() == [5, 7, 98]


def test_int8_outlier_frames_send_outlier_channels_in_fp16():
    x = torch.randn(4, 32)
    x[:, 5] *= 400  # an outlier feature in every row (as SmolLM2's feature 507)
    x[2, 17] = -900.0  # and one in one row only
    frame = encode(x, "int8-outlier")
    y, codec, _ = decode(frame)
    out = [5, 17]
    assert codec == "int8-outlier" and json.loads(frame[8 : 8 + struct.unpack("<I", frame[4:8])[0]])["outliers"] == out
    assert torch.equal(y[:, out], x[:, out].half().float())  # the outlier channels: fp16 exactly
    rest = torch.ones(32, dtype=torch.bool)
    rest[out] = False
    bound = x[:, rest].abs().amax(-1, keepdim=True) / 254 + 1e-6  # the others: int8 on their own absmax
    assert bool(((y[:, rest] - x[:, rest]).abs() <= bound).all())
    plain, _, _ = decode(encode(x, "int8"))  # plain int8: the outlier sets every element's step
    assert (plain - x)[:, rest].abs().mean() > 20 * (y - x)[:, rest].abs().mean()
    assert len(frame) < len(encode(x, "fp16")) and decode(encode(torch.randn(3, 8), "int8-outlier"))[0].shape == (3, 8)
    head = {"codec": "int8-outlier", "shape": [1, 4], "meta": {}}
    for bad in ([3, 1], [4], [1, 1], ["a"]):
        text = json.dumps({**head, "outliers": bad}).encode()
        with pytest.raises(FrameError, match="outliers must be"):
            decode(b"DPF1" + struct.pack("<I", len(text)) + text + bytes(16))


def test_malformed_frames_say_what_is_wrong():
    good = encode(torch.randn(2, 4), "fp16")
    head = json.dumps({"codec": "fp16", "shape": [2, 4, 1], "meta": {}}).encode()
    cases = {
        b"not a frame at all": "DPF1",
        good[:-2]: "payload bytes",
        b"DPF1" + struct.pack("<I", 3) + b"{x}": "not JSON",
        b"DPF1" + struct.pack("<I", len(head)) + head + bytes(16): "positions, hidden",
        encode(torch.tensor([[float("nan"), 1.0]]), "fp32"): "NaN",
    }
    for frame, words in cases.items():
        with pytest.raises(FrameError, match=words):
            decode(frame)
    with pytest.raises(FrameError, match="elements"):
        decode(good, max_elements=4)


# ---- the split and the context manager -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_split_then_cloud_equals_full_model(name):
    model = build(name)
    ids = prompt(0)
    edge, kv, length, tokens, feed = EdgeState(model, SPLIT), [], 0, [], ids
    for _ in range(NEW):
        step = edge.run(feed)
        [(kv, token)] = cloud_forward(model, SPLIT, [CloudItem(kv, length, step.states, True)])
        length += feed.numel()
        tokens.append(token)
        feed = torch.tensor([token])
    assert tokens == greedy(model, ids)


def test_batched_cloud_forward_equals_each_session_alone():
    model = build("llama")
    items = []
    for seed, length in ((1, 7), (2, 3), (3, 5)):
        ids = prompt(seed, length)
        edge = EdgeState(model, SPLIT)
        states = edge.run(ids).states
        [(kv, _)] = cloud_forward(model, SPLIT, [CloudItem([], 0, states[:-1], True)])
        items.append(CloudItem(kv, length - 1, states[-1:], True))
    together = cloud_forward(model, SPLIT, items)
    for item, (kv, token) in zip(items, together, strict=True):
        [(kv_alone, token_alone)] = cloud_forward(model, SPLIT, [item])
        assert token == token_alone
        for (k, v), (ka, va) in zip(kv, kv_alone, strict=True):
            torch.testing.assert_close(k, ka)
            torch.testing.assert_close(v, va)


def test_lazy_fill_equals_hand_computation():
    model = build("llama")
    ids = prompt(4, 7)
    with torch.no_grad():
        full = model(ids[None], use_cache=True, output_hidden_states=True)
    states = full.hidden_states[SPLIT][0]  # [7, hidden]: the state entering layer SPLIT
    manager = ContextManager(model, SPLIT)
    session = manager.create("alice")
    manager.append(session, 0, states[:4])
    manager.append(session, 4, states[4:])
    assert session.length == 0 and session.pending_len == 7  # stored, nothing computed yet
    [token] = manager.compute([session])
    assert token == int(full.logits[0, -1].argmax())
    assert session.length == 7 and manager.stats.layer_tokens == 7 * (model.config.num_hidden_layers - SPLIT)
    for j, (k, v) in enumerate(session.kv):
        layer = full.past_key_values.layers[SPLIT + j]
        torch.testing.assert_close(k, layer.keys[0])
        torch.testing.assert_close(v, layer.values[0])
    with pytest.raises(ContextError, match="position gap") as err:
        manager.append(session, 3, states[:1])
    assert err.value.status == 409
    with pytest.raises(ContextError, match="hidden size"):
        manager.append(session, 7, torch.zeros(1, 5))
    with pytest.raises(ContextError, match="unknown session"):
        manager.get(session.id, "bob")


def test_context_manager_ttl_and_memory_cap():
    model = build("llama")
    manager = ContextManager(model, SPLIT, ttl=10.0, max_bytes=2 * 4 * 32 * 4)  # room for 2 x 4 float32 states
    a, b = manager.create("alice"), manager.create("alice")
    manager.append(a, 0, torch.randn(4, 32))
    manager.append(b, 0, torch.randn(4, 32))
    manager.append(b, 4, torch.randn(4, 32))  # over the cap: the least recently used other session goes
    assert set(manager.sessions) == {b.id} and manager.stats.evicted == 1
    assert manager.reap(now=time.monotonic() + 11) == 1 and not manager.sessions


def test_bad_split_and_exit_layout():
    model = build("llama")
    with pytest.raises(SplitError, match="1..3"):
        EdgeState(model, 4)
    with pytest.raises(SplitError, match="does not run"):
        EdgeState(model, 1, DecoderExitHeads.logit_lens(model, [2]))


# ---- the server on loopback ----------------------------------------------------------------------------------------
LIMITS = Limits(max_body=64 << 10, max_positions=64, ttl=1.0, sessions_per_token=6, batch_window=0.005)


@pytest.fixture(scope="module")
def edge_model():
    return build("llama")


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS)).start()
    yield srv
    srv.stop()


def client(url, model, token=ALICE, mode="collaborative", criterion=None, **kw):
    heads = DecoderExitHeads.logit_lens(model, [0, 1])
    transport = CloudTransport(url, token, shaper=Shaper(rtt=0.002), timeout=20)
    return EdgeClient(model, SPLIT, heads, criterion or Sign(), transport=transport, mode=mode, **kw)


def raw(url, method, path, token=ALICE, **kw):
    return httpx.request(method, url + path, headers={"Authorization": f"Bearer {token}"}, timeout=20, **kw)


def test_never_firing_collaborative_and_cloud_only_equal_greedy(server, edge_model):
    ids = prompt(0)
    want = greedy(edge_model, ids)
    for mode, crit in (("collaborative", NEVER), ("cloud", None)):
        c = client(server.url, edge_model, mode=mode, criterion=crit, codec="fp32")
        out = c.generate(ids, NEW)
        c.close()
        assert out.tokens == want and out.sources == ["cloud"] * NEW


def test_concurrent_sessions_match_their_solo_runs(server, edge_model):
    prompts = [prompt(s, 4 + s) for s in range(4)]
    solo = []
    for ids in prompts:
        c = client(server.url, edge_model, codec="fp32")
        solo.append(c.generate(ids, NEW))
        c.close()
    assert any("edge" in o.sources for o in solo) and any("cloud" in o.sources for o in solo)
    results = [None] * len(prompts)

    def work(i):
        c = client(server.url, edge_model, codec="fp32")
        results[i] = c.generate(prompts[i], NEW)
        c.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for alone, together in zip(solo, results, strict=True):
        assert together.tokens == alone.tokens and together.sources == alone.sources


def test_wrong_token_and_foreign_session(server, edge_model):
    assert raw(server.url, "GET", "/v1/stats", token="x" * 30).status_code == 401
    assert httpx.get(server.url + "/v1/stats").status_code == 401
    bad = client(server.url, edge_model, token="wrong-" + "z" * 26)
    with pytest.raises(CloudRejected, match="401"):
        bad.generate(prompt(0), 2)
    bad.close()
    # alice's session, half-way; bob may neither read nor extend it; alice then goes on unharmed
    sid = raw(server.url, "POST", "/v1/sessions", json={"mode": "ids"}).json()["session"]
    ids = prompt(0)
    first = raw(server.url, "POST", f"/v1/sessions/{sid}/positions", content=encode(ids, "ids", {"start": 0}))
    assert first.status_code == 200
    frame = encode(torch.tensor([5]), "ids", {"start": ids.numel(), "want_token": True})
    foreign = raw(server.url, "POST", f"/v1/sessions/{sid}/positions", token=BOB, content=frame)
    assert foreign.status_code == 404 and "unknown session" in foreign.json()["detail"]
    assert raw(server.url, "DELETE", f"/v1/sessions/{sid}", token=BOB).status_code == 404
    frame = encode(torch.tensor([], dtype=torch.long), "ids", {"start": ids.numel(), "want_token": False})
    assert raw(server.url, "POST", f"/v1/sessions/{sid}/positions", content=frame).json()["length"] == ids.numel()
    assert raw(server.url, "DELETE", f"/v1/sessions/{sid}").status_code == 204


def test_an_edge_with_another_split_is_told_which_one(server, edge_model):
    transport = CloudTransport(server.url, ALICE, timeout=20)
    c = EdgeClient(edge_model, 3, DecoderExitHeads.logit_lens(edge_model, [0]), NEVER, transport=transport)
    with pytest.raises(CloudRejected, match=r"serves layers \[2, n\).*--split 2"):
        c.generate(prompt(0), 2)
    c.close()


def test_oversized_and_malformed_payloads_get_4xx(server, edge_model):
    sid = raw(server.url, "POST", "/v1/sessions").json()["session"]
    path = f"/v1/sessions/{sid}/positions"

    def post(content):
        return raw(server.url, "POST", path, content=content)

    big = post(encode(torch.randn(600, 32), "fp32", {"start": 0}))
    assert big.status_code == 413 and "payload too large" in big.json()["detail"]
    cases = [
        (b"garbage", 400, "DPF1"),
        (encode(torch.tensor([1, 2]), "ids", {"start": 0}), 422, "codec 'ids'"),
        (encode(torch.randn(2, 16), "fp16", {"start": 0}), 422, "hidden size"),
        (encode(torch.randn(2, 32), "fp16", {"start": 5}), 409, "position gap"),
        (encode(torch.randn(2, 32), "fp16", {"start": "0"}), 422, "meta.start"),
        (encode(torch.randn(2, 32), "fp16", {"start": 0, "want_token": 1}), 422, "want_token"),
        (encode(torch.randn(65, 32), "int8", {"start": 0}), 413, "elements"),
        (encode(torch.randn(65, 1), "int8", {"start": 0}), 413, "limit is 64"),
    ]
    for content, status, words in cases:
        answer = post(content)
        assert answer.status_code == status and words in answer.json()["detail"], (status, answer.text)
    assert raw(server.url, "POST", "/v1/sessions", json={"mode": "soup"}).status_code == 400
    assert raw(server.url, "POST", "/v1/sessions/short/positions", content=b"").status_code == 404
    ok = post(encode(torch.randn(2, 32), "fp16", {"start": 0, "want_token": True}))  # the session still works
    assert ok.status_code == 200 and isinstance(ok.json()["token"], int)
    raw(server.url, "DELETE", path.rsplit("/", 1)[0])


def test_killed_client_is_reaped_after_ttl(server):
    sid = raw(server.url, "POST", "/v1/sessions", token=CAROL).json()["session"]
    frame = encode(torch.randn(3, 32), "fp16", {"start": 0, "want_token": True})
    assert raw(server.url, "POST", f"/v1/sessions/{sid}/positions", token=CAROL, content=frame).status_code == 200
    manager = server.server.config.app.state.manager
    assert sid in manager.sessions
    deadline = time.monotonic() + 10
    while sid in manager.sessions and time.monotonic() < deadline:  # the client "died": it never comes back
        time.sleep(0.1)
    assert sid not in manager.sessions
    frame = encode(torch.randn(1, 32), "fp16", {"start": 3})
    assert raw(server.url, "POST", f"/v1/sessions/{sid}/positions", token=CAROL, content=frame).status_code == 404


def test_sessions_per_token_limit():
    limits = dataclasses.replace(LIMITS, ttl=120.0, sessions_per_token=3)  # no reaping while the test runs
    srv = ServerThread(create_app(build("llama"), SPLIT, TOKENS, limits)).start()
    try:
        codes = [raw(srv.url, "POST", "/v1/sessions", token=BOB).status_code for _ in range(3)]
        over = raw(srv.url, "POST", "/v1/sessions", token=BOB)
        other = raw(srv.url, "POST", "/v1/sessions", token=ALICE).status_code  # the limit is per token
    finally:
        srv.stop()
    assert codes == [201] * 3 and other == 201
    assert over.status_code == 429 and "limit is 3" in over.json()["detail"]


def test_server_restart_edge_resends_with_identical_output(edge_model):
    ids = prompt(2)
    srv = ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS)).start()
    port = srv.port
    try:
        c = client(srv.url, edge_model, codec="fp32", async_upload=False)
        want = c.generate(ids, NEW)
        assert want.rebuilds == 0
        calls = {"n": 0}
        send = c.transport.positions

        def restart_then_send(sid, frame):
            nonlocal srv
            calls["n"] += 1
            if calls["n"] == 3:  # mid-generation: the cloud restarts and forgets every session
                srv.stop()
                srv = ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS), port=port).start()
            return send(sid, frame)

        c.transport.positions = restart_then_send
        got = c.generate(ids, NEW)
        c.close()
    finally:
        srv.stop()
    assert got.rebuilds >= 1 and got.tokens == want.tokens and got.sources == want.sources


def test_two_replicas_an_edge_moved_to_the_other_rebuilds_there(server, edge_model):
    """What a load balancer with session affinity does when a replica dies: the edge lands on another one."""
    ids = prompt(5)
    other = ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS)).start()
    try:
        c = client(server.url, edge_model, codec="fp32", async_upload=False)
        want = c.generate(ids, NEW)
        calls = {"n": 0}

        def route(sid, frame):
            calls["n"] += 1
            c.transport.url = server.url if calls["n"] < 3 else other.url  # replica A fails over to replica B
            return send(sid, frame)

        send, c.transport.positions = c.transport.positions, route
        got = c.generate(ids, NEW)
        c.close()
    finally:
        other.stop()
    assert got.rebuilds == 1 and got.tokens == want.tokens and got.sources == want.sources


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_through_uvicorns_options_and_the_edge_verifies_it(tmp_path, edge_model):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    app = create_app(build("llama"), SPLIT, TOKENS, LIMITS)
    srv = ServerThread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)).start()
    try:
        assert srv.url.startswith("https://")
        ids = prompt(4)
        transport = CloudTransport(srv.url, ALICE, verify=str(cert), timeout=20)
        c = EdgeClient(edge_model, SPLIT, None, None, transport=transport, codec="fp32")
        out = c.generate(ids, NEW)
        c.close()
        assert out.tokens == greedy(edge_model, ids) and out.sources == ["cloud"] * NEW  # TLS changes no token
        untrusted = EdgeClient(edge_model, SPLIT, None, None, transport=CloudTransport(srv.url, ALICE, timeout=20))
        with pytest.raises(CloudRejected, match="does not trust.*--ca-file"):  # not a silent standalone fallback
            untrusted.generate(ids, 2)
        untrusted.close()
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from the TLS port
            httpx.get(srv.url.replace("https", "http") + "/v1/health", timeout=5)
    finally:
        srv.stop()


def readme_haproxy_config(port: int, replicas: list[int], stats_socket=None) -> str:
    """The README's HAProxy configuration with this test's loopback addresses (and, with stats_socket, a runtime API
    socket the test asks which servers HAProxy sees up)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    config = text.split("```haproxy\n", 1)[1].split("```", 1)[0]
    config = re.sub(r"bind \S+", f"bind 127.0.0.1:{port}", config)
    lines = [line for line in config.splitlines() if not line.strip().startswith("server ")]
    fast = "check inter 100ms fall 1 rise 1"
    lines += [f"    server r{i} 127.0.0.1:{p} {fast}" for i, p in enumerate(replicas)]
    if stats_socket is not None:
        lines = ["global", f"    stats socket {stats_socket} level admin"] + lines
    return "\n".join(lines) + "\n"


def haproxy_servers_up(stats_socket) -> set[str]:
    """The servers of backend `cloud` that HAProxy's runtime API reports UP (its `show stat` CSV)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(stats_socket))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
    return {
        r[1] for r in rows if len(r) > 17 and r[0] == "cloud" and r[1] not in ("FRONTEND", "BACKEND") and r[17] == "UP"
    }


def wait_haproxy_up(stats_socket, servers: set[str], proxy, seconds: float = 30) -> None:
    """Block until HAProxy's health checks see every one of `servers` up (a fixed sleep is too short on a loaded
    machine: the round-robin assertions need both replicas in rotation)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if servers <= haproxy_servers_up(stats_socket):
                return
        except OSError:
            pass  # the socket is not there yet
        assert proxy.poll() is None, proxy.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"HAProxy did not see {sorted(servers)} up within {seconds} s"
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs HAProxy (Debian: apt-get install -y haproxy)")
def test_two_replicas_behind_haproxy_a_killed_replica_changes_no_output(tmp_path, edge_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replicas = [ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS)).start() for _ in range(2)]
    sock = tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(readme_haproxy_config(port, [r.port for r in replicas], sock))
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    prompts = [prompt(11), prompt(12, 6)]
    want = [greedy(edge_model, ids, 10) for ids in prompts]

    def holder(sid):
        return next((i for i, r in enumerate(replicas) if sid in r.server.config.app.state.manager.sessions), None)

    def run_two(kill_after=None):
        """Two edges at once through the balancer; with kill_after, the replica of the first edge's session is
        stopped before its request number kill_after (mid-generation). -> outputs, replicas used, killed index"""
        used, killed, outs = set(), [], [None, None]

        def work(i):
            c = client(url, edge_model, criterion=NEVER, codec="fp32", async_upload=False)
            send, calls = c.transport.positions, {"n": 0}

            def watch(sid, frame):
                calls["n"] += 1
                where = holder(sid)
                used.add(where)
                if i == 0 and calls["n"] == kill_after and where is not None:
                    replicas[where].stop()
                    killed.append(where)
                return send(sid, frame)

            c.transport.positions = watch
            outs[i] = c.generate(prompts[i], 10)
            c.close()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return outs, used, killed

    try:
        deadline = time.monotonic() + 20
        while True:  # the balancer listens and sees both replicas up
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        wait_haproxy_up(sock, {"r0", "r1"}, proxy)
        outs, used, _ = run_two()
        assert [o.tokens for o in outs] == want and [o.rebuilds for o in outs] == [0, 0]  # affinity holds
        assert used == {0, 1}  # round robin spread the two sessions
        outs, used, killed = run_two(kill_after=4)
        assert [o.tokens for o in outs] == want and len(killed) == 1  # identical greedy output after the kill
        assert outs[0].rebuilds == 1 and outs[0].sources == ["cloud"] * 10
        dead = killed[0]
        replicas[dead] = ServerThread(create_app(build("llama"), SPLIT, TOKENS, LIMITS), port=replicas[dead].port)
        replicas[dead].start()  # restarted: empty, and back in rotation once the health check sees it
        wait_haproxy_up(sock, {"r0", "r1"}, proxy)
        outs, used, _ = run_two()
        assert [o.tokens for o in outs] == want and [o.rebuilds for o in outs] == [0, 0] and used == {0, 1}
    finally:
        proxy.terminate()
        proxy.wait(10)
        for r in replicas:
            r.stop()


def test_rate_limit_answers_429():
    srv = ServerThread(create_app(build("llama"), SPLIT, TOKENS, Limits(rate=0.5, burst=2))).start()
    try:
        codes = [raw(srv.url, "GET", "/v1/stats").status_code for _ in range(3)]
        other = raw(srv.url, "GET", "/v1/stats", token=BOB).status_code  # each token has its own bucket
    finally:
        srv.stop()
    assert codes == [200, 200, 429] and other == 200


def test_unreachable_cloud_falls_back_and_flags(server, edge_model):
    ids = prompt(3)
    heads = DecoderExitHeads.logit_lens(edge_model, [0, 1])
    want = EdgeClient(edge_model, SPLIT, heads, Sign(), mode="standalone").generate(ids, NEW)
    c = client("http://127.0.0.1:9", edge_model, retry_interval=60)  # nothing listens on the discard port
    got = c.generate(ids, NEW)
    c.close()
    assert got.tokens == want.tokens  # the standalone edge's greedy output
    assert got.flagged == [not c for c in want.confident] and any(got.flagged) and not all(got.flagged)


def test_tokens_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# edges\nalice:" + ALICE + "\n" + BOB + "\n")
    assert load_tokens(path) == {"alice": ALICE, "token-1": BOB}
    monkeypatch.setenv("DEPTHPRUNE_CLOUD_TOKENS", "carol:" + CAROL)
    assert load_tokens() == {"carol": CAROL}
    monkeypatch.setenv("DEPTHPRUNE_CLOUD_TOKENS", "")
    with pytest.raises(ServerConfigError, match="no API tokens"):
        load_tokens()
    path.write_text("short\n")
    with pytest.raises(ServerConfigError, match="16 characters"):
        load_tokens(path)


# ---- the command line: a real serve-cloud process and the edge command -----------------------------------------------
def test_serve_cloud_and_edge_commands(tmp_path, capsys, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from tiny_models import tokenizer

    from depthprune.cli.main import main

    model = build("llama")
    model.generation_config.eos_token_id = []
    model.save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    DecoderExitHeads.for_model(model, [0], kind="lens").save(tmp_path / "heads")
    calibrate = ["calibrate-split", str(tmp_path / "model"), "--exits", str(tmp_path / "heads"), "--splits", "2"]
    sizes = ["--prompts", "12", "--prompt-len", "4", "--max-new-tokens", "2", "--delta", "0.3", "--grid", "1.0"]
    assert main([*calibrate, *sizes, "--codec", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "split 2, max_prob:1 -- with probability >= 0.95" in printed and "split_calibration.json" in printed
    record = json.loads((tmp_path / "heads" / "split_calibration.json").read_text())
    assert (record["split"], record["threshold"], record["n"]) == (2, 1.0, 12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DEPTHPRUNE_CLOUD_TOKENS="edge1:" + ALICE, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "depthprune", "serve-cloud", str(tmp_path / "model"), "--split", "auto"]
    cmd += ["--split-calibration", str(tmp_path / "heads" / "split_calibration.json")]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=2).json()["split"] == 2:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        monkeypatch.setenv("DEPTHPRUNE_EDGE_TOKEN", ALICE)
        base = ["edge", str(tmp_path / "model"), "--cloud", url, "--split", "2", "--prompt", "the white whale"]
        texts = {}
        for mode in ("collaborative", "cloud", "standalone"):
            args = [*base, "--exits", str(tmp_path / "heads"), "--threshold", "auto", "--mode", mode]
            args[args.index("--split") + 1] = "auto"
            assert main([*args, "--max-new-tokens", "4", "--codec", "fp32", "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            texts[mode] = report["text"]
            assert report["tokens"] == 4 and report["flagged_fallback"] == 0
        assert texts["collaborative"] == texts["cloud"]  # a threshold that never fires: the full model's text
        monkeypatch.setenv("DEPTHPRUNE_EDGE_TOKEN", BOB)
        assert main([*base, "--max-new-tokens", "2"]) != 0
        assert "refused the request (401): missing or wrong API token" in capsys.readouterr().err
    finally:
        proc.terminate()
        proc.wait(30)


# ---- calibration of the split (Learn-then-Test on collaborative continuations) -----------------------------------
def test_calibrate_split_certifies_chooses_and_matches_the_server(edge_model):
    from depthprune.ltt import binomial_cdf
    from depthprune.serving.calibrate import calibrate_split, head_cost

    heads = DecoderExitHeads.logit_lens(edge_model, [0, 1, 2])
    prompts = torch.randint(3, 99, (12, 5), generator=torch.Generator().manual_seed(7))
    grid = [1.0, 0.0145, 0.0135, 0.0125]  # the tiny lens' max_prob lies around 0.013: the low ones fire
    res = calibrate_split(
        edge_model, heads, prompts, splits=[2, 3], grid=grid, delta=0.3, max_new_tokens=3, codec="fp32", eos_token_id=[]
    )
    assert [c["split"] for c in res.candidates] == [2, 3] and res.candidates[0]["exits"] == [0, 1]
    cost, n = head_cost(edge_model), 4
    fired = False
    for cand in res.candidates:
        assert cand["epsilon"] == pytest.approx(0.05 / 2)  # Bonferroni over the two splits
        table = cand["table"]
        never = table[0]  # 1.0 never fires: every token from the cloud, identical to the full model
        assert never["risk"] == 0 and never["identical"] == 1 and never["edge_share"] == 0
        k = cand["split"]
        fed, tokens = 12 * (5 + 3 - 1), 12 * 3
        assert never["cloud_compute_vs_cloud_only"] == pytest.approx(
            (fed * (n - k) + tokens * cost) / (fed * n + tokens * cost)
        )
        for row in table:  # exact binomial p-values, fixed-sequence testing
            assert row["p_value"] == pytest.approx(binomial_cdf(round(row["risk"] * 12), 12, 0.3))
            assert row["rejected"] == (row["p_value"] <= cand["epsilon"])
            fired |= row["edge_share"] > 0
        assert all(r["rejected"] for r in table[:-1])
        rejected = [r["threshold"] for r in table if r["rejected"]]
        assert cand["threshold"] == (rejected[-1] if rejected else None)
    assert fired  # some tested threshold decided tokens on the edge
    certified = [c for c in res.candidates if c["threshold"] is not None]
    best = min(certified, key=lambda c: (c["cloud_compute"], c["split"]))
    assert (res.split, res.threshold) == (best["split"], best["threshold"])
    assert f"split {res.split}, max_prob:{res.threshold:g}" in res.guarantee() and "0.7" in res.guarantee()
    # the calibration ran the real edge and cloud code: over HTTP the same prompts give the same continuations
    k, row = 3, res.candidates[1]["table"][1]
    assert row["edge_share"] > 0 and row["identical"] < 1
    srv = ServerThread(create_app(build("llama"), k, TOKENS, LIMITS)).start()
    try:
        transport = CloudTransport(srv.url, ALICE, timeout=20)
        c = EdgeClient(edge_model, k, heads, f"max_prob:{row['threshold']}", transport=transport, codec="fp32")
        outs = [c.generate(ids, 3) for ids in prompts]
        c.close()
    finally:
        srv.stop()
    assert (
        sum(o.tokens == greedy(edge_model, ids, 3) for o, ids in zip(outs, prompts, strict=True)) / 12
        == row["identical"]
    )
    assert sum(o.edge_share() for o in outs) / 12 == pytest.approx(row["edge_share"])
