"""POST /tokenize and /detokenize, in vLLM's shapes.

/tokenize takes `{"prompt": "..."}` (BOS added as the model wants, unless add_special_tokens is
false) or `{"messages": [...]}` (rendered with the chat template exactly as a chat request would
be) and answers `{"count", "max_model_len", "tokens", "token_strs"}`; /detokenize answers
`{"prompt": "..."}` for `{"tokens": [...]}`.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.chat_prompt import template_messages
from layerserve.api.errors import InvalidRequestError
from layerserve.api.protocol import DetokenizeRequest, TokenizeRequest, parse_request
from layerserve.api.state import server_state


async def tokenize(request: Request) -> Response:
    state = server_state(request)
    rt = state.ready()
    req = parse_request(TokenizeRequest, await request.body())
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("Give exactly one of 'prompt' or 'messages'.", "prompt")
    if req.prompt is not None:
        add_special = req.add_special_tokens if req.add_special_tokens is not None else True
        ids = await rt.encode(req.prompt, add_special_tokens=add_special)
    else:
        messages = template_messages(req.messages, state.config)
        text = rt.template.render(messages, add_generation_prompt=req.add_generation_prompt)
        ids = await rt.encode(text, add_special_tokens=bool(req.add_special_tokens))
    strs = [rt.token_text(i)[0] for i in ids] if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": rt.engine.max_model_len, "tokens": ids,
                         "token_strs": strs})


async def detokenize(request: Request) -> Response:
    rt = server_state(request).ready()
    req = parse_request(DetokenizeRequest, await request.body())
    vocab = rt.tokenizer.vocab_size
    bad = [i for i in req.tokens if i >= vocab]
    if bad:
        raise InvalidRequestError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).", "tokens")
    return JSONResponse({"prompt": rt.tokenizer.decode(req.tokens, skip_special_tokens=False)})
