"""The chat server cannot be crashed or abused, over real HTTP: every field is checked before it reaches a rank
(400), a request that fails at tp=2 fails alone, the Host header is checked (421), the API key guards every route
but /health and the page, bodies are bounded (413) and tokenized off the event loop, prompts per request are
bounded, a non-streaming client that goes away cancels its work, and each sampling field reaches the sampler."""
import copy
import http.client
import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from inference_helpers import sentencepiece_tokenizer, small_model, write_checkpoint
from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.inference.generator import Generator, encode_prompt
from megatron_llama.inference.loading import ModelSource, load_for_inference
from megatron_llama.inference.openai_api import build_app
from megatron_llama.inference.request_guards import ServerPolicy
from megatron_llama.inference.sampling import SamplingParams
from megatron_llama.inference.serving import ServingEngine
from megatron_llama.parallel import state
from test_chat_server import RunningServer, client, serve

REPO = Path(__file__).resolve().parent.parent
PROMPT = {"model": "run1", "prompt": "The quick", "max_tokens": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    return write_checkpoint(root / "run1", small_model(), sentencepiece_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="module")
def server(checkpoint):
    server, engine = serve(checkpoint)
    yield server
    server.stop()
    engine.shutdown()


def post(url: str, body, path="/v1/completions", headers=None) -> tuple[int, dict]:
    """(status, JSON answer) of a POST; body is a dict (sent as JSON, NaN and Infinity as Python writes them)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(port: int, path: str, headers: dict) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("fields, param", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"top_p": float("nan")}, "top_p"), ({"top_k": 2 ** 40}, "top_k"),
    ({"seed": 2 ** 80}, "seed"), ({"seed": -1}, "seed"), ({"max_tokens": 2 ** 70}, "max_tokens"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"prompt": "a\ud800b"}, "prompt"), ({"prompt": ["ok", "\udfff"]}, "prompt"),
    ({"stop": "\ud800"}, "stop"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"model": "\ud800"}, "model"),
])
def test_every_bad_field_is_a_400_in_openais_shape_and_the_server_keeps_serving(server, fields, param):
    status, answer = post(server.url, {**PROMPT, **fields})
    assert status == 400, answer
    assert answer["error"]["param"].startswith(param) and answer["error"]["type"] == "invalid_request_error"
    status, answer = post(server.url, {"model": "run1", "messages": [{"role": "user", "content": "\ud800"}]},
                          "/v1/chat/completions")
    assert status == 400 and "surrogate" in answer["error"]["message"]
    assert post(server.url, PROMPT)[0] == 200


class FailingGenerator(Generator):
    """Fails inside generation, on every tensor rank alike, for requests of 7 new tokens."""

    def start(self, prompts, max_new_tokens, *args, **kwargs):
        if max_new_tokens == 7:
            raise RuntimeError("this job fails on every rank")
        return super().start(prompts, max_new_tokens, *args, **kwargs)


def serve_http_at_tp2(checkpoint):
    """Rank 0 serves HTTP and sends itself a bad seed, a failing job and a good request; rank 1 follows."""
    with state.parallel_layout(2):
        model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
        engine = ServingEngine(FailingGenerator(model, tokenizer))
        if not engine.is_leader:
            engine.follow()
            return None
        engine.start()
        server = RunningServer(build_app(engine, tokenizer, get_chat_template("openllama"), "run1"))
        try:
            answers = [post(server.url, {**PROMPT, "seed": 2 ** 80, "temperature": 1.0}),
                       post(server.url, {**PROMPT, "max_tokens": 7}),
                       post(server.url, {**PROMPT, "temperature": 0})]
        finally:
            server.stop()
            engine.shutdown()
        return [status for status, _ in answers], answers[-1][1]["choices"][0]["text"]


def test_tp2_a_request_that_fails_fails_alone_and_both_ranks_serve_the_next(checkpoint):
    leader, follower = run_distributed(serve_http_at_tp2, 2, args=(checkpoint,))
    assert follower is None
    statuses, text = leader
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    [expected] = Generator(model, tokenizer).generate([encode_prompt(tokenizer, PROMPT["prompt"])], 4)
    assert statuses == [400, 400, 200] and text == expected.text


def test_the_host_header_is_checked_when_bound_to_loopback(checkpoint):
    server, engine = serve(checkpoint, ServerPolicy(allowed_hosts=("chat.example.org", "::2")))
    try:
        for host in ("localhost:8000", "LOCALHOST", "127.0.0.1:1", "[::1]:9", "chat.example.org:443", "[::2]"):
            assert get(server.port, "/health", {"Host": host}) == 200, host
        for host in ("evil.example", "localhost.evil.example", "127.0.0.2", ""):
            assert get(server.port, "/health", {"Host": host}) == 421, host
            assert get(server.port, "/v1/models", {"Host": host}) == 421, host
    finally:
        server.stop()
        engine.shutdown()
    server, engine = serve(checkpoint, ServerPolicy(bind_host="0.0.0.0", api_key="k"))
    try:
        assert get(server.port, "/health", {"Host": "anything.example"}) == 200
    finally:
        server.stop()
        engine.shutdown()


def test_the_api_key_guards_every_route_but_health_and_the_page_in_any_scheme_case(checkpoint):
    server, engine = serve(checkpoint, ServerPolicy(api_key="secret"))
    try:
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/nowhere"):
            assert get(server.port, path, {}) == 401, path
            assert get(server.port, path, {"Authorization": "Bearer wrong"}) == 401, path
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert get(server.port, "/v1/models", {"Authorization": f"{scheme} secret"}) == 200, scheme
        assert get(server.port, "/docs", {"Authorization": "bearer secret"}) == 200
        assert get(server.port, "/health", {}) == 200 and get(server.port, "/", {}) == 200
    finally:
        server.stop()
        engine.shutdown()


def chat_server_tool():
    spec = importlib.util.spec_from_file_location("chat_server_tool", REPO / "tools" / "chat_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, warns", [(["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key", "k"],
                                                                         False), ([], False)])
def test_binding_beyond_loopback_without_a_key_warns(tmp_path, capsys, flags, warns):
    with pytest.raises(SystemExit):  # the checkpoint does not exist: the tool stops after its warning
        chat_server_tool().main(["--load", str(tmp_path / "absent"), *flags])
    assert ("warning: serving on 0.0.0.0 without --api-key" in capsys.readouterr().err) == warns


class RecordingTokenizer:
    """The server's tokenizer, recording the threads that tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.threads = tokenizer, set()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def tokenize(self, text):
        self.threads.add(threading.get_ident())
        return self.tokenizer.tokenize(text)


def test_bodies_are_bounded_and_tokenized_off_the_event_loop(checkpoint):
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    engine = ServingEngine(Generator(model, tokenizer))
    engine.start()
    recording = RecordingTokenizer(tokenizer)
    policy = ServerPolicy(max_request_bytes=2000, max_prompts_per_request=3)
    server = RunningServer(build_app(engine, recording, get_chat_template("openllama"), "run1", policy))
    try:
        big = json.dumps({**PROMPT, "prompt": "x" * 5000}).encode()
        status, answer = post(server.url, big)
        assert status == 413 and "--max-request-bytes" in answer["error"]["message"]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", body=iter([big[:1500], big[1500:]]),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        assert connection.getresponse().status == 413  # no Content-Length: counted as it arrives
        connection.close()
        status, answer = post(server.url, {**PROMPT, "prompt": ["a", "b", "c", "d"]})
        assert status == 400 and "limit of 3 per request" in answer["error"]["message"]
        assert post(server.url, {**PROMPT, "prompt": ["a", "b", "c"]})[0] == 200
        assert post(server.url, {"model": "run1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    "/v1/chat/completions")[0] == 200
        assert recording.threads and server.thread.ident not in recording.threads
    finally:
        server.stop()
        engine.shutdown()


def test_a_non_streaming_client_that_disconnects_cancels_its_generation(checkpoint):
    server, engine = serve(checkpoint)
    generator = engine.generator
    generator.tokenizer = copy.copy(generator.tokenizer)
    generator.tokenizer.eod = -1  # no early end of document: only a cancel ends the job before 100 tokens
    jobs, third_step, closed = [], threading.Event(), threading.Event()  # jobs: the steps each job ran
    start = generator.start

    def start_counting_steps(prompts, max_new_tokens, sampling, stop, keep_going):
        steps = []
        jobs.append(steps)

        def counted_keep_going():
            steps.append(len(steps) + 1)
            if len(jobs) == 1 and len(steps) == 3:  # hold the job until the client is gone and the server has noticed (or 30 s)
                third_step.set()
                closed.wait(30)
                deadline = time.monotonic() + 30
                while keep_going() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return keep_going()
        return start(prompts, max_new_tokens, sampling, stop, counted_keep_going)

    generator.start = start_counting_steps
    try:
        body = json.dumps({**PROMPT, "prompt": "The", "max_tokens": 100}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert third_step.wait(60)
        closed.set()
        assert post(server.url, PROMPT)[0] == 200  # queued behind the cancelled job: it has ended
        assert len(jobs) == 2 and len(jobs[0]) == 3, f"{len(jobs[0])} steps of 100 after the client left"
    finally:
        closed.set()
        server.stop()
        engine.shutdown()


def test_each_sampling_field_reaches_the_sampler(server, checkpoint):
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    generator = Generator(model, tokenizer)
    prompts = ["The quick brown", "A journey of"]
    ids = [encode_prompt(tokenizer, text) for text in prompts]

    def served(top_k=None, **fields):  # top_k is our extension: the openai client sends it in extra_body
        extra = {} if top_k is None else {"extra_body": {"top_k": top_k}}
        answer = client(server).completions.create(model="run1", prompt=prompts, **{"max_tokens": 16, **fields},
                                                   **extra)
        return [choice.text for choice in answer.choices], answer.usage.completion_tokens

    def expected(max_tokens=16, stop=(), **sampling):
        completions = generator.generate(ids, max_tokens, SamplingParams(**sampling), list(stop))
        return [c.text for c in completions], sum(len(c.tokens) for c in completions)

    greedy = expected(temperature=0.0)
    assert served(temperature=0) == greedy
    for sampling in ({"temperature": 2.0, "seed": 3}, {"temperature": 2.0, "seed": 4},
                     {"temperature": 1.5, "top_k": 5, "seed": 3}, {"temperature": 1.5, "top_p": 0.5, "seed": 3}):
        assert served(**sampling) == expected(**sampling), sampling
    assert served(temperature=2.0, seed=3) != served(temperature=2.0, seed=4)
    assert served(temperature=2.0, seed=3) != served(temperature=0.5, seed=3)
    assert served(temperature=2.0, top_k=5, seed=3) != served(temperature=2.0, seed=3)
    assert served(temperature=2.0, top_p=0.5, seed=3) != served(temperature=2.0, seed=3)
    assert served(temperature=2.0, top_k=1, seed=3) == greedy == served(temperature=2.0, top_p=1e-6, seed=3)
    assert served(max_tokens=5, temperature=0) == expected(5, temperature=0.0)
    assert served(max_tokens=5, temperature=0)[1] < greedy[1]
    stop = greedy[0][0].strip()[2:4]
    assert served(temperature=0, stop=[stop]) == expected(stop=[stop], temperature=0.0)
    assert served(temperature=0, stop=[stop])[0][0] == greedy[0][0][:greedy[0][0].find(stop)]
    long_stop = greedy[0][1].strip()[1:7]  # one string, longer than the 4 stop strings a list may hold
    assert len(long_stop) == 6
    assert served(temperature=0, stop=long_stop) == expected(stop=[long_stop], temperature=0.0)
    assert served(temperature=0, stop=long_stop)[0][1] == greedy[0][1][:greedy[0][1].find(long_stop)]
    assert served(temperature=0, frequency_penalty=0, presence_penalty=0.0) == greedy
