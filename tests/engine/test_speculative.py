"""Prompt-lookup speculative decoding (layerserve/engine/draft.py): drafting changes speed, not output.

Every draft row is sampled as the token at its output position would have been without the draft
(same noise key, masks and penalties after the draft tokens before it), so with drafting on the
output must be the one with drafting off, token for token, wherever the logits are the same: on the
float32 reference (the issue's requirement) and on the compiled default path (whose rows do not
depend on how many rows a step has). Sampled, seeded, penalized, stopped, grammar-constrained,
logprob-returning and n>1 requests are all compared, on a prompt that copies its context (so drafts
are made and mostly kept) and on one that does not.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from layerserve.config import SpeculativeConfig
from layerserve.engine.draft import NgramIndex, PromptLookup
from layerserve.engine.llm import LLM
from layerserve.engine.request import SamplingParams
from layerserve.model.guided import GrammarCompiler

from fakes import make_core, run_until_idle

RECORD = {"city": "Paris", "temperature_celsius": 21, "humidity_percent": 40,
          "wind": {"speed_kmh": 12, "direction": "north-west"}, "forecast": ["sunny", "cloudy", "rain"]}
COPY = [{"role": "user", "content": f"Repeat this JSON exactly, then say done: {json.dumps(RECORD)}"}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "temperature_celsius": {"type": "integer"},
                                           "wind": {"type": "object", "properties": {"direction": {"type": "string"}},
                                                    "required": ["direction"]}},
          "required": ["city", "temperature_celsius", "wind"]}


# ---------------------------------------------------------------- the proposer alone

def test_propose_takes_what_followed_the_latest_longest_match():
    lookup = PromptLookup(SpeculativeConfig(num_draft_tokens=3, min_ngram=2, max_ngram=3))
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix (2, 3) occurred at 1..2 (then 9) and 6..7 (then 7, 8, 5): the latest wins
    assert lookup.propose(tokens, NgramIndex(), 3) == [7, 8, 5]
    assert lookup.propose(tokens, NgramIndex(), 1) == [7]
    assert lookup.propose([4, 5, 6, 7], NgramIndex(), 3) == []
    assert lookup.propose(tokens, NgramIndex(), 0) == []
    # the longest matching suffix wins over a later shorter one
    tokens = [5, 1, 2, 3, 4, 0, 2, 3, 6, 5, 1, 2, 3]
    assert lookup.propose(tokens, NgramIndex(), 2) == [4, 0]


def test_incremental_index_proposes_what_a_fresh_one_does():
    lookup = PromptLookup(SpeculativeConfig(num_draft_tokens=4, min_ngram=2, max_ngram=4))
    import random

    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(12)]
    index = NgramIndex()
    for _ in range(200):
        assert lookup.propose(tokens, index, 4) == lookup.propose(tokens, NgramIndex(), 4)
        tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]


def test_rejected_drafts_back_off_and_a_kept_token_resets():
    lookup = PromptLookup(SpeculativeConfig())
    index = NgramIndex()
    waits = []
    for _ in range(6):  # every draft rejected: sit out 1, 2, 4, 8, 16, 16 steps
        lookup.record(index, 3, 0)
        n = 0
        while lookup.waiting(index):
            n += 1
        waits.append(n)
    assert waits == [1, 2, 4, 8, 16, 16]
    lookup.record(index, 3, 1)
    assert not lookup.waiting(index) and index.backoff == 0
    assert lookup.stats.drafted == 21 and lookup.stats.accepted == 1


def test_drafts_never_preempt_and_respect_the_batch_width(smollm_tokenizer):
    """With the fake runner (it emits one filler token, so every draft is rejected) drafts appear
    for a lone sequence, never for a batch wider than max_batch, and never take the last blocks."""
    spec = SpeculativeConfig(num_draft_tokens=3, min_ngram=2, max_ngram=3, max_batch=1)
    widths: list[tuple[int, int]] = []
    core = make_core(smollm_tokenizer, num_blocks=64, speculative=spec,
                     hook=lambda out: widths.append((len(out.scheduled), sum(len(i.draft) for i in out.scheduled))))
    core.add_request("a", [5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_tokens=20, ignore_eos=True))
    run_until_idle(core)
    assert any(d > 0 for _, d in widths)
    stats = core.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == 0
    widths.clear()
    for rid in "bc":
        core.add_request(rid, [5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_tokens=20, ignore_eos=True))
    run_until_idle(core)
    assert all(d == 0 for n, d in widths if n > 1)
    # a pool with no block to spare: drafting never preempts (the preemption counter stays put)
    tight = make_core(smollm_tokenizer, num_blocks=5, block_size=4, speculative=spec)
    tight.add_request("t", [5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_tokens=11, ignore_eos=True))
    outs = run_until_idle(tight)
    assert tight.stats().num_preemptions == 0
    assert sum(len(d.token_ids) for o in outs for d in o.deltas) == 11


# ---------------------------------------------------------------- the real model, drafting on and off

@pytest.fixture(scope="module")
def fast_pair():
    """The default path with drafting off and on."""
    kw = dict(num_blocks=512, max_model_len=2048, progress=False)
    return LLM(draft_tokens=0, **kw), LLM(draft_tokens=3, **kw)


@pytest.fixture(scope="module")
def reference_pair():
    """The float32 reference with drafting off and on."""
    kw = dict(dtype="float32", num_blocks=256, max_model_len=1024, progress=False)
    return LLM(draft_tokens=0, **kw), LLM(draft_tokens=3, **kw)


def _run(llm: LLM, messages, params: SamplingParams):
    before = llm.core.stats()
    result = llm.generate([llm.encode_chat(messages)], params)[0]
    after = llm.core.stats()
    return result, after.spec_draft_tokens - before.spec_draft_tokens, after.spec_accepted_tokens - before.spec_accepted_tokens


def _same_outputs(pair, messages, params: SamplingParams) -> tuple[int, int]:
    plain, with_drafts = pair
    want, drafted0, _ = _run(plain, messages, params)
    got, drafted, accepted = _run(with_drafts, messages, params)
    assert drafted0 == 0
    for a, b in zip(want.outputs, got.outputs, strict=True):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.finish_reason == a.finish_reason
        assert len(b.logprobs) == len(a.logprobs)
        for la, lb in zip(a.logprobs, b.logprobs):
            assert lb.token_id == la.token_id and lb.logprob == pytest.approx(la.logprob, abs=1e-4)
    return drafted, accepted


def test_float32_greedy_output_is_identical_with_drafts(reference_pair):
    drafted, accepted = _same_outputs(reference_pair, COPY, SamplingParams(max_tokens=40, temperature=0.0))
    assert drafted > 0 and accepted > drafted // 2  # copying: most drafts are kept
    _same_outputs(reference_pair, STORY, SamplingParams(max_tokens=16, temperature=0.0))


@pytest.mark.parametrize("case", ["greedy", "seeded", "penalties", "stop", "logprobs", "n2"])
def test_default_path_output_is_identical_with_drafts(fast_pair, case):
    params = {
        "greedy": SamplingParams(max_tokens=96, temperature=0.0),
        "seeded": SamplingParams(max_tokens=96, temperature=0.8, top_p=0.95, seed=1234),
        "penalties": SamplingParams(max_tokens=96, temperature=0.7, seed=7, frequency_penalty=0.4,
                                    presence_penalty=0.3, repetition_penalty=1.1),
        "stop": SamplingParams(max_tokens=96, temperature=0.0, stop=["north-west"]),
        "logprobs": SamplingParams(max_tokens=64, temperature=0.0, logprobs=3),
        "n2": SamplingParams(max_tokens=64, temperature=0.9, seed=99, n=2),
    }[case]
    drafted, accepted = _same_outputs(fast_pair, COPY, params)
    print(f"{case}: {accepted}/{drafted} draft tokens kept")
    if case in ("greedy", "logprobs", "stop"):
        assert accepted > 0
    _same_outputs(fast_pair, STORY, params)


def test_grammar_constrained_output_is_identical_with_drafts(fast_pair):
    compiler = GrammarCompiler(fast_pair[0].tokenizer)
    messages = [{"role": "user", "content": f"Give the city, temperature and wind direction of this record as JSON: "
                                            f"{json.dumps(RECORD)}"}]
    for temperature in (0.0, 0.7):
        params = SamplingParams(max_tokens=80, temperature=temperature, seed=5, logits_mask_factory=compiler.json_schema(SCHEMA))
        _same_outputs(fast_pair, messages, params)
        out = fast_pair[1].generate([fast_pair[1].encode_chat(messages)], params)[0].outputs[0]
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_kv_of_rejected_drafts_never_reaches_the_prefix_cache(fast_pair):
    """After a drafted generation, a request that reuses its blocks from the prefix cache computes
    what a cold engine computes."""
    _, with_drafts = fast_pair
    params = SamplingParams(max_tokens=64, temperature=0.0)
    first = with_drafts.generate([with_drafts.encode_chat(COPY)], params)[0].outputs[0]
    follow = COPY + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now only the city."}]
    warm = with_drafts.generate([with_drafts.encode_chat(follow)], params)[0]
    assert warm.cached_tokens > 0
    cold = LLM(draft_tokens=0, num_blocks=512, max_model_len=2048, progress=False)
    assert warm.outputs[0].token_ids == cold.generate([cold.encode_chat(follow)], params)[0].outputs[0].token_ids
