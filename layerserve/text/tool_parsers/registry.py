"""Registry of tool-call formats: each format file registers its class with a priority; the
first (highest-priority) format whose `detect` accepts the chat template wins, and the generic
format, which needs nothing from the template, catches the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolFormatRegistry:
    _formats: dict[str, tuple[int, type]] = field(default_factory=dict)  # name -> (priority, class)

    def register(self, priority: int = 0) -> Callable[[type], type]:
        """Class decorator. Higher priority formats are tried first; the fallback uses < 0."""

        def deco(cls: type) -> type:
            self._formats[cls.name] = (priority, cls)
            return cls

        return deco

    def names(self) -> list[str]:
        return [name for name, _ in self._ordered()]

    def get(self, name: str) -> type:
        try:
            return self._formats[name][1]
        except KeyError:
            raise ValueError(f"unknown tool-call format {name!r} (known: {', '.join(self.names())})") from None

    def detect(self, chat_template: str | None) -> type:
        """The format class for a chat template (the generic fallback when none claims it)."""
        for _, cls in self._ordered():
            if cls.detect(chat_template or ""):
                return cls
        raise LookupError("no tool-call format accepts this chat template")

    def for_tokenizer(self, tokenizer: Any, name: str | None = None) -> Any:
        """A format instance for a loaded model: `name` when given, else detected from the
        tokenizer's chat template."""
        cls = self.get(name) if name else self.detect(tokenizer.chat_template)
        return cls(tokenizer)

    def _ordered(self) -> list[tuple[str, type]]:
        items = sorted(self._formats.items(), key=lambda kv: -kv[1][0])
        return [(name, cls) for name, (_, cls) in items]


# The one registry instance is immutable in use: filled at import by the format modules.
TOOL_FORMATS = ToolFormatRegistry()
