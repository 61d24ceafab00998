"""POST /tokenize and /detokenize, in vLLM's shapes.

/tokenize takes `{"prompt": "..."}` (BOS added as the model wants, unless add_special_tokens is
false; special-token strings in it are parsed, as in a /v1/completions prompt) or
`{"messages": [...]}` (planned and rendered exactly as a chat request without tools would be, tool
calls in the history included; only the template's own markup becomes control tokens) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; /detokenize answers `{"prompt": "..."}` for
`{"tokens": [...]}`. The work (and the JSON of a body that may hold millions of ids) is done on a
prep thread, off the event loop.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from layerserve.api.chat_prompt import plan_messages, template_messages, template_prompt_ids
from layerserve.api.errors import InvalidRequestError
from layerserve.api.protocol import DetokenizeRequest, TokenizeRequest, parse_request
from layerserve.api.state import Runtime, server_state
from layerserve.config import ServerConfig


async def tokenize(request: Request) -> Response:
    state = server_state(request)
    rt = state.ready()
    req = parse_request(TokenizeRequest, await request.body())
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("Give exactly one of 'prompt' or 'messages'.", "prompt")
    return _json(await rt.offload(_tokenize, req, rt, state.config))


def _tokenize(req: TokenizeRequest, rt: Runtime, config: ServerConfig) -> bytes:
    if req.prompt is not None:
        add_special = req.add_special_tokens if req.add_special_tokens is not None else True
        ids = rt.encode_raw(req.prompt, add_special_tokens=add_special)
    else:
        plan = plan_messages(rt, template_messages(req.messages, config))
        ids = template_prompt_ids(rt, plan.messages, plan.tools, add_generation_prompt=req.add_generation_prompt,
                                  add_special_tokens=bool(req.add_special_tokens), param=None)
    strs = [rt.token_text(i)[0] for i in ids] if req.return_token_strs else None
    return _dumps({"count": len(ids), "max_model_len": rt.engine.max_model_len, "tokens": ids, "token_strs": strs})


async def detokenize(request: Request) -> Response:
    rt = server_state(request).ready()
    req = parse_request(DetokenizeRequest, await request.body())
    return _json(await rt.offload(_detokenize, req, rt))


def _detokenize(req: DetokenizeRequest, rt: Runtime) -> bytes:
    vocab = rt.tokenizer.vocab_size
    bad = [i for i in req.tokens if i >= vocab]
    if bad:
        raise InvalidRequestError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).", "tokens")
    return _dumps({"prompt": rt.tokenizer.decode(req.tokens, skip_special_tokens=False)})


def _dumps(body: dict[str, Any]) -> bytes:
    # as JSONResponse renders
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
