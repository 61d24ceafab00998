"""Render a conversation (and tool schemas) into a prompt string with the model's jinja chat template.

Templates come from model files, so they are untrusted code: they run in jinja's immutable
sandbox, and any attempt to reach an unsafe attribute (`''.__class__`, `cycler.__init__`, a
mutating method) raises instead of rendering as empty, so it surfaces as a TemplateError. The
helpers (`raise_exception`, `tojson`, `strftime_now`, `namespace`, `dict`) behave as in Hugging Face
transformers' `apply_chat_template`, so templates written for it render the same here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(Exception):
    """The chat template failed to render, or rejected the conversation; the message is user-facing."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Sandbox in which touching an unsafe attribute raises at once instead of yielding Undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) and
    renders its body unchanged; we do not track assistant spans."""

    tags = frozenset({"generation"})  # jinja only tests membership

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attribute names (as transformers' does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: `self` may be a keyword
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template; `render` turns messages (+ tools) into the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            namespace=_Namespace,
            dict=_TemplateDict(),
            bos_token=bos_token,
            eos_token=eos_token,
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"invalid chat template: {exc}") from exc
        self.source = source

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`.

        Messages are copied to plain JSON data first, and keys whose value is None are dropped
        (OpenAI sends `content: null` next to `tool_calls`; templates handle a missing key better).
        `extra` reaches the template as variables (e.g. `enable_thinking`, `documents`).
        Raises TemplateError when the template fails or rejects the conversation.
        """
        return self.render_request(messages, tools, add_generation_prompt, extra)

    def render_request(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
        each_string: Callable[[str], str] | None = None,
    ) -> str:
        """`render`, with `each_string` applied to every string the caller passed in (message,
        tool and `extra` strings, dict keys included) and never to the template's own text or
        its globals (`bos_token`, ...): `PromptLiterals.hide` uses it to keep request text from
        turning into control tokens."""
        try:
            context = {
                "messages": [_plain_message(message, each_string) for message in messages],
                "tools": _plain(tools, each_string),
                "documents": None,
                "add_generation_prompt": add_generation_prompt,
                **{key: _plain(value, each_string) for key, value in (extra or {}).items()},
            }
        except RecursionError:
            raise TemplateError("The messages or chat_template_kwargs are nested too deeply.") from None
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateError(f"chat template attempted an unsafe operation: {exc}") from exc
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            LookupError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            raise TemplateError(f"chat template failed to render: {exc}") from exc


def _plain_message(message: Any, each_string: Callable[[str], str] | None = None) -> dict[str, Any]:
    plain = _plain(message, each_string)
    if not isinstance(plain, dict):
        raise TemplateError(f"a chat message must be an object, got {type(message).__name__}")
    return {key: value for key, value in plain.items() if value is not None}


def _plain(value: Any, each_string: Callable[[str], str] | None = None) -> Any:
    """A copy of `value` made of JSON types only, so the template sees no rich objects (whose
    methods the sandbox cannot judge); anything else becomes a placeholder naming its type.
    `each_string`, when given, maps every string of `value` (keys too)."""
    if isinstance(value, str):
        text = value if type(value) is str else str.__str__(value)
        return each_string(text) if each_string is not None else text
    if value is None or type(value) in (int, float, bool):
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, each_string): _plain(v, each_string) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, each_string) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), each_string) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(), each_string)
    return f"<{type(value).__name__}>"
