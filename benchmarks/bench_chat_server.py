"""Latency of a running chat server (tools/chat_server.py) seen through the official `openai` client.

Against a server started on its own, e.g. `python tools/chat_server.py --hf DIR --cuda-graph --port 8000`, asks in
turn: the model list; a greedy completion of 64 tokens (seconds); a streamed chat reply of up to 200 tokens
(time to the first chunk, chunks per second after it); two chat requests from two threads at once (each one's
seconds: the server queues them); a bad request (max_tokens 0: a 400) and a completion after it.

    python benchmarks/bench_chat_server.py --port 8000
"""
from __future__ import annotations

import argparse
import threading
import time

import openai


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=f"http://{args.host}:{args.port}/v1", api_key=args.api_key)
    [model] = [entry.id for entry in client.models.list().data]
    print("model:", model)

    start = time.perf_counter()
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=64, temperature=0)
    print(f"completion: {time.perf_counter() - start:.2f} s for {reply.usage.completion_tokens} tokens "
          f"({reply.choices[0].finish_reason})")

    start, first, chunks = time.perf_counter(), None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello, who are you?"}],
                                            max_tokens=200, temperature=0.7, seed=1, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            chunks += 1
    total = time.perf_counter() - start
    print(f"streamed chat: first chunk after {1e3 * first:.0f} ms, {chunks} chunks in {total:.2f} s "
          f"({(chunks - 1) / max(total - first, 1e-9):.0f} chunks/s after the first)")

    seconds = {}

    def ask(count: int):
        begin = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Count to {count}"}],
                                       max_tokens=100, temperature=0)
        seconds[count] = round(time.perf_counter() - begin, 2)

    start = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(count,)) for count in (3, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"two clients at once: {seconds} s each, {time.perf_counter() - start:.2f} s in all")

    try:
        client.completions.create(model=model, prompt="x", max_tokens=0)
        print("bad request: accepted (it should not be)")
    except openai.BadRequestError as error:
        print(f"bad request: HTTP {error.status_code}")
    reply = client.completions.create(model=model, prompt="Still serving?", max_tokens=8, temperature=0)
    print(f"after it: {reply.usage.completion_tokens} tokens")


if __name__ == "__main__":
    main()
