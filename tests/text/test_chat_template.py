"""Chat template rendering: parity with transformers on the default model, HF helpers, sandbox."""

from __future__ import annotations

import re
from typing import Any

import pytest

from layerserve.text.chat_template import ChatTemplate, TemplateError
from layerserve.text.tokenizer import Tokenizer

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2? Answer in 日本語 😀"},
    ],
    "user-only": [{"role": "user", "content": "Hello!"}],
    "multi-turn": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I'm SmolLM.\nHow can I help?"},
        {"role": "user", "content": "Write  `print(1)`  in Python."},
    ],
}


@pytest.fixture(scope="module")
def smollm_template(smollm_tokenizer: Tokenizer) -> ChatTemplate:
    assert smollm_tokenizer.chat_template is not None
    return ChatTemplate(smollm_tokenizer.chat_template, smollm_tokenizer.bos_token, smollm_tokenizer.eos_token)


def _hf_ids(result: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding for tokenize=True; 4.x a list of ids
    return list(result["input_ids"] if hasattr(result, "keys") else result)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompt_tokens_match_transformers(
    smollm_tokenizer: Tokenizer, smollm_template: ChatTemplate, hf_smollm_tokenizer: Any, name: str
) -> None:
    messages = CONVERSATIONS[name]
    prompt = smollm_template.render(messages)
    assert prompt == hf_smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf_smollm_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert smollm_tokenizer.encode(prompt) == _hf_ids(expected)


def test_default_system_prompt_and_generation_prompt(smollm_template: ChatTemplate) -> None:
    prompt = smollm_template.render([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not smollm_template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_message_content_is_data_not_template(smollm_template: ChatTemplate) -> None:
    prompt = smollm_template.render([{"role": "user", "content": "{{ 7*7 }} {% raise %}"}])
    assert "{{ 7*7 }} {% raise %}" in prompt


SSTI_PAYLOADS = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ (messages|first).update({'role': 'x'}) }}",
    "{{ lipsum.__globals__['os'] }}",
]


@pytest.mark.parametrize("payload", SSTI_PAYLOADS)
def test_sandbox_violations_raise_template_error(payload: str) -> None:
    template = ChatTemplate(payload)
    with pytest.raises(TemplateError):
        template.render([{"role": "user", "content": "hi"}])


def test_raise_exception_message_is_kept() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="Conversation roles must be user/assistant"):
        template.render([{"role": "tool", "content": "x"}])
    assert template.render([{"role": "user", "content": "x"}]) == ""


def test_render_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages }}").render(["not a dict"])  # type: ignore[list-item]


def test_hf_helpers() -> None:
    template = ChatTemplate(
        "{{ bos_token }}|{{ tools | tojson }}|{{ {'a': [1]} | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{{ 'content' in m }}{% endfor %}|{{ eos_token }}|{{ dict(x=1) | tojson }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "día <b>&"}}]
    out = template.render([{"role": "assistant", "content": None, "tool_calls": []}], tools=tools)
    bos, tools_json, indented, year, has_content, eos, made = out.split("|")
    assert bos == "<s>" and eos == "</s>"
    assert tools_json == '[{"type": "function", "function": {"name": "f", "description": "día <b>&"}}]'
    assert indented == '{\n  "a": [\n    1\n  ]\n}'
    assert re.fullmatch(r"\d{4}", year)
    assert has_content == "False"  # None-valued keys are dropped, as transformers does
    assert made == '{"x": 1}'


def test_tools_none_extra_kwargs_loopcontrols_and_generation_tag() -> None:
    template = ChatTemplate(
        "{{ tools is none }}|{{ enable_thinking }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
        "{% generation %}gen{% endgeneration %}"
    )
    out = template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], enable_thinking=False)
    assert out == "True|False|a|gen"
