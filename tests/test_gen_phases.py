"""Different depths per generation phase on tiny random decoders (Llama, and Gemma 3 with a sliding window shorter than
the sequences): identity plans are plain greedy generate; deep prefill / shallow decode is the decode plan's static
model decoding over the full prefill's cache; shallow prefill / deep decode with recompute is the prefill plan's first
token, then plain generate; propagate's entries are what static models store from the state below; a batch equals
each row alone; teacher forcing equals decoding; bad plans get clear errors, on the command line too."""

import pytest
import torch
from tiny_models import build, build_gemma3_sliding, input_ids
from transformers.cache_utils import DynamicCache

from depthprune.decoding import cache_kwarg
from depthprune.errors import PlanError
from depthprune.generation.phases import phase_generate, phase_logits, phase_plans
from depthprune.kv import decoder_cache
from depthprune.static.apply import apply_plan

NAMES = ["llama", "gemma3_sliding"]
NEW = 7


def model_of(name):
    return build_gemma3_sliding() if name == "gemma3_sliding" else build(name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 4])
def test_identity_plans_are_plain_greedy(name, batch):
    model = model_of(name)
    ids, mask = input_ids(batch=batch, seq=6)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)
    for kv in ("propagate", "recompute"):
        out = phase_generate(model, ids, mask, decode_plan="0-3", prefill_plan="0-3", kv=kv, max_new_tokens=NEW)
        assert torch.equal(out.sequences, ref)


@torch.no_grad()
def _static_decode(model, plan, ids, mask, n):
    """Hand computation: the full model's prefill into a full-length cache, then the decode plan's static model
    (static/apply.py) decoding greedily over the cache of its layers."""
    cache = decoder_cache(model, 4)
    key = cache_kwarg(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache})
    token = out.logits[:, -1].argmax(-1)
    pruned = apply_plan(model, ",".join(map(str, plan)))
    small = DynamicCache()
    small.layers[:] = [cache.layers[i] for i in plan]
    tokens = [token]
    for _ in range(n - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = positions[:, -1:] + 1
        positions = torch.cat([positions, pos], dim=1)
        step = pruned(input_ids=token[:, None], attention_mask=mask, position_ids=pos, **{key: small})
        token = step.logits[:, -1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_deep_prefill_shallow_decode_is_the_static_model_over_the_full_cache(name):
    model = model_of(name)
    ids, mask = input_ids(batch=3, seq=6)  # row 0 left-padded
    plan = [0, 1, 3]
    out = phase_generate(model, ids, mask, decode_plan="0,1,3", max_new_tokens=NEW, eos_token_id=())
    assert torch.equal(out.sequences[:, 6:], _static_decode(model, plan, ids, mask, NEW))
    with torch.no_grad():
        full = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)
    assert torch.equal(out.sequences[:, 6], full[:, 6])  # the first token is the full prefill's
    assert not torch.equal(out.sequences, full)  # the shallow decode changed something


@pytest.mark.parametrize("name", NAMES)
def test_shallow_prefill_deep_decode_recompute_is_plain_generate_after_the_first_token(name):
    model = model_of(name)
    ids, mask = input_ids(batch=3, seq=6)
    out = phase_generate(model, ids, mask, prefill_plan="0,1,3", kv="recompute", max_new_tokens=NEW, eos_token_id=())
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them
        static = apply_plan(model, "0,1,3")
        first = static(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        assert torch.equal(out.sequences[:, 6], first)
        rest = model.generate(
            out.sequences[:, :7], attention_mask=torch.cat([mask, mask.new_ones((3, 1))], 1), do_sample=False,
            max_new_tokens=NEW - 1, eos_token_id=None,
        )  # fmt: skip
    assert torch.equal(out.sequences, rest)
    prop = phase_generate(model, ids, mask, prefill_plan="0,1,3", kv="propagate", max_new_tokens=NEW, eos_token_id=())
    assert torch.equal(prop.sequences[:, 6], first)  # same prefill; later tokens read approximate entries at layer 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "plans",
    [("0,2,3", None, "propagate"), (None, "0,2", "propagate"), (None, "0,2", "recompute"), ("1,3", "0,2", "propagate")],
)
def test_batched_equals_each_row_alone_and_teacher_forcing(name, plans):
    model = model_of(name)
    decode, prefill, kv = plans
    ids, mask = input_ids(batch=4, seq=6)
    settings = {"decode_plan": decode, "prefill_plan": prefill, "kv": kv}
    out = phase_generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=(), **settings)
    for r in range(4):
        alone = phase_generate(model, ids[r : r + 1, mask[r].bool()], max_new_tokens=NEW, eos_token_id=(), **settings)
        assert torch.equal(out.sequences[r, -NEW:], alone.sequences[0, -NEW:])
    new = out.sequences[:, 6:]
    logits = phase_logits(model, ids, new, attention_mask=mask, **settings)
    assert torch.equal(logits.argmax(-1), new)  # teacher forcing computes what decoding computed


def test_timing_and_eos():
    model = build("llama")
    ids, mask = input_ids(batch=2, seq=6)
    out = phase_generate(model, ids, mask, decode_plan="0,3", max_new_tokens=4, timing=True, eos_token_id=())
    assert out.first_token_s > 0 and len(out.decode_s) == 3
    first = int(out.sequences[0, 6])
    stop = phase_generate(model, ids, mask, decode_plan="0,3", max_new_tokens=4, eos_token_id=first, pad_token_id=0)
    assert stop.sequences[0, 6] == first and bool((stop.sequences[0, 7:] == 0).all())


def test_bad_plans_get_clear_errors():
    with pytest.raises(PlanError, match="decode-plan.*layers 0-3.*\\[4\\]"):
        phase_plans(4, decode="0-4")
    with pytest.raises(PlanError, match="empty"):
        phase_plans(4, prefill="")
    with pytest.raises(PlanError, match="repeats or reorders"):
        phase_plans(4, decode="0,2,1")
    with pytest.raises(ValueError, match="unknown kv"):
        phase_plans(4, kv="copy")
    with pytest.raises(ValueError, match="use kv='propagate'"):
        phase_plans(4, decode="0,2,3", prefill="0,1,2", kv="recompute")
    assert phase_plans(4, prefill="0,1").missing == (2, 3)
    with pytest.raises(ValueError, match="encoder"):
        phase_generate(build("bert"), torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_models import tokenizer

    root = tmp_path_factory.mktemp("phases_cli") / "model"
    model = build("llama")
    model.generation_config.eos_token_id = []  # a random model stops at random places otherwise
    model.save_pretrained(root)
    tokenizer().save_pretrained(root)
    return root


def _cli(capsys, *argv):
    from depthprune.cli.main import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_generate_runs_the_phase_plans(folder, capsys):
    import json

    from depthprune.io import load_model, load_tokenizer

    argv = ["generate", folder, "--prefill-plan", "0,1", "--kv", "recompute", "--prompt", "the whale", "--json"]
    rc, out, _ = _cli(capsys, *argv, "--max-new-tokens", "5")
    assert rc == 0
    report = json.loads(out)
    assert (report["prefill"], report["decode"], report["kv"]) == ("0,1", "0-3", "recompute")
    tok = load_tokenizer(str(folder))
    ids = tok(["the whale"], return_tensors="pt").input_ids
    expected = phase_generate(load_model(str(folder)), ids, prefill_plan="0,1", kv="recompute", max_new_tokens=5)
    assert report["results"][0]["tokens"] == expected.sequences[0, ids.shape[1] :].tolist()
    rc, out, _ = _cli(capsys, "generate", folder, "--decode-plan", "0,3", "--prompt", "a sea", "--max-new-tokens", "3")
    assert rc == 0 and "generated tokens 0,3 (2 of 4)" in out and "'a sea' ->" in out


def test_cli_bad_plans_get_clear_errors(folder, capsys):
    cases = [
        (["--decode-plan", "0-9"], "has layers 0-3, but the plan asks for layer(s) [4, 5, 6, 7, 8, 9]"),
        (["--decode-plan", ""], "--decode-plan: empty layer plan"),
        (["--prefill-plan", "0,x"], "--prefill-plan: cannot read 'x'"),
        (["--decode-plan", "0,1", "--speculative"], "pick one"),
        (["--decode-plan", "0,1", "--exit", "fixed:1"], "drop --exit or --decode-plan"),
        (["--decode-plan", "0,2,3", "--prefill-plan", "0,1,2", "--kv", "recompute"], "use kv='propagate'"),
    ]
    for extra, message in cases:
        rc, _, err = _cli(capsys, "generate", folder, *extra, "--prompt", "the whale")
        assert rc == 2 and message in err, (extra, err)


@pytest.mark.parametrize("name", NAMES)
def test_propagate_gives_skipped_layers_the_kv_of_the_state_below(name):
    """Shallow prefill 0,2 with propagate: layer 1's prompt entries are its K/V of layer 0's output, layer 3's those
    of layer 2's output (CALM) - what the static models 0,1 and 0,2,3 (plain HF forwards) store there."""
    from depthprune.decoding import positions_from_mask
    from depthprune.generation.phases import PhaseRunner

    model = model_of(name)
    ids, mask = input_ids(batch=2, seq=6)
    runner = PhaseRunner(model, phase_plans(4, prefill="0,2", kv="propagate"))
    with torch.no_grad():
        runner.prefill(ids, mask, positions_from_mask(mask))
    for plan, source, position in (("0,1", 1, 1), ("0,2,3", 3, 2)):
        static = apply_plan(model, plan)
        cache = decoder_cache(static, len(plan.split(",")))
        with torch.no_grad():
            static(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                   **{cache_kwarg(static): cache})  # fmt: skip
        assert torch.equal(runner.cache.layers[source].keys, cache.layers[position].keys)
        assert torch.equal(runner.cache.layers[source].values, cache.layers[position].values)
