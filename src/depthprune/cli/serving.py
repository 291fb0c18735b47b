"""Cloud-edge split inference commands (thin wrappers over depthprune.serving): `serve-cloud` and `edge`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from depthprune.cli.common import MODEL_HELP, add_tokenizer_option, tokenizer_for

TOKEN_ENV = "DEPTHPRUNE_EDGE_TOKEN"


def cmd_serve_cloud(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.serving.server import Limits, create_app, load_tokens, serve

    tokens = load_tokens(args.tokens_file)  # before the model loads: a missing token fails fast
    limits = Limits(
        max_body=args.max_body,
        max_positions=args.max_positions,
        max_seq=args.max_seq,
        sessions_per_token=args.sessions_per_token,
        rate=args.rate,
        burst=max(1, int(2 * args.rate)),
        ttl=args.ttl,
        max_bytes=int(args.max_memory_mb * (1 << 20)),
    )
    model = load_model(args.model, task="causal-lm")
    app = create_app(model, args.split, tokens, limits)
    print(f"serving layers [{args.split}, n) of {args.model} for {len(tokens)} token(s) on {args.host}:{args.port}")
    serve(app, args.host, args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    from depthprune.exits.lm_heads import DecoderExitHeads
    from depthprune.io import load_model
    from depthprune.serving.edge import CloudTransport, EdgeClient, Shaper

    token = os.environ.get(TOKEN_ENV)
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    if args.mode != "standalone" and not token:
        raise SystemExit(f"give the API token with --token-file FILE or the environment variable {TOKEN_ENV}")
    model = load_model(args.model, task="causal-lm")
    tokenizer = tokenizer_for(args, args.model)
    heads = DecoderExitHeads.load(args.exits, model).eval() if args.exits else None
    transport = None
    if args.mode != "standalone":
        shaper = Shaper(args.rtt_ms / 1000, args.up_mbps, args.down_mbps)
        transport = CloudTransport(args.cloud, token, shaper=shaper, verify=args.ca_file or True)
    client = EdgeClient(
        model,
        args.split,
        heads,
        f"{args.criterion}:{args.threshold}" if heads is not None else None,
        transport=transport,
        mode=args.mode,
        codec=args.codec,
    )
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0]
    out = client.generate(ids, args.max_new_tokens, eos_token_id=model.generation_config.eos_token_id)
    client.close()
    text = tokenizer.decode(out.tokens, skip_special_tokens=True)
    report = {
        "text": text,
        "tokens": len(out.tokens),
        "decided_on_edge": round(out.edge_share(), 3),
        "flagged_fallback": sum(out.flagged),
        "bytes_up_per_token": round(out.bytes_up / max(1, len(out.tokens)), 1),
        "seconds_per_token": round(sum(out.step_times) / max(1, len(out.tokens)), 4),
        "rebuilds": out.rebuilds,
    }
    if args.json:
        print(json.dumps(report | {"sources": out.sources}))
    else:
        print(text)
        print(", ".join(f"{k}={v}" for k, v in report.items() if k != "text"), file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-cloud",
        help="serve the cloud half of a split model (layers [K, n) + final step) over HTTP for many edges",
        description="CE-CoLLM's cloud: per-session KV caches of layers [K, n), lazily filled from the edges' layer-K\n"
        "states, batched across sessions. API tokens come from --tokens-file (lines 'name:token') or the variable\n"
        "DEPTHPRUNE_CLOUD_TOKENS ('name:token,...'). TLS with --ssl-certfile/--ssl-keyfile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--split", type=int, required=True, metavar="K", help="edge: layers [0, K); cloud: the rest")
    p.add_argument("--tokens-file", metavar="FILE", help="API tokens, one per line as name:token")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ssl-certfile", metavar="PEM")
    p.add_argument("--ssl-keyfile", metavar="PEM")
    p.add_argument("--ttl", type=float, default=300.0, help="seconds an idle session is kept (default 300)")
    p.add_argument("--max-memory-mb", type=float, default=2048, help="cap on all sessions' caches (LRU eviction)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes")
    p.add_argument("--max-positions", type=int, default=2048, help="most positions in one request")
    p.add_argument("--max-seq", type=int, default=None, help="longest session (default: the model's positions)")
    p.add_argument("--sessions-per-token", type=int, default=64)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second per token")
    p.set_defaults(func=cmd_serve_cloud)

    p = sub.add_parser(
        "edge",
        help="generate on the edge half of a split model, asking a serve-cloud server when the exits are unsure",
        description="CE-CoLLM's edge: layers [0, K) and the exit heads in --exits; a token whose exit is confident\n"
        "(--criterion/--threshold) is decided here, the others by the cloud. --mode standalone never asks; --mode\n"
        "cloud sends token ids only (the baseline). The API token comes from --token-file or DEPTHPRUNE_EDGE_TOKEN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--cloud", default="http://127.0.0.1:8000", metavar="URL")
    p.add_argument("--split", type=int, required=True, metavar="K")
    p.add_argument("--exits", metavar="DIR", help="decoder exit heads (train-exits), all at layers below K")
    p.add_argument("--criterion", default="max_prob", help="token criterion (depthprune list; default max_prob)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--mode", default="collaborative", choices=["collaborative", "standalone", "cloud"])
    p.add_argument("--codec", default="fp16", choices=["fp32", "fp16", "bf16", "int8"], help="states on the wire")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--token-file", metavar="FILE", help="this edge's API token")
    p.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify an https cloud with a private certificate")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="network shaper: added round trip (ms)")
    p.add_argument("--up-mbps", type=float, default=None, help="network shaper: upload bandwidth (Mbit/s)")
    p.add_argument("--down-mbps", type=float, default=None, help="network shaper: download bandwidth (Mbit/s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_edge)


__all__ = ["add_commands"]
