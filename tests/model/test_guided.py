"""Grammar masks on llguidance, with the default model's tokenizer (vocab 49152)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from layerserve.model.guided import GrammarCompiler, GrammarError
from layerserve.text.tool_parsers import ToolSpec
from layerserve.text.tool_parsers.base import Constraint

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def compiler(smollm_tokenizer):
    return GrammarCompiler(smollm_tokenizer)


def walk(mask, tokenizer, text: str) -> bool:
    """Accept `text` token by token; False at the first token the mask refuses."""
    for token in tokenizer.encode(text):
        if not mask.allowed_mask()[token]:
            return False
        mask.accept(token)
    return True


def test_json_schema_mask(compiler, smollm_tokenizer):
    factory = compiler.json_schema(PERSON)
    mask = factory()
    assert walk(mask, smollm_tokenizer, '{"name": "Ann", "age": 31}')
    assert mask.is_accepting() and mask.is_finished()
    for bad in ('{"name": "Ann", "age": -1}', '{"name": "Ann", "age": 3, "x": 1}', '{"name":"Ann"', "Sure! {"):
        assert not walk(factory(), smollm_tokenizer, bad), bad


def test_json_object_starts_with_a_brace(compiler, smollm_tokenizer):
    allowed = compiler.json_object()().allowed_token_ids()
    assert allowed and all(smollm_tokenizer.decode([t]).startswith("{") for t in allowed)


def test_eos_is_allowed_exactly_when_accepting(compiler, smollm_tokenizer):
    mask = compiler.lark('start: "hi" /[a-z]*/')()
    eos = sorted(smollm_tokenizer.eos_token_ids)
    assert not mask.allowed_mask()[eos].any()
    assert walk(mask, smollm_tokenizer, "hi")
    assert mask.allowed_mask()[eos].all() and not mask.is_finished()
    mask.accept(eos[0])
    assert mask.is_finished()


def test_finished_when_nothing_but_eos_fits(compiler, smollm_tokenizer):
    mask = compiler.lark('start: "yes" | "no"')()
    assert walk(mask, smollm_tokenizer, "no") and mask.is_finished()
    assert mask.allowed_token_ids() == sorted(smollm_tokenizer.eos_token_ids)


def test_a_refused_token_ends_the_sequence(compiler, smollm_tokenizer):
    mask = compiler.lark('start: "yes" | "no"')()
    mask.accept(smollm_tokenizer.encode("maybe")[0])
    assert mask.error and mask.is_finished()
    assert mask.allowed_token_ids() == sorted(smollm_tokenizer.eos_token_ids)


def test_bitmask_matches_bool_mask(compiler, smollm_tokenizer):
    mask = compiler.json_schema(PERSON)()
    walk(mask, smollm_tokenizer, '{"name": "A')
    words = torch.zeros((smollm_tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    mask.fill_bitmask(words)
    bits = ((words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()
    assert torch.equal(bits[: smollm_tokenizer.vocab_size], mask.allowed_mask())
    assert mask.allowed_token_ids() == mask.allowed_mask().nonzero().squeeze(1).tolist()


def test_each_sample_gets_its_own_state(compiler, smollm_tokenizer):
    factory = compiler.lark('start: "ab" | "cd"')
    first, second = factory(), factory()
    walk(first, smollm_tokenizer, "ab")
    assert first.is_finished() and not second.is_finished()
    assert walk(second, smollm_tokenizer, "cd")


def test_invalid_grammar(compiler):
    with pytest.raises(GrammarError):
        compiler.lark("start: undefined_rule")
    with pytest.raises(GrammarError):
        compiler.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}})


def test_stop_check(compiler, smollm_tokenizer):
    seen = []

    def stop_when(output: str) -> bool:
        seen.append(output)
        return output.count("x;") >= 2

    mask = compiler.compile(Constraint('start: ("x;")+', stop_after="x;", stop_when=stop_when))()
    assert walk(mask, smollm_tokenizer, "x;") and not mask.is_finished()
    assert walk(mask, smollm_tokenizer, "x;") and mask.is_finished()
    assert seen == ["x;", "x;x;"]


def test_tool_schemas_in_engine(smollm_tokenizer):
    """The mask in the offline engine: greedy output under a schema parses and validates."""
    from layerserve.engine.llm import LLM
    from layerserve.engine.request import SamplingParams

    llm = LLM(num_blocks=256, max_model_len=1024, progress=False)
    compiler = GrammarCompiler(llm.tokenizer)
    spec = ToolSpec("p", "", PERSON)
    ids = llm.encode_chat([{"role": "user", "content": "Describe a person named Ann, aged 31, as JSON."}])
    for temperature in (0.0, 0.7):
        params = SamplingParams(max_tokens=60, temperature=temperature, seed=3, logits_mask_factory=compiler.json_schema(spec.parameters))
        out = llm.generate([ids], params)[0].outputs[0]
        value = json.loads(out.text)
        jsonschema.validate(value, PERSON)
        assert out.finish_reason.value == "stop"
