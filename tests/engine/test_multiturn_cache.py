"""Stateful inference: each turn of a conversation reuses the KV of the previous turns."""

from __future__ import annotations

from layerserve.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def test_every_turn_hits_the_cache(llm):
    messages = [{"role": "system", "content": "You are a concise assistant. " * 20}]
    questions = ["What is the capital of France?", "And of Italy?", "Which one is bigger?", "Thanks. Any river there?"]
    previous = 0  # tokens of the last turn's prompt + reply
    for k, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        ids = llm.encode_chat(messages)
        r = llm.generate([ids], GREEDY)[0]
        if k > 0:
            # The re-rendered history extends the last turn's tokens: all its full blocks hit.
            assert ids[:previous - 1] == last_tokens[:previous - 1]
            assert r.cached_tokens >= (previous - 1) // 16 * 16
        reply = r.outputs[0]
        last_tokens = ids + reply.token_ids
        previous = len(last_tokens)
        messages.append({"role": "assistant", "content": reply.text})


def test_cached_and_cold_runs_agree_over_turns(chat_ids):
    from layerserve.engine.llm import LLM

    # float32: exact across batch shapes, so any difference is the cache's (on the default path a
    # cached prefix changes the row counts of later steps, and near-ties may flip)
    cold = LLM(dtype="float32", num_blocks=256, max_model_len=1024, enable_prefix_caching=False, progress=False)
    warm = LLM(dtype="float32", num_blocks=256, max_model_len=1024, progress=False)
    history = list(chat_ids)
    for turn in range(3):
        a = cold.generate([history], GREEDY)[0]
        b = warm.generate([history], GREEDY)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.cached_tokens == 0 and (turn == 0 or b.cached_tokens > 0)
        history += b.outputs[0].token_ids + warm.tokenizer.encode(f"\n<|im_start|>user\nMore {turn}<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(max_tokens=16, temperature=0.8, n=3, seed=5)
    assert [o.token_ids for o in cold.generate([history], params)[0].outputs] == \
           [o.token_ids for o in warm.generate([history], params)[0].outputs]


def test_colliding_block_keys_never_serve_another_prompts_kv(llm):
    """Every block key collides (an injected hash): the second prompt finds the first prompt's
    block under its key, must reject it on content, and answers exactly as it does cold."""
    from layerserve.engine.llm import LLM

    a = llm.encode_chat([{"role": "user", "content": "Name three colours of the rainbow, please."}])
    b = llm.encode_chat([{"role": "user", "content": "Name three animals that live in the sea."}])
    cold = LLM(dtype="float32", num_blocks=128, max_model_len=512, enable_prefix_caching=False, progress=False)
    expected = cold.generate([b], GREEDY)[0].outputs[0].token_ids
    kv = llm.core.kv
    saved = kv.hash_fn
    kv.hash_fn = lambda parent, tokens: b"collide"
    try:
        llm.generate([a], GREEDY)
        result = llm.generate([b], GREEDY)[0]
    finally:
        kv.hash_fn = saved
    assert result.outputs[0].token_ids == expected
    # only a's first block could be indexed (every later key was taken); b reuses it only where the
    # two prompts really agree (the template's shared system prompt), never past that
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert result.cached_tokens == (16 if shared >= 16 else 0)
