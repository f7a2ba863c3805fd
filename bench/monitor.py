"""What monitoring costs the inference server, and how fast feedback goes in.

Two servers over the same registry run side by side, pinned to the same CPU
(``BENCH_SERVER_CPU``, default 1; ``wrk`` on ``BENCH_CLIENT_CPU``, default 0), as in
``bench/serve.py`` whose model, body and load helpers this reuses: one with
``--no-monitor``, one monitoring with every observation kept and inputs sampled at 1.0
(the ``mlp`` model is registered with a reference sample, so drift is computed too).
``wrk`` loads them in turn — off, on, on, off, … — with the OIP JSON body at concurrency
64; between turns the monitored server is given time to finish writing (its CPU until
then counts) and the disk cache is synced, so no turn pays for the writeback of an
earlier one's data.

The pair of servers is started afresh for each of ``--blocks`` blocks (10) of ``--rounds``
rounds (2 turns each): a server process keeps its speed for its whole life, and two
processes of the very same server differ by a few percent (measured: two ``--no-monitor``
servers started together differed by 0.0% to 5.1% over six pairs of turns, in five such
pairs; the spread of the block means, 2.7%, was larger than that of the turns within a
block), so one pair of processes, however many rounds it runs, measures that pair's luck
as much as monitoring. It prints req/s and server CPU per request of each turn, the ratio
on/off of the median throughputs (target ≥ 95%), the paired ratios (each on turn against
the off turn next to it in time) and, per block, their mean; then the mean of the block
means with its 95% confidence interval (Student's t over the blocks), their median and how
many blocks fell below 95%; how many observations were stored and dropped; and the feedback
ingestion rate: labels for stored predictions sent through
``POST /v2/models/mlp/feedback`` in the batch form. A run takes about 9 minutes.

Usage: python bench/monitor.py [--blocks 10] [--rounds 2] [--duration 8] [--warmup 3]
                               [--conc 64] [--feedback 20000] [--feedback-batch 1000]
Needs 2 CPUs and ``wrk``. Numbers are noisy when other work shares the machine; the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import (
    LUA,
    SERVER_CPU,
    bodies,
    build,
    cpu_seconds,
    free_port,
    get,
    launch,
    sample,
    wrk,
)

MODEL = "mlp"
#: the throughput the monitored server should keep, as a share of the unmonitored one's
TARGET = 0.95


def start(home: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("TORCHOPS_TOKEN", None)
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, "-m", "torchops.serving", MODEL,
        "--home", home, "--port", str(port), "--threads=1", *flags,
    ]  # fmt: skip
    return launch(command, env, port, Path(home) / f"server-{port}.log")


def metric(base: str, name: str) -> float:
    total = 0.0
    for line in get(f"{base}/metrics").decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stored(home: str) -> int:
    from torchops.monitoring import ObservationStore
    from torchops.registry import Registry

    with Registry(home) as registry:
        return ObservationStore(registry.engine).count(MODEL)


def request_ids(home: str, limit: int) -> list[str]:
    from torchops.monitoring import ObservationStore
    from torchops.registry import Registry

    with Registry(home) as registry:
        page = ObservationStore(registry.engine).observations(MODEL, limit=limit, arrays=False)
        return [o.request_id for o in page.observations]


def feedback_rate(base: str, token: str, ids: list[str], batch: int) -> tuple[int, float]:
    rng = np.random.default_rng(0)
    accepted, t0 = 0, time.perf_counter()
    for startat in range(0, len(ids), batch):
        chunk = ids[startat : startat + batch]
        items = [
            {"id": i, "target": int(t)}
            for i, t in zip(chunk, rng.integers(0, 10, len(chunk)), strict=True)
        ]
        request = urllib.request.Request(
            f"{base}/v2/models/{MODEL}/feedback",
            data=json.dumps({"items": items}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            accepted += int(json.loads(response.read())["accepted"])
    return accepted, time.perf_counter() - t0


def interval(values: list[float]) -> str:
    """``mean m% (95% confidence interval lo-hi%), median d%`` of ``values`` (Student's t;
    the median, because one slow server process can pull the mean far off: measured, an
    unmonitored process at 12,400 req/s beside monitored ones at 15,500 made its block
    124%)."""
    from scipy import stats

    mean = statistics.mean(values)
    median = f"median {statistics.median(values):.1%}"
    if len(values) < 2:
        return f"mean {mean:.1%}, {median}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return (
        f"mean {mean:.1%} (95% confidence interval {mean - half:.1%}-{mean + half:.1%}), {median}"
    )


#: the ``wrk`` script and the request body (``bench/serve.py``)
Load = tuple[Path, tuple[Path, str, str]]


def turn(
    kind: str, server: subprocess.Popen[bytes], base: str, args: argparse.Namespace, load: Load
) -> tuple[float, float]:
    """One turn of load on ``server``: its req/s and CPU µs per request (printed too)."""
    os.sync()  # every turn starts with no dirty pages left by the one before
    cpu0 = cpu_seconds(server.pid)
    r = wrk(base, MODEL, load[0], load[1], args.conc, args.duration)
    time.sleep(args.settle)  # the monitored server finishes writing: its CPU counts
    cpu_us = (cpu_seconds(server.pid) - cpu0) * 1e6 / max(1, r["requests"])
    rps = r["requests"] / (r["duration_us"] / 1e6)
    print(
        f"    monitoring {kind:3s}: {rps:9,.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  "
        f"p99 {r['p99_us'] / 1000:6.2f} ms  errors {r['errors']}  server cpu "
        f"{cpu_us:6.1f} us/req",
        flush=True,
    )
    return rps, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=10, help="fresh pairs of servers")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per block")
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--conc", type=int, default=64)
    parser.add_argument("--feedback", type=int, default=20_000)
    parser.add_argument("--feedback-batch", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between turns")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("wrk") is None:
        sys.exit("needs 2 CPUs and wrk (apt-get install wrk)")
    home = tempfile.mkdtemp(prefix="torchops-bench-monitor-")
    lua = Path(home) / "post.lua"
    lua.write_text(LUA)
    from torchops.registry import Registry

    with Registry(home) as registry:
        x = torch.from_numpy(sample(MODEL)[None])
        reference = torch.randn(1000, 64, generator=torch.Generator().manual_seed(7))
        version = registry.register(
            MODEL, build(MODEL), x, formats=("torchscript",), task="classification",
            reference=reference,
        )  # fmt: skip
        registry.set_alias(MODEL, "production", version.version)
    load: Load = (lua, bodies(MODEL, Path(home))["json"])
    flags = {"off": ("--no-monitor",), "on": ("--input-sample-rate=1.0",)}
    rows: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    blocks: list[float] = []
    answered = dropped = 0.0
    servers: dict[str, subprocess.Popen[bytes]] = {}
    print(f"load average before: {os.getloadavg()}")
    try:
        for block in range(args.blocks):
            ports = {kind: free_port() for kind in flags}
            servers = {kind: start(home, ports[kind], *flags[kind]) for kind in flags}
            bases = {kind: f"http://127.0.0.1:{port}" for kind, port in ports.items()}
            for kind in flags:
                wrk(bases[kind], MODEL, load[0], load[1], args.conc, args.warmup)
            time.sleep(args.settle)
            print(f"  block {block + 1} (servers {servers['off'].pid}, {servers['on'].pid})")
            ratios = []
            for round_ in range(args.rounds):
                # ABBA order: round t's two turns are next to each other in time
                order = ("off", "on") if (block * args.rounds + round_) % 2 == 0 else ("on", "off")
                got = {kind: turn(kind, servers[kind], bases[kind], args, load) for kind in order}
                for kind, row in got.items():
                    rows[kind].append(row)
                ratios.append(got["on"][0] / got["off"][0])
            blocks.append(statistics.mean(ratios))
            print(f"    block mean on / off: {blocks[-1]:.1%}")
            answered += metric(bases["on"], "torchops_requests_total")
            dropped += metric(bases["on"], "torchops_observations_dropped_total")
            if block < args.blocks - 1:  # the last pair stays up for the feedback
                stop(servers)
        off = statistics.median(r for r, _ in rows["off"])
        on = statistics.median(r for r, _ in rows["on"])
        cpu_off = statistics.median(c for _, c in rows["off"])
        cpu_on = statistics.median(c for _, c in rows["on"])
        paired = [a[0] / b[0] for a, b in zip(rows["on"], rows["off"], strict=True)]
        print(f"\nmonitoring on / off throughput: {on:,.0f} / {off:,.0f} req/s = {on / off:.1%}")
        print(
            f"paired turns (on / the off turn next to it): median {statistics.median(paired):.1%}"
            f", {sum(r < TARGET for r in paired)} of {len(paired)} below {TARGET:.0%}"
        )
        print(
            f"blocks (a fresh pair of servers each): {interval(blocks)}, "
            f"{sum(b < TARGET for b in blocks)} of {len(blocks)} below {TARGET:.0%}"
        )
        print(f"server CPU per request: {cpu_on:.1f} / {cpu_off:.1f} us = {cpu_off / cpu_on:.1%}")
        kept = stored(home)
        print(f"observations stored {kept:,} of {answered:,.0f} answered ({dropped:,.0f} dropped)")
        token = (Path(home) / "token").read_text().strip()
        ids = request_ids(home, args.feedback)
        accepted, seconds = feedback_rate(bases["on"], token, ids, args.feedback_batch)
        print(
            f"feedback: {accepted:,} labels in batches of {args.feedback_batch} in "
            f"{seconds:.2f} s = {accepted / seconds:,.0f} items/s"
        )
        print(f"load average after: {os.getloadavg()}")
    finally:
        stop(servers)
        shutil.rmtree(home, ignore_errors=True)


def stop(servers: dict[str, subprocess.Popen[bytes]]) -> None:
    for server in servers.values():
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
