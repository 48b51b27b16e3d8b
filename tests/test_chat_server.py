"""The chat server end to end with the official openai client: completions, chat, streaming, bad requests (4xx,
and the server keeps serving), two clients at once, the API key, the web page, and a clean stop on SIGINT."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

from distributed import free_port, run_distributed
from inference_helpers import sentencepiece_tokenizer, small_model, write_checkpoint
from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.inference.generator import Generator, encode_prompt
from megatron_llama.inference.loading import ModelSource, load_for_inference
from megatron_llama.inference.openai_api import build_app
from megatron_llama.inference.request_guards import ServerPolicy
from megatron_llama.inference.sampling import SamplingParams
from megatron_llama.inference.serving import Job, ServingEngine
from megatron_llama.parallel import state

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hello there"}]


class RunningServer:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return write_checkpoint(root / "run1", small_model(), sentencepiece_tokenizer(root / "tokenizer"))


def serve(checkpoint, policy=ServerPolicy()):
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    engine = ServingEngine(Generator(model, tokenizer))
    engine.start()
    server = RunningServer(build_app(engine, tokenizer, get_chat_template("openllama"), "run1", policy))
    return server, engine


@pytest.fixture(scope="module")
def server(checkpoint):
    server, engine = serve(checkpoint)
    yield server
    server.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    return Generator(model, tokenizer), tokenizer


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_completions_are_the_generators_greedy_completions(server, reference):
    generator, tokenizer = reference
    answer = client(server).completions.create(model="run1", prompt=["The quick brown", "床前"], max_tokens=12,
                                               temperature=0)
    expected = generator.generate([encode_prompt(tokenizer, "The quick brown"), encode_prompt(tokenizer, "床前")], 12)
    assert [choice.text for choice in answer.choices] == [c.text for c in expected]
    assert answer.usage.completion_tokens == sum(len(c.tokens) for c in expected)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_chat_and_its_stream_give_the_template_prompts_completion(server, reference):
    generator, tokenizer = reference
    [expected] = generator.generate([get_chat_template("openllama").encode(MESSAGES, tokenizer)], 10)
    answer = client(server).chat.completions.create(model="run1", messages=MESSAGES, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected.text and answer.choices[0].message.role == "assistant"
    stream = client(server).chat.completions.create(model="run1", messages=MESSAGES, max_tokens=10, temperature=0,
                                                    stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_streamed_completion_equals_the_whole_one_and_sampling_follows_the_seed(server):
    openai_client = client(server)
    whole = openai_client.completions.create(model="run1", prompt="The", max_tokens=12, temperature=1.0, seed=5)
    stream = openai_client.completions.create(model="run1", prompt="The", max_tokens=12, temperature=1.0, seed=5,
                                              stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text


@pytest.mark.parametrize("request_body, status, message", [
    ({"model": "run1", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "run1", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "run1", "prompt": 5}, 400, "prompt"),
    ({"model": "run1", "prompt": "hi", "max_tokens": 1000}, 400, "exceeds the context of 128 tokens"),
    ({"model": "run1", "prompt": "hello " * 200, "max_tokens": 1}, 400, "exceeds the context"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "run1", "prompt": "hi", "temperature": -1}, 400, "temperature"),
])
def test_bad_requests_get_a_4xx_error_and_the_server_keeps_serving(server, request_body, status, message):
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(request_body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == status
    assert message in json.loads(error.value.read())["error"]["message"]
    assert client(server).completions.create(model="run1", prompt="ok", max_tokens=2).choices[0].text is not None


def test_broken_json_and_a_bad_message_role_are_400(server):
    for body, path in ((b"{not json", "/v1/completions"),
                       (json.dumps({"model": "run1", "messages": [{"role": "robot", "content": "hi"}]}).encode(),
                        "/v1/chat/completions")):
        request = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == 400
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="other", messages=MESSAGES)


def test_two_clients_at_once_each_get_their_own_completion(server, reference):
    generator, tokenizer = reference
    prompts = ["The quick brown fox", "A journey of"]
    expected = [generator.generate([encode_prompt(tokenizer, text)], 16)[0].text for text in prompts]
    answers = [None, None]

    def ask(index):
        answers[index] = client(server).completions.create(model="run1", prompt=prompts[index], max_tokens=16,
                                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == expected


def test_models_health_and_the_offline_chat_page(server):
    assert [model.id for model in client(server).models.list()] == ["run1"]
    assert json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read()) == {"status": "ok"}
    page = urllib.request.urlopen(server.url + "/", timeout=10).read().decode()
    assert "/v1/chat/completions" in page and "AbortController" in page and 'id="temperature"' in page
    assert "http://" not in page and "https://" not in page  # no external assets: works offline


def test_api_key_is_required_when_set(checkpoint):
    server, engine = serve(checkpoint, ServerPolicy(api_key="secret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert client(server, "secret").completions.create(model="run1", prompt="The", max_tokens=2).choices
    finally:
        server.stop()
        engine.shutdown()


def test_chat_server_tool_binds_to_localhost_and_stops_cleanly_on_sigint(checkpoint):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "chat_server.py"), "--load", checkpoint,
                                "--port", str(port)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x").completions.create(
            model="run1", prompt="The", max_tokens=3)
        assert answer.choices[0].text is not None
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output


def serve_at_tp2(checkpoint):
    """Rank 0 submits two jobs (one cancelled after its first step) and shuts down; rank 1 follows."""
    with state.parallel_layout(2):
        model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
        engine = ServingEngine(Generator(model, tokenizer))
        if not engine.is_leader:
            engine.follow()
            return None
        engine.start()
        results = []
        for cancel in (True, False):
            done, cancelled, events = threading.Event(), threading.Event(), []

            def on_event(event, events=events, done=done, cancelled=cancelled, cancel=cancel):
                events.append(event)
                if cancel:
                    cancelled.set()
                if hasattr(event, "completions"):
                    done.set()

            engine.submit(Job([encode_prompt(tokenizer, "The quick")], 12, SamplingParams()), on_event, cancelled)
            done.wait(60)
            results.append(events[-1].completions[0])
        engine.shutdown()
        return [(c.tokens, c.finish_reason) for c in results]


def test_tp2_server_engine_runs_the_leaders_jobs_on_both_ranks_and_cancels_them(checkpoint):
    leader, follower = run_distributed(serve_at_tp2, 2, args=(checkpoint,))
    assert follower is None
    (cancelled_tokens, cancelled_reason), (tokens, reason) = leader
    # the cancel, set while the first step's deltas are handled, ends the job at the next step
    assert cancelled_reason == "cancelled" and len(cancelled_tokens) == 2 and tokens[:2] == cancelled_tokens
    assert len(tokens) == 12 or reason == "stop"
