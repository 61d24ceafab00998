"""errors.py on its own: validation messages name the field, the table maps classes, and an
unexpected exception becomes a 500 envelope without dropping the connection."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from layerserve.api.errors import (
    ERROR_TABLE,
    BodyTooLargeError,
    InvalidRequestError,
    NotSupportedError,
    install_error_handlers,
    kind_of,
    validation_message,
)
from layerserve.api.protocol import ChatCompletionRequest, parse_request
from layerserve.engine.core import InvalidRequest
from layerserve.text.chat_template import TemplateError


def test_table_lookup_follows_the_class_hierarchy():
    assert kind_of(NotSupportedError("x")).status == 400
    assert kind_of(InvalidRequest("too long", "context_length_exceeded")).status == 400
    assert kind_of(TemplateError("bad roles")).status == 400
    assert kind_of(BodyTooLargeError("big")).status == 413
    assert kind_of(KeyError("surprise")) is ERROR_TABLE[Exception]


def test_validation_message_without_data_drops_branch_labels():
    errors = [{"type": "string_type", "loc": ("body", "messages", 0, "content", "str"), "msg": "Input should be a valid string"}]
    assert validation_message(errors) == (
        "Invalid value for 'messages[0].content': Input should be a valid string.", "messages[0].content")


@pytest.mark.parametrize("body,param", [
    (b'{"model": "x", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "x", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
     b'"function": {"name": 5}}]}', "tools[0].function.name"),
    (b'{"model": "x", "messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", '
     b'"function": {"name": "f"}}]}]}', "messages[0].tool_calls[0].function.arguments"),
])
def test_param_paths(body, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(ChatCompletionRequest, body)
    assert info.value.param == param


async def test_unexpected_exception_is_a_500_envelope():
    app = FastAPI()
    install_error_handlers(app)

    async def boom() -> None:
        raise RuntimeError("internal detail that must not leak")

    async def fine() -> dict:
        return {"ok": True}

    app.add_api_route("/boom", boom)
    app.add_api_route("/fine", fine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=True),
                                 base_url="http://t") as client:
        response = await client.get("/boom")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "internal detail" not in error["message"]
        assert (await client.get("/fine")).json() == {"ok": True}
