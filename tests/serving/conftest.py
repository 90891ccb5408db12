"""A real server for the serving tests: a LoRA checkpoint made by a 2-step fine-tune of stories260K on the bundled
Alpaca data, served by `run_mindformer.py --run_mode serve` (uvicorn) on a free port of 127.0.0.1 with an API key."""
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.paths import ROOT

CONFIG = os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml")
API_KEY = "sk-test-serving"


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_run"))
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config", CONFIG, "--run_mode", "finetune",
                        "--output_dir", out, "--do_eval", "False", "--eval_dataset_dir", "",
                        "--options", "runner_config.max_steps=2", "context.mode=1",
                        "callbacks=[{type: CheckpointMonitor, prefix: lora, save_checkpoint_steps: 2}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(lora_run):
    """(base url, model id, checkpoint dir) of a running server; stopped at the end of the session."""
    port = free_port()
    ckpt = os.path.join(lora_run, "checkpoint")
    log = open(os.path.join(lora_run, "serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "run_mindformer.py", "--config", CONFIG, "--run_mode", "serve",
                             "--load_checkpoint", ckpt, "--port", str(port), "--api_key", API_KEY],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                if httpx.get(url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up: " + open(log.name).read()[-3000:]
            time.sleep(0.5)
        yield url, os.path.basename(lora_run), ckpt
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
