"""Tool-call formats, one file each, registered in TOOL_FORMATS (see registry.py)."""

from layerserve.text.tool_parsers import generic, hermes, llama3, mistral  # noqa: F401  (register)
from layerserve.text.tool_parsers.base import (
    ChoiceMode,
    ParsedDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolSpec,
    new_call_id,
)
from layerserve.text.tool_parsers.registry import TOOL_FORMATS

__all__ = [
    "TOOL_FORMATS",
    "ChoiceMode",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolChoice",
    "ToolFormat",
    "ToolSpec",
    "new_call_id",
]
