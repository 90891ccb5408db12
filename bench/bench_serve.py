"""Serving throughput: 8 concurrent clients against 1 client, same server, same requests.

Starts `run_mindformer.py --run_mode serve` on the bundled stories260K model (alpaca template) on a free port of
127.0.0.1, warms it up, then sends the same chat requests (held-out Alpaca instructions, greedy, max_tokens each)
first one after another from one client, then from 8 client threads at once (the official `openai` client,
non-streaming). Prints generated tokens/s of each and the ratio (target: >= 3x), and checks that the concurrent
answers equal the single-client ones.

    .venv/bin/python bench/bench_serve.py [--requests 16] [--max_tokens 48] [--clients 8] [--url http://...]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(ROOT, "assets", "models", "stories260K")
ALPACA = os.path.join(ROOT, "assets", "data", "alpaca_en_demo.json")
CONFIG = os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml")


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", CONFIG, "--run_mode", "serve",
                             "--load_checkpoint", STORIES, "--chat_template", "alpaca", "--port", str(port),
                             "--options", "model.model_config={pet_config: null}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import httpx
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit("server failed:\n" + proc.stderr.read().decode()[-3000:])
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--url", help="an already running server (default: start one)")
    a = ap.parse_args()
    import openai
    proc, url = (None, a.url) if a.url else start_server()
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        records = json.load(open(ALPACA, encoding="utf-8"))[-a.requests:]
        questions = [r["instruction"] for r in records]

        def ask(c, q):
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                          max_tokens=a.max_tokens, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens

        ask(client, questions[0])                                   # warm-up
        t = time.perf_counter()
        single = [ask(client, q) for q in questions]
        t_single = time.perf_counter() - t

        results = [None] * len(questions)
        todo = list(range(len(questions)))
        lock = threading.Lock()

        # each client thread gets its own client, made before the clock starts (as the single client was)
        clients = [openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
                   for _ in range(a.clients)]

        def worker(c):
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                results[i] = ask(c, questions[i])

        threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_multi = time.perf_counter() - t
        tokens = sum(n for _, n in single)
        assert tokens == sum(n for _, n in results)
        same = [s[0] for s in single] == [r[0] for r in results]
        one, many = tokens / t_single, tokens / t_multi
        print(f"{len(questions)} requests, {tokens} generated tokens (max_tokens {a.max_tokens}, greedy)")
        print(f"1 client : {t_single:7.2f} s  {one:8.1f} tokens/s")
        print(f"{a.clients} clients: {t_multi:7.2f} s  {many:8.1f} tokens/s")
        print(f"ratio {many / one:.2f}x (target >= 3x); concurrent answers equal single-client answers: {same}")
        return 0 if same else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
