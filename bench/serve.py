"""Inference server throughput and latency against the in-process limit, one core each.

The server runs pinned to CPU 1 (``taskset -c 1``, ``OMP_NUM_THREADS=1``) and ``wrk`` to
CPU 0, for the ``mlp`` and ``cnn`` models of the shared peer benchmark (rebuilt here with
the same seed) at concurrency 1, 16 and 64, with the same sample as an OIP JSON body and
as binary tensor data. It prints req/s, p50 and p99, the mean batch the server formed
(from ``/metrics``) and the ratio to the in-process limit measured in the same run on the
same core at that batch size: the forward alone, and for JSON bodies the JSON decode +
forward + encode pipeline of the server's own codec.

Usage: python bench/serve.py [--models mlp,cnn] [--conc 1,16,64] [--bodies json,binary]
                             [--duration 10] [--warmup 3] [--http torchops]
Needs 2 CPUs and ``wrk`` (``apt-get install wrk``). Numbers are noisy when other work
shares the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 1234
SAMPLE_SHAPE = {"mlp": (64,), "cnn": (3, 32, 32)}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SERVER_CPU = os.environ.get("BENCH_SERVER_CPU", "1")
CLIENT_CPU = os.environ.get("BENCH_CLIENT_CPU", "0")
ROOT = Path(__file__).resolve().parent.parent

LUA = r"""
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local hl = os.getenv("HEADER_LENGTH")
if hl and hl ~= "" then wrk.headers["Inference-Header-Content-Length"] = hl end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- the two peer models, rebuilt (same architecture, same seed) ---------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.stage1 = Block(32, 32, 1)
        self.stage2 = Block(32, 64, 2)
        self.stage3 = Block(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    model: nn.Module = MLP() if name == "mlp" else SmallResNet()
    if name == "cnn":
        g = torch.Generator().manual_seed(SEED + 1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def sample(name: str) -> np.ndarray:
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(SAMPLE_SHAPE[name], generator=g)
    return np.round(x.numpy().astype(np.float64), 4).astype(np.float32)


def bodies(name: str, out: Path) -> dict[str, tuple[Path, str, str]]:
    """body kind -> (file, content type, Inference-Header-Content-Length or '')."""
    x = sample(name)
    values = [round(float(v), 4) for v in x.reshape(-1)]
    shape = [1, *SAMPLE_SHAPE[name]]
    oip = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": values}]}
    json_file = out / f"{name}.oip.json"
    json_file.write_bytes(json.dumps(oip, separators=(",", ":")).encode())
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    binary_file = out / f"{name}.bin"
    binary_file.write_bytes(header + x.tobytes())
    return {
        "json": (json_file, "application/json", ""),
        "binary": (binary_file, "application/octet-stream", str(len(header))),
    }


# -- in-process limit (run as a pinned subprocess) -----------------------------------------


def _rate(fn: Any, per_call: int, seconds: float, trials: int = 3) -> float:
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        fn()
    rates = []
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while (t := time.perf_counter()) - t0 < seconds:
            fn()
            n += 1
        rates.append(n * per_call / (t - t0))
    return statistics.median(rates)


def inproc(home: str, name: str, seconds: float) -> dict[str, Any]:
    """samples/s of the registry's runtime at each batch size, forward and JSON pipeline."""
    from torchops.registry import Registry
    from torchops.serving.codec import decode_request, encode_response

    torch.set_num_threads(1)
    registry = Registry(home)
    runtime = registry.load(name)
    signature = runtime.signature
    body = (Path(home) / "bodies" / f"{name}.oip.json").read_bytes()
    x = sample(name)[None]
    forward, pipeline = {}, {}
    for b in BATCHES:
        batch = {"x": np.repeat(x, b, axis=0)}
        forward[b] = _rate(lambda batch=batch: runtime.predict_batch(batch), b, seconds)

        def run(b: int = b) -> None:
            requests = [decode_request(body, signature) for _ in range(b)]
            stacked = {"x": np.concatenate([r.inputs["x"] for r in requests])}
            out = runtime.predict_batch(stacked)
            for i, r in enumerate(requests):
                rows = {k: v[i : i + 1] for k, v in out.items()}
                encode_response(
                    model_name=name,
                    model_version="1",
                    request_id="1",
                    outputs=rows,
                    request=r,
                    signature=signature,
                )

        pipeline[b] = _rate(run, b, seconds)
    registry.close()
    return {"forward": forward, "json": pipeline}


def interpolate(table: dict[int, float], batch: float) -> float:
    sizes = sorted(table)
    if batch <= sizes[0]:
        return table[sizes[0]]
    for lo, hi in itertools.pairwise(sizes):
        if batch <= hi:
            return table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)
    return table[sizes[-1]]


# -- server and load ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (robust to others sharing the core)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counters(base: str, name: str) -> tuple[float, float]:
    text = get(f"{base}/metrics").decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("torchops_batch_size_sum{") and f'model="{name}"' in line:
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("torchops_batch_size_count{") and f'model="{name}"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def wrk(
    base: str, name: str, lua: Path, body: tuple[Path, str, str], conc: int, seconds: float
) -> dict[str, Any]:
    env = dict(os.environ, BODY_FILE=str(body[0]), CONTENT_TYPE=body[1], HEADER_LENGTH=body[2])
    command = [
        "taskset",
        "-c",
        CLIENT_CPU,
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        f"{base}/v2/models/{name}/infer",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(li for li in out.splitlines() if li.startswith("BENCH_JSON "))
    result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
    return result


def start_server(home: str, name: str, port: int, http: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [
        "taskset",
        "-c",
        SERVER_CPU,
        sys.executable,
        "-m",
        "torchops.serving",
        name,
        "--home",
        home,
        "--port",
        str(port),
        f"--http={http}",
        "--threads=1",
    ]
    return launch(command, env, port, Path(home) / f"server-{name}-{http}.log")


def launch(
    command: list[str], env: dict[str, str], port: int, log: Path
) -> subprocess.Popen[bytes]:
    """Start a server (stderr to ``log``) and wait until it answers ready on ``port``."""
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            get(f"http://127.0.0.1:{port}/v2/health/ready")
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"server exited; see {log}") from None
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not become ready")


def check_answer(base: str, name: str, body: Path, expected: np.ndarray) -> None:
    request = urllib.request.Request(
        f"{base}/v2/models/{name}/infer",
        data=body.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-4, atol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--conc", default="1,16,64")
    parser.add_argument("--bodies", default="json,binary")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--http", default="torchops")
    parser.add_argument("--inproc-seconds", type=float, default=0.5)
    parser.add_argument("--inproc", nargs=2, metavar=("HOME", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inproc:
        result = inproc(args.inproc[0], args.inproc[1], args.inproc_seconds)
        print(json.dumps(result))
        return
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("wrk") is None:
        sys.exit("needs 2 CPUs and wrk (apt-get install wrk)")
    home = tempfile.mkdtemp(prefix="torchops-bench-serve-")
    (Path(home) / "bodies").mkdir()
    lua = Path(home) / "post.lua"
    lua.write_text(LUA)
    from torchops.registry import Registry

    registry = Registry(home)
    names = args.models.split(",")
    expected = {}
    files = {}
    for name in names:
        model = build(name)
        x = torch.from_numpy(sample(name)[None])
        version = registry.register(name, model, x, formats=("torchscript",))
        registry.set_alias(name, "production", version.version)
        with torch.inference_mode():
            expected[name] = model(x).numpy()
        files[name] = bodies(name, Path(home) / "bodies")
    registry.close()
    rows = []
    for name in names:
        limit_cmd = [
            "taskset",
            "-c",
            SERVER_CPU,
            sys.executable,
            __file__,
            "--inproc",
            home,
            name,
            "--inproc-seconds",
            str(args.inproc_seconds),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        raw = json.loads(
            subprocess.run(limit_cmd, env=env, capture_output=True, text=True, check=True).stdout
        )
        limits = {k: {int(b): r for b, r in t.items()} for k, t in raw.items()}
        print(f"\n{name}: in-process samples/s on CPU {SERVER_CPU} by batch size")
        for kind, table in limits.items():
            print(f"  {kind:8s}" + "".join(f" b{b}={r:,.0f}" for b, r in table.items()))
        for http in args.http.split(","):
            port = free_port()
            server = start_server(home, name, port, http)
            base = f"http://127.0.0.1:{port}"
            try:
                check_answer(base, name, files[name]["json"][0], expected[name])
                for kind in args.bodies.split(","):
                    for conc in (int(c) for c in args.conc.split(",")):
                        wrk(base, name, lua, files[name][kind], conc, args.warmup)
                        before = batch_counters(base, name)
                        cpu0 = cpu_seconds(server.pid)
                        r = wrk(base, name, lua, files[name][kind], conc, args.duration)
                        cpu1 = cpu_seconds(server.pid)
                        after = batch_counters(base, name)
                        batches = after[1] - before[1]
                        mean_batch = (after[0] - before[0]) / batches if batches else 0.0
                        rps = r["requests"] / (r["duration_us"] / 1e6)
                        fwd = interpolate(limits["forward"], mean_batch)
                        row = {
                            "model": name,
                            "http": http,
                            "body": kind,
                            "conc": conc,
                            "req_s": rps,
                            "p50_ms": r["p50_us"] / 1000,
                            "p99_ms": r["p99_us"] / 1000,
                            "errors": r["errors"],
                            "mean_batch": mean_batch,
                            "cpu_us": (cpu1 - cpu0) * 1e6 / max(1, r["requests"]),
                            "cpu_vs_forward": 1e6
                            / fwd
                            / ((cpu1 - cpu0) * 1e6 / max(1, r["requests"])),
                            "vs_forward": rps / fwd,
                            "vs_json": rps / interpolate(limits["json"], mean_batch)
                            if kind == "json"
                            else None,
                        }
                        rows.append(row)
                        print_row(row)
            finally:
                server.terminate()
                server.wait(timeout=60)
    print(
        "\nratios: vs_forward = req/s / in-process forward samples/s at the mean batch; "
        "vs_json = the same for the in-process decode+forward+encode pipeline; cpu = server "
        "CPU time per request (less sensitive to other load on the core) and the share of it "
        "the in-process forward would need"
    )
    shutil.rmtree(home, ignore_errors=True)


def print_row(row: dict[str, Any]) -> None:
    vs_json = f"{row['vs_json']:6.1%}" if row["vs_json"] is not None else "     -"
    print(
        f"  {row['model']:4s} {row['http']:8s} {row['body']:6s} c={row['conc']:<3d} "
        f"{row['req_s']:9,.0f} req/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  err {row['errors']}  batch {row['mean_batch']:5.1f}  "
        f"vs forward {row['vs_forward']:6.1%}  vs json {vs_json}  "
        f"cpu {row['cpu_us']:6.1f} us/req ({row['cpu_vs_forward']:5.1%} of it the forward)",
        flush=True,
    )


if __name__ == "__main__":
    main()
