"""Server-side template injection: known SSTI payloads in a chat template fail safely in the
sandbox (TemplateError, or a harmless rendering), never run anything and never hand the template
a Python object; request data (messages, template kwargs) is rendered as text, never as template."""

from __future__ import annotations

import json
import pathlib

import pytest

from layerserve.text.chat_template import ChatTemplate, TemplateError

USER = [{"role": "user", "content": "hi"}]


def _exec_payloads(canary: pathlib.Path) -> list[str]:
    """Payloads that would create `canary` if the sandbox let them run a command."""
    cmd = f"touch {canary}"
    return [
        f"{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}",
        f"{{{{ joiner.__init__.__globals__.os.system('{cmd}') }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('{cmd}').read() }}}}",
        f"{{{{ lipsum.__globals__.__builtins__.__import__('os').system('{cmd}') }}}}",
        f"{{{{ namespace.__init__.__globals__.os.system('{cmd}') }}}}",
        f"{{{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('{cmd}') }}}}",
        f"{{{{ strftime_now.__globals__.__builtins__.exec(\"import os; os.system('{cmd}')\") }}}}",
        f"{{{{ dict.fromkeys.__func__.__globals__.__builtins__.eval(\"__import__('os').system('{cmd}')\") }}}}",
        f"{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('{cmd}') }}}}",
        f"{{{{ request.application.__globals__.__builtins__.__import__('os').popen('{cmd}').read() }}}}",
        f"{{{{ config.__class__.__init__.__globals__['os'].popen('{cmd}').read() }}}}",
        f"{{{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__['sys'].modules['os'].system('{cmd}') }}}}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c('{cmd}', shell=True) }}}}{{% endif %}}{{% endfor %}}",
        f"{{{{ (''|attr('__class__')|attr('__mro__'))[1]|attr('__subclasses__')() }}}}{{{{ '{cmd}' }}}}",
        f"{{{{ ''['__class__']['__mro__'][1]['__subclasses__']() }}}}{{{{ '{cmd}' }}}}",
        f"{{{{ '{{0.__class__.__init__.__globals__}}'.format(cycler) }}}}{{{{ '{cmd}' }}}}",
        f"{{% import 'os' as os %}}{{{{ os.system('{cmd}') }}}}",
    ]


# Payloads that reach for Python internals: each must raise TemplateError.
REFUSED = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ (1).__class__.__base__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self._TemplateReference__context.cycler }}",
    "{{ lipsum.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__ }}",
    "{{ dict.__class__ }}",
    "{{ dict.fromkeys.__globals__ }}",
    "{{ namespace(a=1).__class__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ config.items() }}",  # Flask's `config` does not exist here: undefined, and calling it fails
    "{{ request.application.__globals__ }}",
    "{{ config.SECRET_KEY }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
    "{{ ''|attr('__class__') }}",
    "{{ messages|attr('__class__')|attr('__mro__') }}",
    "{{ messages|attr('__getitem__')(0) }}",
    "{{ ''['__class__'] }}",
    "{{ messages['__class__'] }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ messages|sort(attribute='__class__') }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ '%s'|format(messages.__class__) }}",
    "{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    "{% macro m() %}{% endmacro %}{{ m._func }}",
    "{{ tools.__class__ }}",
    "{{ enable_thinking.__class__ }}",
    "{{ messages.append(1) }}",
    "{{ messages.pop() }}",
    "{{ (messages|first).clear() }}",
    "{{ (messages|first).update(role='system') }}",
    "{% set _ = messages.__setitem__(0, 1) %}",
    "{{ range(10**10)|list|length }}",  # the sandbox caps range() at 100,000
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% from '/etc/passwd' import x %}",
    "{% import 'os' as os %}",
]


@pytest.mark.parametrize("payload", REFUSED)
def test_ssti_payloads_raise_template_error(payload: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(payload).render(USER)


def test_ssti_payloads_never_execute(tmp_path: pathlib.Path) -> None:
    canary = tmp_path / "pwned"
    payloads = _exec_payloads(canary)
    for payload in payloads:
        with pytest.raises(TemplateError):
            ChatTemplate(payload).render(USER)
    assert not canary.exists()
    # the check itself can fail: the same command outside the sandbox does create the file
    import jinja2

    jinja2.Environment().from_string(payloads[0]).render()
    assert canary.exists()


@pytest.mark.parametrize(("payload", "rendered"), [
    ("{{ config }}", ""),  # Flask globals are simply undefined here
    ("{{ request }}", ""),
    ("{{ loop }}", ""),
    ("{{ (messages|first).items()|list }}", "[('role', 'user'), ('content', 'hi')]"),
    ("{{ '{{ 7*7 }}' }}", "{{ 7*7 }}"),  # a string that looks like a template stays a string
])
def test_harmless_renderings(payload: str, rendered: str) -> None:
    assert ChatTemplate(payload).render(USER) == rendered


def test_template_sees_only_json_data() -> None:
    """Rich objects passed in (as a buggy caller might) reach the template as JSON or a
    placeholder, never as an object whose methods it could call."""

    class Secret:
        token = "s3cret"

        def leak(self) -> str:
            return self.token

    template = ChatTemplate("{{ payload }}|{{ payload.token }}|{{ messages[0].content }}")
    out = template.render([{"role": "user", "content": Secret()}], payload=Secret())
    assert out == "<Secret>||<Secret>"
    with pytest.raises(TemplateError):
        ChatTemplate("{{ payload.leak() }}").render(USER, payload=Secret())


PAYLOAD_TEXT = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}x{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{#",
    "{% raw %}",
    "}}{{",
]


@pytest.mark.parametrize("text", PAYLOAD_TEXT)
def test_request_data_renders_literally(text: str) -> None:
    """Message content and template kwargs are data: printed as given, never evaluated."""
    template = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}<{{ extra }}>{{ docs|tojson }}")
    out = template.render([{"role": "user", "content": text}], extra=text, docs={"k": text})
    assert out == f"[{text}]<{text}>" + json.dumps({"k": text})
