"""Cloud-edge split inference commands (thin wrappers over depthprune.serving): `calibrate-split`, `serve-cloud` and
`edge`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from depthprune.cli.common import MODEL_HELP, add_tokenizer_option, tokenizer_for

TOKEN_ENV = "DEPTHPRUNE_EDGE_TOKEN"
CODECS = [
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int8-outlier",
]  # serving.transfer.STATE_CODECS (not imported: the CLI starts light)
CONSISTENCY = ["identical", "tokens", "rouge_l"]  # serving.calibrate.CONSISTENCY
SPLIT_FILE = "split_calibration.json"
"""Written beside the exit heads by `calibrate-split`; `--split auto` / `--threshold auto` read it."""


def _split_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split takes a layer count K or 'auto', got {value!r}") from None


def _threshold_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold takes a number or 'auto', got {value!r}") from None


def _calibration_record(path: str | None, exits: str | None) -> tuple[dict, str]:
    """The saved split calibration (--split-calibration, else split_calibration.json beside --exits)."""
    if path is None:
        if exits is None:
            raise ValueError("'auto' needs the split calibration: give --split-calibration FILE (or --exits DIR)")
        path = os.path.join(exits, SPLIT_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no split calibration at {path}: run `depthprune calibrate-split MODEL --exits DIR` first")
    with open(path, encoding="utf-8") as fh:
        record = json.load(fh)
    if record.get("split") is None:
        raise ValueError(f"{path} certifies no split ({record.get('guarantee', 'no guarantee recorded')})")
    return record, path


def cmd_calibrate_split(args: argparse.Namespace) -> int:
    from depthprune.bench.report import format_table
    from depthprune.data import calibration_text
    from depthprune.exits.lm_heads import DecoderExitHeads
    from depthprune.fsutil import write_atomic
    from depthprune.generation.calibrate import prompt_blocks
    from depthprune.io import load_model
    from depthprune.serving.calibrate import calibrate_split

    model = load_model(args.model, task="causal-lm").eval()
    tokenizer = tokenizer_for(args, args.model)
    heads = DecoderExitHeads.load(args.exits, model).eval()
    prompts = prompt_blocks(tokenizer, calibration_text(args.text), args.prompts, args.prompt_len)
    result = calibrate_split(
        model,
        heads,
        prompts,
        splits=args.splits,
        criterion=args.criterion,
        grid=args.grid,
        delta=args.delta,
        epsilon=args.epsilon,
        consistency=args.consistency,
        max_new_tokens=args.max_new_tokens,
        codec=args.codec,
        max_edge_layers=args.max_edge_layers,
        progress=not args.json,
    )
    out = args.output or os.path.join(args.exits, SPLIT_FILE)
    path = write_atomic(out, json.dumps(result.to_dict(), indent=2, default=float))
    if args.json:
        print(json.dumps(result.to_dict(), default=float))
        return 0
    for cand in result.candidates:
        rows = [{k: v for k, v in r.items() if k != "cloud_compute"} for r in cand["table"]]
        print(format_table(rows, title=f"split {cand['split']} (exits {cand['exits']}, level {cand['epsilon']:.3g})"))
    print(result.guarantee())
    print(f"wrote {path}")
    return 0


def cmd_serve_cloud(args: argparse.Namespace) -> int:
    from depthprune.io import load_model
    from depthprune.serving.server import Limits, create_app, load_tokens, serve

    tokens = load_tokens(args.tokens_file)  # before the model loads: a missing token fails fast
    split = args.split
    if split == "auto":
        record, path = _calibration_record(args.split_calibration, None)
        split = int(record["split"])
        print(f"split {split} from {path}: {record['guarantee']}", file=sys.stderr)
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
    app = create_app(model, split, tokens, limits)
    print(f"serving layers [{split}, n) of {args.model} for {len(tokens)} token(s) on {args.host}:{args.port}")
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
    split, criterion, threshold = args.split, args.criterion, args.threshold
    if "auto" in (split, threshold):
        record, path = _calibration_record(args.split_calibration, args.exits)
        if split == "auto":
            split = int(record["split"])
        if threshold == "auto":
            if split != record["split"]:
                raise ValueError(f"{path} calibrated the threshold at split {record['split']}, not {split}")
            criterion, threshold = record["criterion"], float(record["threshold"])
        print(f"from {path}: {record['guarantee']}", file=sys.stderr)
    model = load_model(args.model, task="causal-lm")
    tokenizer = tokenizer_for(args, args.model)
    heads = DecoderExitHeads.load(args.exits, model).eval() if args.exits else None
    transport = None
    if args.mode != "standalone":
        shaper = Shaper(args.rtt_ms / 1000, args.up_mbps, args.down_mbps)
        transport = CloudTransport(args.cloud, token, shaper=shaper, verify=args.ca_file or True)
    client = EdgeClient(
        model,
        split,
        heads,
        f"{criterion}:{threshold}" if heads is not None else None,
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
        "calibrate-split",
        help="choose the cloud-edge split K and the edge's exit threshold with a Learn-then-Test guarantee",
        description="Runs the real edge and cloud code in this process (the codec's frames included) on calibration\n"
        "prompts, tests each candidate split's thresholds with Learn-then-Test (Bonferroni over the splits) and\n"
        "keeps the certified one with the least cloud compute. Writes split_calibration.json beside --exits, which\n"
        "`serve-cloud --split auto` and `edge --split auto --threshold auto` read.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--exits", required=True, metavar="DIR", help="decoder exit heads (train-exits)")
    p.add_argument("--splits", type=int, nargs="+", metavar="K", help="candidate splits (default: one after each exit)")
    p.add_argument("--max-edge-layers", type=int, metavar="L", help="the edge device runs at most L layers")
    p.add_argument("--criterion", default="max_prob", help="token criterion (depthprune list; default max_prob)")
    p.add_argument("--grid", type=float, nargs="+", help="thresholds to test, most conservative first")
    p.add_argument("--delta", type=float, default=0.05, help="allowed expected loss (default 0.05)")
    p.add_argument("--epsilon", type=float, default=0.05, help="allowed failure probability (default 0.05)")
    p.add_argument("--consistency", default="identical", choices=CONSISTENCY, help="the loss (default identical)")
    p.add_argument("--codec", default="fp16", choices=CODECS, help="states on the wire (default fp16)")
    p.add_argument("--prompts", type=int, default=60, help="calibration prompts (default 60: delta 0.05 needs 59)")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--text", metavar="PATH", help="a UTF-8 book (prompts from before 'CHAPTER 110.')")
    p.add_argument("-o", "--output", metavar="FILE", help=f"where to write (default: DIR/{SPLIT_FILE})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_tokenizer_option(p)
    p.set_defaults(func=cmd_calibrate_split)

    p = sub.add_parser(
        "serve-cloud",
        help="serve the cloud half of a split model (layers [K, n) + final step) over HTTP for many edges",
        description="CE-CoLLM's cloud: per-session KV caches of layers [K, n), lazily filled from the edges' layer-K\n"
        "states, batched across sessions. API tokens come from --tokens-file (lines 'name:token') or the variable\n"
        "DEPTHPRUNE_CLOUD_TOKENS ('name:token,...'). TLS with --ssl-certfile/--ssl-keyfile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--split",
        type=_split_arg,
        required=True,
        metavar="K",
        help="edge: layers [0, K); cloud: the rest ('auto': the split --split-calibration certified)",
    )
    p.add_argument("--split-calibration", metavar="FILE", help="split_calibration.json (calibrate-split)")
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
    p.add_argument("--split", type=_split_arg, required=True, metavar="K", help="K, or 'auto' (calibrate-split)")
    p.add_argument("--exits", metavar="DIR", help="decoder exit heads (train-exits), all at layers below K")
    p.add_argument("--criterion", default="max_prob", help="token criterion (depthprune list; default max_prob)")
    p.add_argument("--threshold", type=_threshold_arg, default=0.9, help="exit threshold, or 'auto': the certified one")
    p.add_argument(
        "--split-calibration", metavar="FILE", help=f"for 'auto' (default: {SPLIT_FILE} in the --exits folder)"
    )
    p.add_argument("--mode", default="collaborative", choices=["collaborative", "standalone", "cloud"])
    p.add_argument("--codec", default="fp16", choices=CODECS, help="states on the wire")
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
