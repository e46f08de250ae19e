"""An OpenAI-compatible HTTP server for one base or fine-tuned model, on the llama.cpp engine (the
preset's shipped GGUF, a trained adapter as its exported GGUF LoRA), so that any OpenAI client,
evaluation harness (lm-evaluation-harness's ``local-chat-completions``) or promptfoo can call it.

    make serve MODEL=smollm2-135m [ADAPTER=models/smollm2-135m-lora | ADAPTER=none] [PORT=8000]
    python -m utils.openai_server --model smollm2-135m [--adapter ...] [--port 8000]

A preset name serves its fine-tuned adapter when one is under ``models/`` (``ADAPTER=none``: the base).
Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (streamed as server-sent events or not).
Bound to 127.0.0.1 only. Requests run one at a time on the model (llama.cpp holds one conversation in
its cache); concurrent clients queue and each gets its own answer. Bad requests get a 4xx with an
OpenAI-style error body, and the server keeps serving. No safety layer: the dashboard's crisis detector
and output filter are not applied here (it is a research endpoint, not a product).
"""
import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Literal

from . import models, serving
from .limits import REPLY_TOKENS
from .params import QUICK_SUBDIR
from .paths import MODELS_DIR, adapter_folder

DEFAULT_PORT = 8000
HOST = "127.0.0.1"


def find_adapter(model: str, models_dir: Path = MODELS_DIR) -> Path | None:
    """The trained adapter of preset ``model`` under ``models_dir``: its run folder where it holds
    one, else the most recently trained adapter of that model (quick-mode runs aside); None if none."""
    found = [a for a in serving.trained_adapters(models_dir)
             if models.read_run(a).get("model") == model and QUICK_SUBDIR not in a.relative_to(models_dir).parts]
    named = [a for a in found if a.name == adapter_folder(model)]
    if named:
        return named[0]
    return max(found, key=lambda a: (a / "run.json").stat().st_mtime) if found else None


def resolve_served(model: str, adapter: str | None, models_dir: Path = MODELS_DIR) -> serving.Choice:
    """What ``--model``/``--adapter`` serve: ``adapter`` "none" the base; a path that adapter (checked to be
    under ``models_dir``); None the preset's own adapter when there is one, else the base."""
    spec = models.resolve(model)  # an unknown model is refused here, by name
    if spec.get("source") != "gguf":
        gguf = sorted(k for k, v in models.presets().items() if v.get("source") == "gguf")
        raise ValueError(f"--model {model!r}: the server runs on llama.cpp and needs a GGUF preset, one of {gguf}")
    if adapter is not None and adapter.lower() == "none":
        return serving.Choice(model, model, None, "llama.cpp")
    if adapter is None:
        path = find_adapter(model, models_dir)
    else:
        path = serving.check_adapter_path(Path(adapter).resolve(), models_dir)
    return serving.Choice(model, model, str(path) if path else None, "llama.cpp")


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


# No ``from __future__ import annotations`` here: FastAPI reads the request model from the endpoint's
# annotation, and the model classes are local to ``create_app`` (fastapi is imported only when serving).
def create_app(choice: serving.Choice, models_dir: Path = MODELS_DIR, pool: serving.ModelPool | None = None):
    """The FastAPI app serving ``choice`` under the id ``choice.label``. The model loads on first use
    (or at start-up with ``load``), in one pool shared by every request."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    pool = pool or serving.ModelPool(capacity=1, models_dir=models_dir)
    created = int(time.time())
    app = FastAPI(title="lora-compare OpenAI-compatible server")

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str | list[dict]

        @field_validator("content")
        @classmethod
        def text_only(cls, value):
            if isinstance(value, str):
                return value
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in value):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            return "".join(p["text"] for p in value)

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1, le=1024)
        max_completion_tokens: int | None = Field(default=None, ge=1, le=1024)
        temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy, as the evaluation decodes
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        seed: int | None = None
        stream: bool = False

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}",
                      "invalid_request_error", where)

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": choice.label, "object": "model", "created": created,
                                            "owned_by": "lora-compare",
                                            "adapter": choice.adapter, "engine": choice.engine}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if req.model != choice.label:
            return _error(404, f"model {req.model!r} is not served here; this server serves {choice.label!r} "
                               "(GET /v1/models)", "invalid_request_error", "model", "model_not_found")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        if messages[-1]["role"] == "assistant":
            return _error(400, "the last message is the assistant's; expected a user (or system) message to answer",
                          "invalid_request_error", "messages")
        entry = pool.get(choice)
        limit = req.max_completion_tokens or req.max_tokens or REPLY_TOKENS["dashboard"]
        kw = {"max_new_tokens": limit, "do_sample": req.temperature > 0, "temperature": req.temperature,
              "top_p": req.top_p, "seed": req.seed if req.seed is not None else 0}
        stats = serving.StreamStats()
        ident, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def finish() -> str:
            return "length" if stats.new_tokens >= limit else "stop"

        def usage() -> dict:
            return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                    "total_tokens": stats.prompt_tokens + stats.new_tokens}

        if not req.stream:
            text = "".join(serving.stream_reply(entry, messages, stats, **kw)).strip()
            return {"id": ident, "object": "chat.completion", "created": now, "model": choice.label,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish()}], "usage": usage()}

        def events() -> Iterator[str]:
            def chunk(delta: dict, reason: str | None = None, **extra) -> str:
                body = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": choice.label,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
                return f"data: {json.dumps(body)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for piece in serving.stream_reply(entry, messages, stats, **kw):
                if piece:
                    yield chunk({"content": piece})
            yield chunk({}, finish(), usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.openai_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a GGUF preset of configs/models.yaml, e.g. smollm2-135m")
    parser.add_argument("--adapter", default=None,
                        help="a trained adapter folder under models/, or 'none' for the base (default: the preset's "
                             "own adapter when one is trained, else the base)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    parser.add_argument("--models-dir", default=str(MODELS_DIR), help="where trained adapters are")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected a port number from 1 to 65535")
    pool = serving.ModelPool(capacity=1, models_dir=Path(args.models_dir))
    try:
        choice = resolve_served(args.model, args.adapter, Path(args.models_dir))
        what = f"adapter {choice.adapter}" if choice.adapter else "the base model (no adapter)"
        print(f"loading {args.model} with {what} on llama.cpp (a first start exports the adapter to GGUF) ...",
              file=sys.stderr)
        pool.get(choice)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"serving {choice.label!r} at http://{HOST}:{args.port}/v1 (OpenAI-compatible; Ctrl+C stops)",
          file=sys.stderr)
    uvicorn.run(create_app(choice, Path(args.models_dir), pool), host=HOST, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
