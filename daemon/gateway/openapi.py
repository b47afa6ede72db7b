"""The gateway's OpenAPI document: the contract a client or a schema-driven tester
(schemathesis) holds it to. Written out, not generated: bodies are parsed by hand
(openai_body's rules), so FastAPI sees no models. Each operation declares its request
body, its responses' schemas and every status it answers; a unit test holds the
document to the app's routes, and a schemathesis run holds the server to the document.

The bounds are protocol.py's and openai_body.py's own, so the two cannot drift apart.
What a schema cannot say (min_tokens above max_tokens, a prompt longer than the
model's context, a stop string with stream and n > 1) is a 400 the operation declares.
"""

from __future__ import annotations

from typing import Any

from exgen.client import openai_body as O
from exgen.client import protocol as P
from exgen.daemon.gateway.completions import MAX_PROMPTS

JSON = "application/json"
Schema = dict[str, Any]

# --- pieces --------------------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def integer(low: int, high: int) -> Schema:
    return nullable({"type": "integer", "minimum": low, "maximum": high})


def number(low: float, high: float, *, exclusive_low: bool = False) -> Schema:
    bound = {"exclusiveMinimum": low} if exclusive_low else {"minimum": low}
    return nullable({"type": "number", **bound, "maximum": high})


BOOL = nullable({"type": "boolean"})
ANY: Schema = {}
STOP_STRING: Schema = {"type": "string", "minLength": 1, "maxLength": P.MAX_STOP_CHARS}

# Fields that change nothing (accepted, ignored), and fields only their neutral values
# of which are accepted (openai_body.OPENAI_NEUTRAL).
IGNORED: Schema = dict.fromkeys(sorted(O.OPENAI_IGNORED - {"stream_options"}), ANY)
NEUTRAL: Schema = {
    "best_of": {"enum": [1, None]},
    "logit_bias": {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]},
    "suffix": {"enum": ["", None]},
    "tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]},
    "tool_choice": {"enum": ["none", None]},
    "functions": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]},
    "function_call": {"enum": ["none", None]},
}


def sampling_fields() -> Schema:
    """The body fields both endpoints map to sampling params, as openai_body maps them."""
    tokens = integer(0, P.MAX_NEW_TOKENS)  # 0: the prompt's logprobs, no text
    return {
        "model": nullable({"type": "string", "minLength": 1, "maxLength": P.MAX_MODEL_CHARS}),
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "temperature": number(0, 100),
        "top_p": number(0, 1, exclusive_low=True),
        "top_k": integer(0, 1_000_000),
        "min_p": number(0, 1),
        "repetition_penalty": number(0.01, 100),
        "seed": integer(0, P.MAX_SEED),
        "stop": {
            "anyOf": [
                STOP_STRING,
                {"type": "array", "items": STOP_STRING, "maxItems": P.MAX_STOP_STRINGS},
                {"type": "null"},
            ]
        },
        "n": integer(1, P.MAX_N),
        "presence_penalty": number(-2, 2),
        "frequency_penalty": number(-2, 2),
        "response_format": nullable(ref("ResponseFormat")),
        "ignore_eos": BOOL,
        "min_tokens": integer(0, P.MAX_NEW_TOKENS),
        "skip_special_tokens": BOOL,
        "include_stop_str_in_output": BOOL,
        "prompt_logprobs": integer(0, P.MAX_TOP_LOGPROBS),
        "stream": BOOL,
        "stream_options": nullable(ref("StreamOptions")),
        **IGNORED,
        **NEUTRAL,
    }


def request_schemas() -> dict[str, Schema]:
    content_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": sorted(P.CHAT_ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": content_part}]},
        },
    }
    text = {"type": "string", "maxLength": P.MAX_PROMPT_CHARS}
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": P.MAX_TOKEN_ID},
        "minItems": 1,
        "maxItems": P.MAX_PROMPT_IDS,
    }
    prompt = {"anyOf": [text, ids]}
    return {
        "CompletionRequest": {
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            "properties": {
                "prompt": {
                    "anyOf": [
                        text,
                        ids,
                        {"type": "array", "items": prompt, "minItems": 1, "maxItems": MAX_PROMPTS},
                    ]
                },
                "logprobs": nullable(
                    {"type": "integer", "minimum": 0, "maximum": O.COMPLETIONS_MAX_LOGPROBS}
                ),
                "echo": BOOL,
                "add_special_tokens": BOOL,
                **sampling_fields(),
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["messages"],
            "additionalProperties": False,
            "properties": {
                "messages": {
                    "type": "array",
                    "items": message,
                    "minItems": 1,
                    "maxItems": P.MAX_MESSAGES,
                },
                "logprobs": BOOL,
                "top_logprobs": integer(0, P.MAX_TOP_LOGPROBS),
                "echo": {"enum": [False, None]},
                "add_special_tokens": {"enum": [False, None]},
                **sampling_fields(),
            },
        },
        "ResponseFormat": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {"type": {"enum": ["text", "json_object"]}},
                },
                {
                    "type": "object",
                    "required": ["type", "json_schema"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "json_schema"},
                        "json_schema": {
                            "type": "object",
                            "required": ["schema"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "description": {"type": "string"},
                                "strict": BOOL,
                                "schema": {"type": "object"},
                            },
                        },
                    },
                },
            ]
        },
        "StreamOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "include_usage": BOOL,
                "continuous_usage_stats": BOOL,
                "include_obfuscation": BOOL,
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["input_file_id", "endpoint", "completion_window"],
            "properties": {
                "input_file_id": {"type": "string"},
                "endpoint": {"enum": list(O.OPENAI_URLS)},
                "completion_window": {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smh]$"},
                "metadata": nullable(
                    {
                        "type": "object",
                        "maxProperties": 16,
                        "propertyNames": {"maxLength": 64},
                        "additionalProperties": {"type": "string", "maxLength": 512},
                    }
                ),
            },
        },
        "TokenizeRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "model": ANY,
                "prompt": {"anyOf": [text, ids]},
                "messages": {
                    "type": "array",
                    "items": message,
                    "minItems": 1,
                    "maxItems": P.MAX_MESSAGES,
                },
                "add_special_tokens": BOOL,
                "add_generation_prompt": {"enum": [True, None]},
                "return_token_strs": {"enum": [False, None]},
            },
            "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        },
        "DetokenizeRequest": {
            "type": "object",
            "required": ["tokens"],
            "additionalProperties": False,
            "properties": {"model": ANY, "tokens": ids},
        },
        "FileUpload": {
            "type": "object",
            "required": ["purpose", "file"],
            "properties": {
                "purpose": {"const": "batch"},
                "file": {"type": "string", "format": "binary"},
            },
        },
    }


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


STRING, INT = {"type": "string"}, {"type": "integer"}
NULL_STRING, NULL_INT = nullable(STRING), nullable(INT)


def response_schemas() -> dict[str, Schema]:
    usage = obj(
        {"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT},
        {"prompt_tokens_details": obj({"cached_tokens": INT})},
    )
    chat_choice = obj(
        {
            "index": INT,
            "message": obj({"role": {"const": "assistant"}, "content": NULL_STRING}),
            "logprobs": nullable({"type": "object"}),
            "finish_reason": NULL_STRING,
        }
    )
    text_choice = obj(
        {
            "index": INT,
            "text": STRING,
            "logprobs": nullable({"type": "object"}),
            "finish_reason": NULL_STRING,
        }
    )

    def completion(kind: str, choice: Schema) -> Schema:
        return obj(
            {
                "id": STRING,
                "object": {"const": kind},
                "created": INT,
                "model": STRING,
                "choices": {"type": "array", "items": choice},
                "usage": usage,
            }
        )

    file = obj(
        {
            "id": STRING,
            "object": {"const": "file"},
            "bytes": INT,
            "created_at": INT,
            "filename": STRING,
            "purpose": STRING,
            "status": STRING,
        },
        {"expires_at": NULL_INT, "status_details": NULL_STRING},
    )
    times = dict.fromkeys(("created_at", "expires_at", "in_progress_at", "finalizing_at"), NULL_INT)
    times |= dict.fromkeys(
        ("completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at"), NULL_INT
    )
    batch = obj(
        {
            "id": STRING,
            "object": {"const": "batch"},
            "endpoint": STRING,
            "input_file_id": STRING,
            "completion_window": STRING,
            "status": {
                "enum": [
                    "validating",
                    "failed",
                    "in_progress",
                    "finalizing",
                    "completed",
                    "expired",
                    "cancelling",
                    "cancelled",
                ]
            },
            "request_counts": obj({"total": INT, "completed": INT, "failed": INT}),
        },
        {
            "model": NULL_STRING,
            "errors": nullable({"type": "object"}),
            "output_file_id": NULL_STRING,
            "error_file_id": NULL_STRING,
            "metadata": nullable({"type": "object"}),
            "usage": {"type": "object"},
            **times,
        },
    )

    def page(item: str) -> Schema:
        return obj(
            {
                "object": {"const": "list"},
                "data": {"type": "array", "items": ref(item)},
                "has_more": {"type": "boolean"},
            },
            {"first_id": NULL_STRING, "last_id": NULL_STRING},
        )

    model = obj({"id": STRING, "object": {"const": "model"}, "created": INT, "owned_by": STRING})
    error = obj(
        {
            "error": obj(
                {
                    "message": STRING,
                    "type": STRING,
                    "param": NULL_STRING,
                    "code": {"type": "string", "minLength": 1},
                }
            )
        }
    )
    return {
        "Completion": completion("text_completion", text_choice),
        "ChatCompletion": completion("chat.completion", chat_choice),
        "File": file,
        "FileList": page("File"),
        "FileDeleted": obj({"id": STRING, "object": {"const": "file"}, "deleted": {"const": True}}),
        "Batch": batch,
        "BatchList": page("Batch"),
        "Model": model,
        "ModelList": obj(
            {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}
        ),
        "Health": obj({"status": {"const": "ok"}, "model": STRING}),
        "Tokens": obj(
            {
                "count": INT,
                "max_model_len": NULL_INT,
                "tokens": {"type": "array", "items": INT},
                "token_strs": {"type": "null"},
            }
        ),
        "Detokenized": obj({"prompt": STRING}),
        "TokenizerInfo": obj(
            {"tokenizer_class": STRING},
            {"eos_token": NULL_STRING, "chat_template": NULL_STRING, "vocab_size": INT},
        ),
        "Error": error,
    }


# --- operations ----------------------------------------------------------------------

WHY = {
    400: "A bad or unsupported field (error.param names it), or a prompt beyond the context",
    401: "A missing or wrong API key",
    404: "No such object",
    409: "Not in a state that allows it",
    413: "The body or upload is too large",
    429: "Too many requests at once",
    500: "The engine failed the request",
    502: "The daemon speaks another protocol version",
    503: "No worker ready, the daemon draining or not answering",
    504: "The request's deadline passed",
}
# What every generation can answer besides its 200.
GENERATION_ERRORS = (400, 404, 413, 429, 500, 502, 503, 504)


def errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": WHY[s], "content": {JSON: {"schema": ref("Error")}}}
        for s in statuses
    }


def ok(schema: Schema, *, stream: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": schema}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"200": {"description": "OK", "content": content}}


def json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": ref(name)}}}


def path_id(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]


def query(name: str, schema: Schema) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def operations() -> dict[str, dict[str, Any]]:
    return {
        "/health": {
            "get": {
                "summary": "200 once a worker is ready",
                "responses": {**ok(ref("Health")), **errors(503)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/models": {"get": {"responses": ok(ref("ModelList"))}},
        "/v1/models/{model}": {
            "get": {
                "parameters": path_id("model"),
                "responses": {**ok(ref("Model")), **errors(404)},
            }
        },
        "/v1/completions": {
            "post": {
                "requestBody": json_body("CompletionRequest"),
                "responses": {
                    **ok(ref("Completion"), stream=True),
                    **errors(*GENERATION_ERRORS),
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "requestBody": json_body("ChatCompletionRequest"),
                "responses": {
                    **ok(ref("ChatCompletion"), stream=True),
                    **errors(*GENERATION_ERRORS),
                },
            }
        },
        "/tokenize": {
            "post": {
                "requestBody": json_body("TokenizeRequest"),
                "responses": {**ok(ref("Tokens")), **errors(400, 413, 429, 500, 503, 504)},
            }
        },
        "/detokenize": {
            "post": {
                "requestBody": json_body("DetokenizeRequest"),
                "responses": {**ok(ref("Detokenized")), **errors(400, 413, 429, 500, 503, 504)},
            }
        },
        "/tokenizer_info": {"get": {"responses": {**ok(ref("TokenizerInfo")), **errors(404, 503)}}},
        "/v1/files": {
            "get": {
                "parameters": [
                    query("purpose", {"type": "string"}),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}),
                    query("after", {"type": "string"}),
                    query("order", {"enum": ["asc", "desc"]}),
                ],
                "responses": {**ok(ref("FileList")), **errors(400)},
            },
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": ref("FileUpload")}},
                },
                "responses": {**ok(ref("File")), **errors(400, 413)},
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "parameters": path_id("file_id"),
                "responses": {**ok(ref("File")), **errors(404)},
            },
            "delete": {
                "parameters": path_id("file_id"),
                "responses": {**ok(ref("FileDeleted")), **errors(404, 409)},
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "parameters": path_id("file_id"),
                "responses": {
                    "200": {
                        "description": "The file's bytes",
                        "content": {"application/jsonl": {"schema": {"type": "string"}}},
                    },
                    **errors(404),
                },
            }
        },
        "/v1/batches": {
            "get": {
                "parameters": [
                    query("after", {"type": "string"}),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                ],
                "responses": {**ok(ref("BatchList")), **errors(400)},
            },
            "post": {
                "requestBody": json_body("BatchRequest"),
                "responses": {**ok(ref("Batch")), **errors(400, 404, 413)},
            },
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "parameters": path_id("batch_id"),
                "responses": {**ok(ref("Batch")), **errors(404)},
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "parameters": path_id("batch_id"),
                "responses": {**ok(ref("Batch")), **errors(404, 409)},
            }
        },
    }


def document(version: str, guarded: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``guarded``: API keys are required (all but /health)."""
    paths = operations()
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "exgen", "version": version},
        "paths": paths,
        "components": {"schemas": {**request_schemas(), **response_schemas()}},
    }
    if guarded:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path, methods in paths.items():
            for operation in methods.values():
                if path == "/health":
                    operation["security"] = []
                else:
                    operation["responses"].update(errors(401))
    return doc
