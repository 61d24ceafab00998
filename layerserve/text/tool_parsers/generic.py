"""Generic format, for models whose chat template knows nothing of tools (the default SmolLM2).

The tools are described in the system prompt and the tool request's output is forced into:

    Topic: weather in Tokyo     <- a few words of the model's own, then either calls:
    Tool: weather               <- the tool, under a short alias
    location: Tokyo             <- its arguments as lines (or JSON, see generic_args.py)
    Tool: ...                   <- more calls, when parallel calls are allowed
or
    Tool: none                  <- no call: the output ends here

and a text answer is then written by a second request (`ChatPlan.answer`) whose context has no
tool instructions and no routing markup. What shaped this, measured on SmolLM2-135M (the cases are
in tests/text/test_tool_generic.py):

- a small model decides badly at the first token of an answer, but well after restating the
  request in its own words ("Topic: ...") and when the choice is between two content words;
  so tools are shown under short aliases (`get_weather` -> `weather`) and the decision is
  " weather" vs " none", right after a topic line that usually says "weather" or not;
- the decision's first token must carry the word's leading space: after a lone " " token the
  model's preference between the words is noise;
- text written after this markup is much worse than the same model's plain answer (it keeps
  producing "Tool: ..." lines), hence the separate answer request; the prefix cache makes its
  prompt nearly free;
- arguments copied from the user's message come out right as `key: value` lines, and often
  wrong inside JSON strings (generic_args.py);
- the model tends to repeat a call, or to add calls of other tools with junk arguments: parallel
  calls must use the first call's tool, and the output stops at the first repeat (same tool,
  same required arguments);
- all of this is hidden routing, sampled greedily (`ChatPlan.greedy`): the model's best guess,
  whatever the request's temperature, which then applies to the text answer.

The parser (generic_parser.py) maps aliases back to the real names; none of this markup reaches
`content`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

from layerserve.text.tool_parsers.base import (
    ChoiceMode,
    Constraint,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolSpec,
    new_call_id,
)
from layerserve.text.tool_parsers.generic_args import LineArgs
from layerserve.text.tool_parsers.generic_parser import NONE, TOOL, TOPIC, GenericParser
from layerserve.text.tool_parsers.registry import TOOL_FORMATS
from layerserve.text.tool_parsers.schema import json_schema_rule

MAX_TOPIC_CHARS = 60
# Leading verbs dropped from a tool name to get its alias: get_weather -> weather.
_VERBS = frozenset(
    "get fetch retrieve lookup look find query list read show check do run call use make perform "
    "execute request load obtain".split()
)
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def tool_aliases(tools: list[ToolSpec]) -> dict[str, ToolSpec]:
    """alias -> tool: the tool name in lower-case words without a leading verb; the full name
    where that would be ambiguous or read as "none"."""
    wanted: dict[str, list[ToolSpec]] = {}
    for tool in tools:
        words = [w.lower() for w in _WORDS.findall(tool.name)] or [tool.name]
        while len(words) > 1 and words[0] in _VERBS:
            words.pop(0)
        wanted.setdefault("_".join(words), []).append(tool)
    out: dict[str, ToolSpec] = {}
    for alias, owners in wanted.items():
        for tool in owners:
            name = alias if len(owners) == 1 and alias != NONE else tool.name
            out[name if name != NONE and name not in out else f"{tool.name}_tool"] = tool
    return out


def describe_parameters(schema: dict[str, Any]) -> str:
    """`location (string, required), unit ("celsius" or "fahrenheit")`: the arguments in words."""
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    parts = []
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        if "enum" in prop:
            kind = " or ".join(json.dumps(v) for v in prop["enum"])
        else:
            kind = prop.get("type", "any")
            kind = "/".join(kind) if isinstance(kind, list) else str(kind)
        if name in required:
            kind += ", required"
        desc = prop.get("description")
        parts.append(f"{name} ({kind})" + (f": {desc}" if desc else ""))
    return ", ".join(parts) if parts else "none"


@TOOL_FORMATS.register(priority=-1)
class GenericFormat(ToolFormat):
    name = "generic"
    answer_after_results = True
    separate_answer = True
    greedy_calls = True

    @classmethod
    def detect(cls, chat_template: str) -> bool:
        return True  # the fallback

    def system_prompt(self, tools: list[ToolSpec]) -> str:
        lines = ["You are a helpful assistant with these tools:"]
        for alias, tool in tool_aliases(tools).items():
            desc = tool.description.strip().rstrip(".")
            lines.append(f"- {alias}: {desc + '. ' if desc else ''}Arguments: {describe_parameters(tool.parameters)}.")
        lines += [
            "",
            'Start every reply with "Topic: " and the topic of the user\'s message in a few words. '
            'Then write "Tool: " and the tool for that topic, or "Tool: none".',
        ]
        return "\n".join(lines)

    def prepare_messages(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        out = self._plain_messages(messages, tools, calls_as_lines=True)
        if tools:
            _add_system(out, self.system_prompt(tools))
        return out, None

    def answer_messages(self, messages: list[dict[str, Any]], tools: list[ToolSpec], choice: ToolChoice) -> list[dict[str, Any]]:
        """The conversation as plain chat. With tool_choice "none" the tools are still named
        (OpenAI shows them); otherwise the routing request has already decided against them.
        Past calls read `Calling weather with {...}.`: in call-line form, a small model keeps
        writing call lines instead of answering."""
        out = self._plain_messages(messages, tools, calls_as_lines=False)
        if tools and choice.mode is ChoiceMode.NONE:
            names = ", ".join(f"{alias} ({t.description.strip().rstrip('.') or 'no description'})" for alias, t in tool_aliases(tools).items())
            _add_system(out, f"Tools exist ({names}), but answer this message yourself, in plain text.")
        return out

    def _plain_messages(self, messages: list[dict[str, Any]], tools: list[ToolSpec], calls_as_lines: bool) -> list[dict[str, Any]]:
        """Every message as role + text; tool results as user messages ("weather returned: ...")."""
        aliases = tool_aliases(tools)
        by_name = {tool.name: alias for alias, tool in aliases.items()}
        out: list[dict[str, Any]] = []
        for message in messages:
            role = message.get("role")
            content = message.get("content") or ""
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False)
            if role == "assistant" and message.get("tool_calls"):
                calls = [(by_name.get(c["function"]["name"], c["function"]["name"]), c["function"].get("arguments")) for c in message["tool_calls"]]
                text = self._calls_text(calls, aliases) if calls_as_lines else " ".join(
                    f"Calling {name} with {_json_text(arguments)}." for name, arguments in calls
                )
                out.append({"role": "assistant", "content": (content + "\n" if content else "") + text})
            elif role == "tool":
                name = by_name.get(message.get("name", ""), message.get("name", "tool"))
                out.append({"role": "user", "content": f"{name} returned: {content}"})
            else:
                out.append({"role": "system" if role == "developer" else role, "content": content})
        return out

    @staticmethod
    def _calls_text(calls: list[tuple[str, Any]], aliases: dict[str, ToolSpec]) -> str:
        """Past calls in the shape the model writes them."""
        lines = [f"{TOPIC} {' and '.join(dict.fromkeys(name.replace('_', ' ') for name, _ in calls))}"]
        for name, arguments in calls:
            lines.append(f"{TOOL} {name}{_call_text(aliases.get(name), arguments)}")
        return "\n".join(lines)

    def grammar(self, tools: list[ToolSpec], choice: ToolChoice, parallel: bool, content_rule: str | None) -> Constraint:
        aliases = tool_aliases(tools)
        # Parallel calls repeat the first call's tool: asked about one tool, a small model adds
        # junk calls of the others ("timezone: none") far more often than it needs two tools.
        many = parallel and choice.mode is not ChoiceMode.NAMED
        lines = [
            f'start: "{TOPIC}" TOPIC "\\n{TOOL}" choice',
            f"choice: calls | {self._word(NONE)}" if choice.mode is ChoiceMode.AUTO else "choice: calls",
            "calls: " + " | ".join(f'call_{i} ("\\n{TOOL}" call_{i})*' if many else f"call_{i}" for i in range(len(aliases))),
        ]
        required: dict[str, list[str] | None] = {}
        for i, (alias, tool) in enumerate(aliases.items()):
            line_args = LineArgs.of(tool.parameters)
            args = " ".join(line_args.grammar(self._word)) if line_args else f'" " {json_schema_rule(tool.parameters)}'
            lines.append(f"call_{i}: {self._word(alias)} {args}".rstrip())
            required[alias] = line_args.required if line_args else None
        lines.append(f"TOPIC: / [^\\n]{{1,{MAX_TOPIC_CHARS - 1}}}/")
        return Constraint("\n".join(lines) + "\n", stop_after="\n" + TOOL, stop_when=functools.partial(_repeats, required))

    def _word(self, word: str) -> str:
        """`word` after a space, spelled so that its first token carries the space (" weather",
        " we" + "ather", ...). A lone " " token would also spell it, but after one the model's
        preference between words is noise; with it excluded, the choice between tools and "none"
        (or between enum values) is made at a natural token."""
        firsts = []
        for k in range(1, len(word) + 1):
            ids = self.tokenizer.encode(" " + word[:k])
            if len(ids) == 1:
                rest = f" {json.dumps(word[k:])}" if word[k:] else ""
                firsts.append(f"<[{ids[0]}]>{rest}")
        if not firsts:  # no token starts with " " + a letter of it: plain text
            return json.dumps(" " + word)
        return "(" + " | ".join(firsts) + ")"

    def new_parser(self, tools: list[ToolSpec], id_factory: Callable[[], str] = new_call_id) -> ToolCallParser:
        forms = {alias: (tool.name, LineArgs.of(tool.parameters)) for alias, tool in tool_aliases(tools).items()}
        return GenericParser(forms, id_factory)


def _repeats(required: dict[str, list[str] | None], output: str) -> bool:
    """Whether the last finished call in `output` (which ends where the next call begins)
    repeats an earlier one: the same tool with the same required arguments (for JSON arguments,
    the same JSON). A small model asked about one city likes to add the same call per unit."""
    calls = output.split("\n" + TOOL)[1:-1]

    def key(call: str) -> tuple[str, ...]:
        head, *arg_lines = call.split("\n")
        names = required.get(head.strip())
        if names is None:
            return (call,)
        return (head.strip(), *sorted(line for line in arg_lines if line.split(":", 1)[0] in names))

    return len(calls) > 1 and key(calls[-1]) in {key(c) for c in calls[:-1]}


def _add_system(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
    else:
        messages.insert(0, {"role": "system", "content": text})


def _json_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def _call_text(tool: ToolSpec | None, arguments: Any) -> str:
    """What follows the tool word for a past call: argument lines, or " " and JSON."""
    if tool is not None:
        line_args = LineArgs.of(tool.parameters)
        if line_args is not None:
            lines = line_args.render(arguments if arguments is not None else {})
            if lines is not None:
                return lines
    return " " + _json_text(arguments)
