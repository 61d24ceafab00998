"""Property: whatever a model writes under a format's grammar, the calls parse and their arguments
validate against the tool's schema (jsonschema). The "model" is a random walk over the tokens
each mask allows, biased towards structural tokens so that outputs finish."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerserve.model.guided import GrammarCompiler
from layerserve.text.tool_parsers import TOOL_FORMATS
from layerserve.text.tools import plan_chat

MAX_STEPS = 160
STRUCTURAL = ['"', "\n", "}", "]", ",", " ", ":", "{", "[", "0", "1", "7", "-", ".", "e", "a", "b", "true", "false",
              "null", ", ", '": ', '"}', " true", " false", " 3", " x", "x", " celsius", " b"]

leaves = st.sampled_from([
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "string", "enum": ["celsius", "fahrenheit"]},
    {"enum": [1, 2.5, True]},
    {"type": "integer", "minimum": -3, "maximum": 7},
    {"type": "string", "maxLength": 4},
    {"type": "string", "pattern": "^[a-c]+$"},
    {"type": ["string", "null"]},
])
names = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)


@st.composite
def objects(draw, values):
    props = draw(st.dictionaries(names, values, max_size=3))
    required = [k for k in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required}


schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(objects(inner), st.builds(lambda s: {"type": "array", "items": s, "maxItems": 2}, inner)),
    max_leaves=5,
)
parameters = objects(schemas)


@pytest.fixture(scope="module")
def world(smollm_tokenizer):
    structural = {t for piece in STRUCTURAL for t in smollm_tokenizer.encode(piece)[:1]} | set(smollm_tokenizer.eos_token_ids)
    return GrammarCompiler(smollm_tokenizer), sorted(structural)


def random_output(mask, tokenizer, structural: list[int], rng: random.Random) -> str | None:
    tokens = []
    for _ in range(MAX_STEPS):
        if mask.is_finished():
            break
        allowed = mask.allowed_mask()
        picks = [t for t in structural if allowed[t]]
        if not picks or rng.random() < 0.15:
            picks = allowed.nonzero().squeeze(1).tolist()
        token = rng.choice(picks)
        if token in tokenizer.eos_token_ids:
            break
        mask.accept(token)
        tokens.append(token)
    else:
        return None  # did not finish: nothing to check (the test counts how often this happens)
    return tokenizer.decode(tokens, skip_special_tokens=False)


@pytest.mark.parametrize("fmt_name", ["generic", "hermes", "llama3_json", "mistral"])
def test_arguments_validate(smollm_tokenizer, world, fmt_name):
    compiler, structural = world
    counts = {"examples": 0, "checked": 0}

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(params=parameters, seed=st.integers(0, 2**32 - 1), choice=st.sampled_from(["required", "auto"]),
           ping=st.booleans())
    def check(params, seed, choice, ping):
        counts["examples"] += 1
        tools = [{"type": "function", "function": {"name": "get_thing", "description": "d", "parameters": params}}]
        if ping:  # a second tool, without parameters
            tools.append({"type": "function", "function": {"name": "ping"}})
        plan = plan_chat(TOOL_FORMATS.get(fmt_name)(smollm_tokenizer), [{"role": "user", "content": "hi"}], tools=tools,
                         tool_choice=choice)
        mask = compiler.compile(plan.constraint)()
        text = random_output(mask, smollm_tokenizer, structural, random.Random(seed))
        if text is None:
            return  # the walk did not finish within MAX_STEPS: nothing to check (counted below)
        counts["checked"] += 1
        parser = plan.new_parser()
        for piece in [text[i:i + 3] for i in range(0, len(text), 3)]:
            parser.feed(piece)
        parser.finish()
        if choice == "required":
            assert parser.tool_calls, text
        for call in parser.tool_calls:
            schema = params if call.name == "get_thing" else {"type": "object", "properties": {},
                                                             "additionalProperties": False}
            jsonschema.validate(json.loads(call.arguments), schema)
        if not parser.tool_calls and fmt_name != "generic":
            assert parser.content, text

    check()
    # A walk that never finishes checks nothing: the property holds only if most examples reached it.
    assert counts["examples"] > 0 and counts["checked"] * 2 >= counts["examples"], counts
