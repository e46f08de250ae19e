"""The OpenAI-compatible server over real HTTP on 127.0.0.1, called by the official ``openai`` client:
model list, chat, streaming, bad requests (a clear 4xx, and the server keeps serving), and eight
concurrent clients each getting its own answer. SmolLM2-135M's shipped GGUF on llama.cpp."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from utils import openai_server, serving

pytestmark = pytest.mark.slow

PROMPTS = ["Name a fruit.", "Name a colour.", "What is two plus two?", "Say hello in French.",
           "Name a planet.", "Name an animal.", "What day comes after Monday?", "Name a city in Italy."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    models_dir = tmp_path_factory.mktemp("models")  # no adapter trained: the base is served
    choice = openai_server.resolve_served("smollm2-135m", None, models_dir)
    assert choice.adapter is None and choice.engine == "llama.cpp"
    port = _free_port()
    app = openai_server.create_app(choice, models_dir, serving.ModelPool(capacity=1, models_dir=models_dir))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="not-needed", max_retries=0, timeout=300)


def test_models_chat_and_stream(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    reply = client.chat.completions.create(model="smollm2-135m", max_tokens=24,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = reply.choices[0].message.content
    # what the dashboard's own call gives for the same messages: the server passes the chat through as it is
    direct = serving.generate_reply(serving.ModelPool(capacity=1).get(openai_server.resolve_served(
        "smollm2-135m", "none")), [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert reply.choices[0].message.role == "assistant" and text and text == direct[0]
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    assert reply.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m", max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}])]
    assert len([p for p in pieces if p]) > 1  # streamed in pieces
    assert "".join(pieces).strip() == text  # greedy: the same reply either way


def test_bad_requests_are_refused_clearly_and_the_server_keeps_serving(client, server):
    import openai
    import urllib.request

    with pytest.raises(openai.NotFoundError, match="not served here.*smollm2-135m"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smollm2-135m", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smollm2-135m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    request = urllib.request.Request(f"{server}/chat/completions", data=b'{"model": "smollm2-135m", "messages": [',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(err.value.read())
    assert err.value.code == 400 and body["error"]["type"] == "invalid_request_error"
    ok = client.chat.completions.create(model="smollm2-135m", max_tokens=8,
                                        messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content


def test_eight_concurrent_clients_get_their_own_answers(client):
    """Each of eight clients at once gets the reply its own prompt gets alone (greedy decoding), and all
    finish: the requests queue on the one model and none is dropped or mixed up."""
    def ask(prompt):
        start = time.perf_counter()
        reply = client.chat.completions.create(model="smollm2-135m", max_tokens=16,
                                               messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content, time.perf_counter() - start

    alone = [ask(p)[0] for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert [t for t, _ in together] == alone
    assert len(set(alone)) >= 6  # different prompts, different answers: a mix-up would show
    assert max(s for _, s in together) < 300  # queued, not stuck


def test_a_preset_serves_its_own_adapter_and_none_the_base(tmp_path):
    run = tmp_path / "smollm2-135m-lora"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"model": "smollm2-135m"}))
    assert openai_server.find_adapter("smollm2-135m", tmp_path) == run
    assert openai_server.resolve_served("smollm2-135m", None, tmp_path).adapter == str(run)
    assert openai_server.resolve_served("smollm2-135m", "none", tmp_path).adapter is None
    assert openai_server.find_adapter("gemma3-270m", tmp_path) is None
    with pytest.raises(ValueError):
        openai_server.resolve_served("no-such-model", None, tmp_path)
    with pytest.raises(serving.ChoiceError, match="outside"):
        openai_server.resolve_served("smollm2-135m", str(tmp_path.parent), tmp_path)
