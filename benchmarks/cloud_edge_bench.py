"""CE-CoLLM cloud-edge split inference on SmolLM2, everything on localhost through a real server and HTTP client.

    OMP_NUM_THREADS=1 python benchmarks/cloud_edge_bench.py --out benchmarks/cloud_edge

The cloud is a `depthprune serve-cloud smollm2 --split K` process (one torch thread); the edges run in this process
(one torch thread) with tuned-lens exits fitted in closed form (`fit_lens`) on a small token budget of the
calibration part of the book. Every request goes through the client's network shaper (default 40 ms round trip,
20 Mbit/s up, 100 Mbit/s down). Prompts: held-out blocks of the book; every run generates exactly --new tokens
(no stop at end of sequence) and is compared position by position with plain greedy `model.generate`.

Configurations: cloud-only (the edge sends token ids; the cloud runs all layers; same server and transport),
with --calibrate-splits, K and the max_prob threshold chosen first by `calibrate_split` (Learn-then-Test on calibration
prompts) and measured on held-out ones; collaborative at several max_prob thresholds (1.0 never fires), with each
codec at the never-firing threshold (the transfer's own effect on agreement), standalone edge; then --concurrent edges
at once (threads), a bounded run: errors, per-token latency p50/p95, the server's RSS.

Figures: per-token latency (mean over generated tokens after the first, and first token), cloud compute (layer-
positions and seconds, from the server's counters), bytes per token up and down (bodies + headers), share of tokens
decided on the edge, token agreement with the full model. Writes cloud_edge_bench.json and cloud_edge_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from depthprune.bench.report import to_jsonable
from depthprune.bench.speed import machine_info
from depthprune.data import calibration_text, heldout_text, token_blocks
from depthprune.exits.lm_heads import DecoderExitHeads
from depthprune.exits.train.lm_exits import fit_lens
from depthprune.fsutil import write_atomic
from depthprune.generation.calibrate import prompt_blocks
from depthprune.io import load_model, load_tokenizer
from depthprune.serving.calibrate import ExitView, calibrate_split
from depthprune.serving.edge import CloudTransport, EdgeClient, Shaper

TOKEN = "bench-" + "k" * 40


def start_server(model: str, split: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, DEPTHPRUNE_CLOUD_TOKENS="bench:" + TOKEN, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "depthprune", "serve-cloud", model, "--split", str(split), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--rate", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve-cloud did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


def run_config(name, make_client, prompts, new, reference, url):
    before = stats(url)
    outs, start = [], time.perf_counter()
    client = make_client()
    for ids in prompts:
        outs.append(client.generate(ids, new))
    wall = time.perf_counter() - start
    client.close()
    after = stats(url)
    n_tok = sum(len(o.tokens) for o in outs)
    later = [t for o in outs for t in o.step_times[1:]]
    agree = sum(int(a == b) for o, ref in zip(outs, reference, strict=True) for a, b in zip(o.tokens, ref, strict=True))
    return {
        "config": name,
        "tokens": n_tok,
        "agreement": agree / n_tok,
        "identical_continuations": sum(o.tokens == ref for o, ref in zip(outs, reference, strict=True)) / len(outs),
        "edge_share": sum(s != "cloud" for o in outs for s in o.sources) / n_tok,
        "ms_per_token": 1000 * statistics.mean(later),
        "first_token_ms": 1000 * statistics.mean(o.step_times[0] for o in outs),
        "wall_s": wall,
        "cloud_layer_tokens": after["layer_tokens"] - before["layer_tokens"],
        "cloud_seconds": after["compute_seconds"] - before["compute_seconds"],
        "cloud_forwards": after["forwards"] - before["forwards"],
        "bytes_up_per_token": sum(o.bytes_up for o in outs) / n_tok,
        "bytes_down_per_token": sum(o.bytes_down for o in outs) / n_tok,
        "requests_per_token": sum(o.requests for o in outs) / n_tok,
        "fallback": sum(sum(o.flagged) for o in outs),
    }


def concurrent_run(make_client, prompts, new, edges, url, pid):
    rss_before = rss_mb(pid)
    errors, lat, outs = [], [], [None] * edges
    lock = threading.Lock()

    def work(i):
        try:
            client = make_client()
            out = client.generate(prompts[i % len(prompts)], new)
            client.close()
            with lock:
                lat.extend(out.step_times[1:])
                outs[i] = out
        except Exception as err:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(repr(err))

    before = stats(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(edges)]
    for t in threads:
        t.start()
    peak = rss_before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    after = stats(url)
    lat.sort()
    done = [o for o in outs if o is not None]
    return {
        "edges": edges,
        "tokens_each": new,
        "errors": len(errors),
        "error_samples": errors[:3],
        "fallback_tokens": sum(sum(o.flagged) for o in done),
        "wall_s": wall,
        "p50_ms_per_token": 1000 * lat[len(lat) // 2] if lat else None,
        "p95_ms_per_token": 1000 * lat[int(len(lat) * 0.95)] if lat else None,
        "server_rss_mb_before": rss_before,
        "server_rss_mb_peak": peak,
        "cloud_forwards": after["forwards"] - before["forwards"],
        "cloud_requests_computed": after["computed_requests"] - before["computed_requests"],
        "sessions_left": after["sessions"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--split", type=int, default=24)
    p.add_argument(
        "--exits",
        type=int,
        nargs="+",
        default=[23],
        help="edge exits (each costs about 8 decoder layers: the 49k-token head)",
    )
    p.add_argument("--fit-blocks", type=int, default=48, help="256-token blocks for the lens fit")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new", type=int, default=20)
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.6, 0.4, 0.2])
    p.add_argument("--codecs", nargs="+", default=["fp32", "fp16", "bf16", "int8", "int8-outlier"])
    p.add_argument("--codec", default="fp16", help="the codec of the threshold sweep")
    p.add_argument("--rtt-ms", type=float, default=40.0)
    p.add_argument("--up-mbps", type=float, default=20.0)
    p.add_argument("--down-mbps", type=float, default=100.0)
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--concurrent-new", type=int, default=12)
    p.add_argument("--concurrent-threshold", type=float, default=0.6)
    p.add_argument("--out", default="benchmarks/cloud_edge")
    p.add_argument("--calibrate-splits", type=int, nargs="+", help="choose K and the threshold with calibrate_split")
    p.add_argument("--cal-prompts", type=int, default=72)
    p.add_argument("--cal-new", type=int, default=6)
    p.add_argument("--cal-grid", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--epsilon", type=float, default=0.05)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = load_tokenizer(args.model)
    t0 = time.perf_counter()
    heads = DecoderExitHeads.for_model(model, args.exits, kind="lens")
    blocks = token_blocks(tokenizer, calibration_text(), 256, args.fit_blocks)
    residuals = fit_lens(model, heads, blocks, batch_size=4)
    heads.eval()
    fit_s = time.perf_counter() - t0
    print(f"lens fit on {tuple(blocks.shape)} tokens in {fit_s:.0f} s: residuals {residuals}", flush=True)
    calibration = None
    if args.calibrate_splits:
        t0 = time.perf_counter()
        cal = prompt_blocks(tokenizer, calibration_text(), args.cal_prompts, args.prompt_len)
        calibration = calibrate_split(
            model,
            heads,
            cal,
            splits=args.calibrate_splits,
            grid=args.cal_grid,
            delta=args.delta,
            epsilon=args.epsilon,
            max_new_tokens=args.cal_new,
            codec=args.codec,
            eos_token_id=[],
        )
        cal_s = time.perf_counter() - t0
        print(calibration.guarantee(), f"({cal_s:.0f} s)", flush=True)
        print(json.dumps(to_jsonable(calibration.candidates)), flush=True)
        if calibration.split is not None:
            args.split = calibration.split
            args.thresholds = [calibration.threshold, *[t for t in args.thresholds if t != calibration.threshold]]
    heads = ExitView(heads, args.split)
    proc = start_server(args.model, args.split, port)
    url = f"http://127.0.0.1:{port}"
    try:
        prompts = list(prompt_blocks(tokenizer, heldout_text(), args.prompts, args.prompt_len))
        t0 = time.perf_counter()
        reference = []
        for ids in prompts:
            out = model.generate(
                ids[None], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0
            )
            reference.append(out[0, ids.numel() :].tolist())
        full_s = (time.perf_counter() - t0) / (args.prompts * args.new)
        shaper = Shaper(args.rtt_ms / 1000, args.up_mbps, args.down_mbps)

        def maker(mode, threshold=None, codec=args.codec):
            crit = None if threshold is None else f"max_prob:{threshold}"

            def make():
                transport = None if mode == "standalone" else CloudTransport(url, TOKEN, shaper=shaper, timeout=120)
                return EdgeClient(model, args.split, heads, crit, transport=transport, mode=mode, codec=codec)

            return make

        rows = []

        def record(row):
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

        record(run_config("cloud-only (token ids)", maker("cloud"), prompts, args.new, reference, url))
        for codec in args.codecs:
            if codec != args.codec:
                record(
                    run_config(
                        f"collab 1.0 {codec}", maker("collaborative", 1.0, codec), prompts, args.new, reference, url
                    )
                )
        for th in args.thresholds:
            name = f"collab {th} {args.codec}"
            record(run_config(name, maker("collaborative", th), prompts, args.new, reference, url))
        standalone = maker("standalone", 1.0)
        row = run_config("standalone edge", standalone, prompts, args.new, reference, url)
        record(row)
        conc = None
        if args.concurrent:
            conc = concurrent_run(
                maker("collaborative", args.concurrent_threshold),
                prompts,
                args.concurrent_new,
                args.concurrent,
                url,
                proc.pid,
            )
            print(json.dumps(conc), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    base = rows[0]
    for row in rows:
        row["cloud_compute_vs_cloud_only"] = row["cloud_layer_tokens"] / base["cloud_layer_tokens"]
        row["latency_vs_cloud_only"] = row["ms_per_token"] / base["ms_per_token"]
    result = {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "args": vars(args),
        "lens_fit_seconds": fit_s,
        "lens_residuals": residuals,
        "full_model_generate_ms_per_token": 1000 * full_s,
        "rows": rows,
        "concurrent": conc,
        "calibration": None if calibration is None else calibration.to_dict(),
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "cloud_edge_bench.json", json.dumps(to_jsonable(result), indent=2))
    cols = [
        ("config", "config", "{}"),
        ("agreement", "agreement", "{:.3f}"),
        ("edge share", "edge_share", "{:.2f}"),
        ("ms/token", "ms_per_token", "{:.0f}"),
        ("vs cloud-only", "latency_vs_cloud_only", "{:.2f}x"),
        ("first token ms", "first_token_ms", "{:.0f}"),
        ("cloud layer-tokens", "cloud_layer_tokens", "{}"),
        ("cloud compute vs cloud-only", "cloud_compute_vs_cloud_only", "{:.3f}"),
        ("cloud s", "cloud_seconds", "{:.2f}"),
        ("bytes up/token", "bytes_up_per_token", "{:.0f}"),
        ("bytes down/token", "bytes_down_per_token", "{:.0f}"),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in cols) + " |")
    write_atomic(out / "cloud_edge_table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
