"""Sans-IO handlers of Ollama's compatibility APIs: OpenAI (`/v1/chat/completions`,
`/v1/completions`, `/v1/embeddings`, `/v1/models`, `/v1/responses`) and Anthropic
(`/v1/messages`)."""

from __future__ import annotations

import re
from typing import Any, Final

import attrs

from nzgw.testing._emu_config import parse_model_name
from nzgw.testing._emu_handling import (
    Body,
    ChatInput,
    Context,
    ErrorFn,
    Request,
    bind,
    bind_openai,
    chat_model_checks,
    embed_core,
    generate_model,
    listed_models,
    load_generation,
    new_generation,
    openai_middleware_error,
    schedule,
)
from nzgw.testing._emu_render import (
    ResponsesEcho,
    anthropic,
    count_prompt_tokens,
    float32_base64,
    float32_json,
    openai_chat,
    openai_completion,
    responses,
)
from nzgw.testing._emu_wire import (
    PLAIN_JSON,
    STREAM_HEADERS,
    Rejected,
    Reply,
    anthropic_error,
    dumps,
    go_json_type,
    go_quote,
    openai_error,
)

# ------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints.


def _openai_handler_error(status: int, message: str) -> Reply:
    return openai_error(status, message)


_DATA_IMAGE = re.compile(r"data:(image/(jpeg|jpg|png|webp))?;base64,")


def _openai_chat_input(body: Body) -> ChatInput:
    messages = body.array("messages", "[]openai.Message")
    if not messages:
        raise Rejected(openai_middleware_error(400, "[] is too short - 'messages'"))
    texts: list[str] = []
    count = 0
    for message in messages:
        if not isinstance(message, dict):
            raise body.type_error("messages", message, "openai.Message")
        role = message.get("role")
        if role is not None and not isinstance(role, str):
            raise body.type_error("messages.role", role, "string")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            count += 1
        elif isinstance(content, list):
            for part in content:
                texts.append(_openai_content_part(part))
                count += 1
        elif message.get("tool_calls") is not None:
            count += 1
        else:
            kind = "<nil>" if content is None else _go_dynamic_type(content)
            raise Rejected(openai_middleware_error(400, f"invalid message content type: {kind}"))
    return ChatInput(texts, count)


def _go_dynamic_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    return "map[string]interface {}"


def _openai_content_part(part: Any) -> str:
    invalid = Rejected(openai_middleware_error(400, "invalid message format"))
    if not isinstance(part, dict):
        raise invalid
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid
        return text
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise invalid
        if url.startswith(("http://", "https://")):
            raise Rejected(
                openai_middleware_error(
                    400,
                    "image URLs are not currently supported, please use base64 encoded data "
                    "instead",
                )
            )
        if _DATA_IMAGE.match(url) is None:
            raise Rejected(openai_middleware_error(400, "invalid image input"))
        return ""
    if kind == "input_audio":
        return ""
    raise invalid


_EFFORTS: Final = {
    "none": False,
    "minimal": True,
    "low": True,
    "medium": True,
    "high": True,
    "max": True,
    "xhigh": True,
    "ultra": True,
}


def _openai_effort(body: Body) -> bool | None:
    reasoning = body.object("reasoning", "openai.Reasoning")
    effort = reasoning.get("effort") or body.string("reasoning_effort")
    if not effort:
        return None
    if effort not in _EFFORTS:
        raise Rejected(
            openai_middleware_error(
                400,
                f"invalid reasoning value: '{effort}' "
                '(must be "high", "medium", "low", "max", or "none")',
            )
        )
    return _EFFORTS[effort]


def _include_usage(body: Body) -> bool:
    options = body.object("stream_options", "openai.StreamOptions")
    return options.get("include_usage") is True


def chat_completions(request: Request, context: Context) -> Reply:
    body = bind_openai(request.body, "openai.ChatCompletionRequest")
    name = body.string("model")
    stream = body.boolean("stream")
    include_usage = _include_usage(body)
    cap = body.integer("max_tokens")
    tools = body.array("tools", "[]api.Tool")
    chat_input = _openai_chat_input(body)
    think = _openai_effort(body)
    error = _openai_handler_error
    model, think = chat_model_checks(
        context, model_name=name, error=error, tools=bool(tools), think=think
    )
    schedule(context, model, error)
    generation = new_generation(
        context,
        model_echo=name,
        model=model,
        prompt_tokens=chat_input.prompt_tokens,
        think=think,
        cap=cap,
    )
    return openai_chat(generation, stream=stream, include_usage=include_usage)


def completions(request: Request, context: Context) -> Reply:
    body = bind_openai(request.body, "openai.CompletionRequest")
    name = body.string("model")
    prompt = body.string("prompt")
    suffix = body.string("suffix")
    stream = body.boolean("stream")
    include_usage = _include_usage(body)
    cap = body.integer("max_tokens")
    stop = body.raw("stop")
    if isinstance(stop, list):
        for item in stop:
            if not isinstance(item, str):
                raise Rejected(
                    openai_middleware_error(
                        400, f"invalid type for 'stop' field: {_go_dynamic_type(item)}"
                    )
                )
    error = _openai_handler_error
    model = generate_model(context, name, error)
    if "completion" not in model.capabilities:
        raise Rejected(error(400, f"{go_quote(name)} does not support generate"))
    if suffix and "insert" not in model.capabilities:
        raise Rejected(error(400, f"{model.ref.full} does not support insert"))
    schedule(context, model, error)
    if not prompt:
        generation = load_generation(context, name)
    else:
        generation = new_generation(
            context,
            model_echo=name,
            model=model,
            prompt_tokens=count_prompt_tokens([prompt, suffix], 1),
            think=None,
            cap=cap,
        )
    return openai_completion(generation, stream=stream, include_usage=include_usage)


def embeddings_v1(request: Request, context: Context) -> Reply:
    body = bind_openai(request.body, "openai.EmbedRequest")
    name = body.string("model")
    encoding_format = body.string("encoding_format")
    dimensions = body.integer("dimensions") or 0
    if encoding_format and encoding_format.lower() not in ("float", "base64"):
        raise Rejected(
            openai_middleware_error(
                400,
                f"Invalid value for 'encoding_format' = {encoding_format}. "
                "Supported values: ['float', 'base64'].",
            )
        )
    raw_input = body.raw("input")
    if raw_input == "":
        raw_input = [""]
    if raw_input is None or raw_input == []:
        raise Rejected(openai_middleware_error(400, "invalid input"))
    result = embed_core(
        context,
        name=name,
        raw_input=raw_input,
        truncate=None,
        dimensions=dimensions,
        error=_openai_handler_error,
    )
    vectors, tokens = ([], 0) if result is None else result[1:]
    if not vectors:
        empty = {"object": "list", "data": None, "model": name, "usage": _no_usage()}
        return Reply(200, PLAIN_JSON, dumps(empty) + b"\n")
    as_base64 = encoding_format.lower() == "base64"
    data = [
        {
            "object": "embedding",
            "embedding": float32_base64(vector) if as_base64 else float32_json(vector),
            "index": index,
        }
        for index, vector in enumerate(vectors)
    ]
    reply = {
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Reply(200, PLAIN_JSON, dumps(reply) + b"\n")


def _no_usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "total_tokens": 0}


def list_models_v1(request: Request, context: Context) -> Reply:
    data = [
        {
            "id": model.ref.short,
            "object": "model",
            "created": int(model.modified_at.timestamp()),
            "owned_by": model.ref.namespace,
        }
        for model in listed_models(context)
    ]
    return Reply(200, PLAIN_JSON, dumps({"object": "list", "data": data or None}) + b"\n")


def retrieve_model_v1(request: Request, context: Context) -> Reply:
    name = request.path.removeprefix("/v1/models/")
    ref = parse_model_name(name)
    if ref is None:
        raise Rejected(_openai_handler_error(400, "invalid model name"))
    model = context.settings.find_model(name)
    if model is None:
        raise Rejected(_openai_handler_error(404, f"model '{ref.short}' not found"))
    reply = {
        "id": name,
        "object": "model",
        "created": int(model.modified_at.timestamp()),
        "owned_by": ref.namespace,
    }
    return Reply(200, PLAIN_JSON, dumps(reply) + b"\n")


# ------------------------------------------------------------------------------------------------
# /v1/responses.


def _responses_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Rejected(openai_middleware_error(400, f"{where}: content must be a string or array"))
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text = part.get("text")
            texts.append(text if isinstance(text, str) else "")
        elif kind == "input_image":
            continue
        elif kind == "input_file":
            raise Rejected(openai_middleware_error(400, "file inputs are not currently supported"))
        else:
            raise Rejected(
                openai_middleware_error(
                    400, f"{where}: content[{index}]: unknown content type: {kind or ''}"
                )
            )
    return "".join(texts)


_ITEM_PEEK_TYPE: Final = 'struct { Type string "json:\\"type\\""; Role string "json:\\"role\\"" }'


def _responses_input(body: Body) -> ChatInput:
    texts: list[str] = []
    count = 0
    instructions = body.string("instructions")
    if instructions:
        texts.append(instructions)
        count += 1
    value = body.raw("input")
    if isinstance(value, str):
        if value:
            texts.append(value)
            count += 1
        return ChatInput(texts, count)
    if value is None:
        return ChatInput(texts, count)
    if not isinstance(value, list):
        raise Rejected(
            openai_middleware_error(
                400,
                f"input must be a string or array: json: cannot unmarshal {go_json_type(value)} "
                "into Go value of type []json.RawMessage",
            )
        )
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise Rejected(
                openai_middleware_error(
                    400,
                    f"{where}: json: cannot unmarshal {go_json_type(item)} into Go value of type "
                    + _ITEM_PEEK_TYPE,
                )
            )
        kind = item.get("type") or ("message" if item.get("role") else "")
        if kind == "message":
            texts.append(_responses_text(item.get("content"), where))
            count += 1
        elif kind == "function_call":
            texts.append(str(item.get("arguments") or ""))
            count += 1
        elif kind == "function_call_output":
            texts.append(_responses_text(item.get("output"), where))
            count += 1
        elif kind == "reasoning":
            continue
        elif not kind:
            raise Rejected(
                openai_middleware_error(400, f"{where}: input item missing required 'type' field")
            )
        else:
            raise Rejected(
                openai_middleware_error(400, f"{where}: unknown input item type: {go_quote(kind)}")
            )
    return ChatInput(texts, count)


def _responses_think(body: Body) -> bool | None:
    reasoning = body.object("reasoning", "openai.ResponsesReasoning")
    effort = reasoning.get("effort")
    if not effort:
        return None
    if effort == "none":
        return False
    if effort in ("low", "medium", "high", "max"):
        return True
    raise Rejected(
        openai_middleware_error(
            400,
            f"invalid reasoning value: {go_quote(str(effort))} "
            '(must be "high", "medium", "low", "max", or "none")',
        )
    )


def _responses_echo(body: Body) -> ResponsesEcho:
    tools = [
        {
            "type": tool.get("type", ""),
            "name": tool.get("name", ""),
            "description": tool.get("description"),
            "strict": tool.get("strict"),
            "parameters": tool.get("parameters"),
        }
        for tool in body.array("tools", "[]openai.ResponsesTool")
        if isinstance(tool, dict)
    ]
    text = body.object("text", "openai.ResponsesText")
    text_format = text.get("format")
    echoed_format: dict[str, Any] = {"type": "text"}
    if isinstance(text_format, dict):
        echoed_format = {"type": text_format.get("type", "")}
        echoed_format |= {
            key: text_format[key]
            for key in ("name", "schema", "strict")
            if text_format.get(key) is not None
        }
    reasoning = body.object("reasoning", "openai.ResponsesReasoning")
    echoed_reasoning = {
        key: reasoning[key] for key in ("effort", "summary") if reasoning.get(key)
    } or None
    temperature = body.number("temperature")
    top_p = body.number("top_p")
    truncation = body.raw("truncation")
    return ResponsesEcho(
        instructions=body.string("instructions") or None,
        tools=tools,
        text_format=echoed_format,
        reasoning=echoed_reasoning,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_output_tokens=body.integer("max_output_tokens"),
        truncation=truncation if isinstance(truncation, str) else "disabled",
        background=body.boolean("background"),
    )


def create_response(request: Request, context: Context) -> Reply:
    body = bind_openai(request.body, "openai.ResponsesRequest")
    name = body.string("model")
    stream = body.optional_bool("stream") is True
    chat_input = _responses_input(body)
    think = _responses_think(body)
    echo = _responses_echo(body)
    headers = STREAM_HEADERS if stream else ()

    def error(status: int, message: str) -> Reply:
        return attrs.evolve(openai_error(status, message), headers=headers)

    model, think = chat_model_checks(
        context, model_name=name, error=error, tools=bool(echo.tools), think=think
    )
    schedule(context, model, error)
    if not chat_input.messages:
        generation = load_generation(context, name)
    else:
        generation = new_generation(
            context,
            model_echo=name,
            model=model,
            prompt_tokens=chat_input.prompt_tokens,
            think=think,
            cap=echo.max_output_tokens,
        )
    return responses(generation, echo, stream=stream)


# ------------------------------------------------------------------------------------------------
# /v1/messages (Anthropic).


def _anthropic_block_length(block: Any) -> int:
    if not isinstance(block, dict):
        return 0
    length = 0
    for field in ("text", "thinking"):
        value = block.get(field)
        if isinstance(value, str):
            length += len(value.encode())
    if block.get("type") in ("tool_use", "tool_result"):
        length += len(dumps(block))
    return length


def _anthropic_content_length(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):
        return sum(_anthropic_block_length(block) for block in content)
    return len(dumps(content))


def _anthropic_text(content: Any, error: ErrorFn) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image":
            source = block.get("source")
            if not isinstance(source, dict):
                raise Rejected(error(400, "invalid image source"))
            if source.get("type") != "base64":
                raise Rejected(
                    error(
                        400,
                        f"invalid image source type: {source.get('type', '')}. "
                        "Only base64 images are supported.",
                    )
                )
        elif kind == "tool_use":
            if not block.get("id"):
                raise Rejected(error(400, "tool_use block missing required 'id' field"))
            if not block.get("name"):
                raise Rejected(error(400, "tool_use block missing required 'name' field"))
        elif kind == "tool_result":
            texts.append(_anthropic_text(block.get("content") or "", error))
    return "".join(texts)


def create_message(request: Request, context: Context) -> Reply:
    def middleware_error(status: int, message: str) -> Reply:
        return anthropic_error(status, message, from_middleware=True)

    body = bind(request.body, "anthropic.MessagesRequest", middleware_error, on_empty="EOF")
    name = body.string("model")
    max_tokens = body.integer("max_tokens") or 0
    messages = body.array("messages", "[]anthropic.MessageParam")
    stream = body.boolean("stream")
    tools = body.array("tools", "[]anthropic.Tool")
    if not name:
        raise Rejected(middleware_error(400, "model is required"))
    if max_tokens <= 0:
        raise Rejected(middleware_error(400, "max_tokens is required and must be positive"))
    if not messages:
        raise Rejected(middleware_error(400, "messages is required"))

    system = body.raw("system")
    texts = [_anthropic_text(system, middleware_error)] if system else []
    estimate = _anthropic_content_length(system)
    for message in messages:
        if not isinstance(message, dict):
            raise body.type_error("messages", message, "anthropic.MessageParam")
        role = message.get("role")
        estimate += len(role.encode()) if isinstance(role, str) else 0
        estimate += _anthropic_content_length(message.get("content"))
        texts.append(_anthropic_text(message.get("content"), middleware_error))
    for tool in tools:
        if isinstance(tool, dict):
            estimate += len(str(tool.get("name", "")).encode())
            estimate += len(str(tool.get("description", "")).encode())
            if tool.get("input_schema") is not None:
                estimate += len(dumps(tool["input_schema"]))
    estimate = max(estimate // 4, 1)

    thinking = body.object("thinking", "anthropic.ThinkingConfig").get("type")
    effort = body.object("output_config", "anthropic.OutputConfig").get("effort")
    think: bool | None = {"enabled": True, "disabled": False}.get(str(thinking))
    if think is None and str(effort).lower() in ("high", "medium", "low", "max", "xhigh"):
        think = True

    headers = STREAM_HEADERS if stream else ()

    def error(status: int, message: str) -> Reply:
        return anthropic_error(status, message, headers=headers)

    model, think = chat_model_checks(
        context, model_name=name, error=error, tools=bool(tools), think=think, relax_thinking=True
    )
    schedule(context, model, error)
    generation = new_generation(
        context,
        model_echo=name,
        model=model,
        prompt_tokens=count_prompt_tokens(texts, len(texts)),
        think=think,
        cap=max_tokens,
    )
    return anthropic(generation, stream=stream, estimated_input_tokens=estimate)
