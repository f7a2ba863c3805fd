"""What online learning costs serving: latency without a learner, and with one.

Usage: python bench/learning_serving.py [--seconds 30] [--feedback-every 0.5]

Runs in turn, each a server (``--threads 1``) on a fresh home with the quickstart's digits
MLP in production:

* ``off`` — no learner (the feedback is only stored);
* ``thread`` — ``serve --learn`` with the learner in a thread of the server process
  (``start_embedded(mode="thread")``, the thread at nice 10);
* ``process`` — ``serve --learn`` as shipped: the learner in a child process at nice 10;
* ``process-nice0`` — the same child process at the server's own priority.

For ``--seconds`` a client sends single-image inference requests one after the other
while another thread sends 50 inverted, labelled digits every ``--feedback-every``
seconds: an update every 50 labels, so the learner trains almost all the time. Printed:
throughput and request latency percentiles of each run, their ratios to ``off``, and how
many challengers the learner registered. Nothing is asserted; on a shared machine run it
twice.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from torchops.config import Settings
from torchops.quickstart.data import load_digits_data
from torchops.registry import Registry
from torchops.serving.auth import load_token

Array = np.ndarray[Any, Any]

#: runs the server CLI, with ``start_embedded``'s defaults changed for this run
LAUNCHER = """
import functools, runpy, sys
import torchops.learning.learner as learner
learner.start_embedded = functools.partial(learner.start_embedded, **{options})
sys.argv = ["torchops.serving", *sys.argv[1:]]
runpy.run_module("torchops.serving", run_name="__main__")
"""
MODES = {
    "off": None,
    "thread": {"mode": "thread"},
    "process": {},
    "process-nice0": {"nice": 0},
}


def register(home: Path) -> None:
    from torchops.quickstart.train import fit_digits

    data, model = fit_digits(epochs=15)
    with Registry(home) as registry:
        registry.register(
            "digits",
            model.eval(),
            data.x_test[:16],
            formats=("torchscript",),
            labels=data.labels,
            reference=data.x_train[:400],
        )
        registry.set_alias("digits", "production", 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(home: Path, learn: dict[str, Any] | None) -> tuple[subprocess.Popen[bytes], str]:
    """The server on a free loopback port, once ``/v2/health/ready`` answers."""
    port = free_port()
    args = ["--home", str(home), "--port", str(port), "--threads", "1"]
    if learn is None:
        command = [sys.executable, "-m", "torchops.serving", *args]
    else:
        command = [sys.executable, "-c", LAUNCHER.format(options=learn), *args, "--learn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHOPS_TOKEN", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server was not ready in 180 s")


def body(x: Array) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": x.ravel().tolist()}]}


def run(mode: str, seconds: float, feedback_every: float) -> dict[str, float]:
    data = load_digits_data(seed=0)
    inverted = (1.0 - data.x_train).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        register(home)
        process, base = start(home, MODES[mode])
        token, _ = load_token(Settings.load(home=home))
        headers = {"Authorization": f"Bearer {token}"}
        stop = threading.Event()
        labels_sent = [0]

        def feedback() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                i = 0
                while not stop.wait(feedback_every):
                    rows = np.arange(i, i + 50) % len(inverted)
                    answer = client.post("/v2/models/digits/infer", json=body(inverted[rows]))
                    target = [int(v) for v in data.y_train[rows]]
                    given = {"id": answer.json()["id"], "target": target}
                    client.post("/v2/models/digits/feedback", json=given)
                    i += 50
                    labels_sent[0] += 50

        latencies: list[float] = []
        labeller = threading.Thread(target=feedback, daemon=True)
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                for k in range(50):  # warm up
                    client.post("/v2/models/digits/infer", json=body(data.x_test[k : k + 1]))
                labeller.start()
                end = time.perf_counter() + seconds
                k = 0
                while time.perf_counter() < end:
                    row = k % len(data.x_test)
                    started = time.perf_counter()
                    response = client.post(
                        "/v2/models/digits/infer", json=body(data.x_test[row : row + 1])
                    )
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
                    k += 1
        finally:
            stop.set()
            if labeller.is_alive():
                labeller.join()
            process.terminate()
            process.wait(60)
        with Registry(home) as registry:
            online = [v for v in registry.versions("digits") if v.source == "online-learning"]
    q = np.quantile(np.asarray(latencies), [0.5, 0.9, 0.99])
    return {
        "per_s": len(latencies) / seconds,
        "p50_ms": 1000 * q[0],
        "p90_ms": 1000 * q[1],
        "p99_ms": 1000 * q[2],
        "max_ms": 1000 * max(latencies),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "labels": float(labels_sent[0]),
        "challengers": float(len(online)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--feedback-every", type=float, default=0.5)
    args = parser.parse_args()
    results = {mode: run(mode, args.seconds, args.feedback_every) for mode in MODES}
    keys = ["per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"]
    print(f"{'':<14}" + "".join(f"{k:>9}" for k in keys) + f"{'labels':>8}{'updates':>8}")
    for name, r in results.items():
        cells = "".join(f"{r[k]:>9.2f}" for k in keys)
        print(f"{name:<14}{cells}{r['labels']:>8.0f}{r['challengers']:>8.0f}")
    base = results["off"]
    for mode in list(MODES)[1:]:
        r = results[mode]
        print(f"{mode:>13} / off: " + ", ".join(f"{k} {r[k] / base[k]:.2f}" for k in keys))


if __name__ == "__main__":
    main()
