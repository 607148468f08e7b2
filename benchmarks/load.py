"""Load test: N concurrent clients for S seconds against `tgi-space serve`, SPACE on and off.

    python -m benchmarks.load --model models/tiny-space-py --clients 200 --seconds 60 --out benchmarks/load.json

Every request is accounted for: answered (200, a complete body or stream), refused with TGI's
error body (429 `overloaded`, 4xx), or lost (connection error, timeout, truncated stream) - the
last must stay at zero. Reports p50/p99 latency, requests/s and tokens/s, and the speculation
figures scraped from /metrics (tokens per step, acceptance by candidate position).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROUTES = ("generate", "generate_stream", "chat")


@dataclass
class LoadResult:
    """Outcome counts, latencies and throughput of one run."""

    clients: int
    seconds: float
    sent: int = 0
    ok: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # "429 overloaded" -> count
    lost: dict[str, int] = field(default_factory=dict)  # exception type -> count
    generated_tokens: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None  # noqa: E731
        out = {k: v for k, v in asdict(self).items() if k != "latencies"}
        out.update(
            answered=self.ok + sum(self.refused.values()),
            p50_latency_s=pct(0.50), p99_latency_s=pct(0.99),
            requests_per_s=round(self.ok / self.seconds, 3), tokens_per_s=round(self.generated_tokens / self.seconds, 3),
        )
        return out


def _prompt(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(4, 90)}" for _ in range(rng.randrange(2, 12)))


async def _one(session: aiohttp.ClientSession, url: str, route: str, prompt: str, max_new_tokens: int) -> tuple[int, int, str]:
    """(status, generated tokens, error type) of one request; raises on a lost request."""
    if route == "chat":
        body = {"model": "tgi", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens, "temperature": 0}
        path = "/v1/chat/completions"
    else:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
        path = "/" + route
    async with session.post(url + path, json=body) as r:
        if r.status != 200:
            return r.status, 0, (await r.json())["error_type"]
        if route == "generate":
            return 200, (await r.json())["details"]["generated_tokens"], ""
        if route == "chat":
            return 200, (await r.json())["usage"]["completion_tokens"], ""
        last = None
        async for line in r.content:
            if line.startswith(b"data:"):
                last = json.loads(line[5:])
        if not last or "error" in last or last.get("generated_text") is None:
            raise RuntimeError(f"stream ended without a final event: {last}")
        return 200, last["details"]["generated_tokens"], ""


async def _client(result: LoadResult, url: str, deadline: float, seed: int, max_new_tokens: int, timeout: float) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while time.monotonic() < deadline:
            route = ROUTES[rng.randrange(len(ROUTES))]
            result.sent += 1
            start = time.monotonic()
            try:
                status, tokens, error_type = await _one(session, url, route, _prompt(rng), max_new_tokens)
            except Exception as err:  # noqa: BLE001 - a lost request, counted by type
                result.lost[type(err).__name__] = result.lost.get(type(err).__name__, 0) + 1
                continue
            if status == 200:
                result.ok += 1
                result.generated_tokens += tokens
                result.latencies.append(time.monotonic() - start)
            else:
                key = f"{status} {error_type}"
                result.refused[key] = result.refused.get(key, 0) + 1
                await asyncio.sleep(0.05)  # back off a little after a refusal, as a polite client would


async def run_load(url: str, clients: int, seconds: float, max_new_tokens: int = 16, timeout: float = 120.0) -> LoadResult:
    """`clients` concurrent loops of requests (TGI and OpenAI routes mixed) for `seconds`."""
    result = LoadResult(clients, seconds)
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(_client(result, url, deadline, i, max_new_tokens, timeout) for i in range(clients)))
    result.seconds = time.monotonic() - start
    return result


def speculation_figures(metrics_text: str) -> dict:
    """Tokens per step and acceptance by candidate position from a /metrics scrape."""
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    steps = values.get("tgi_space_tokens_per_step_count", 0.0)
    by_position = {}
    for name, drafted in values.items():
        if name.startswith("tgi_space_drafted_by_position_total{"):
            pos = name.split('"')[1]
            accepted = values.get(f'tgi_space_accepted_by_position_total{{position="{pos}"}}', 0.0)
            by_position[pos] = round(accepted / drafted, 4) if drafted else None
    return {
        "sequence_steps": steps,
        "mean_tokens_per_step": round(values.get("tgi_space_tokens_per_step_sum", 0.0) / steps, 4) if steps else None,
        "acceptance_by_position": by_position,
        "batch_steps": sum(v for k, v in values.items() if k.startswith("tgi_batch_inference_count")),
    }


def _bench_mode(args, mode: str) -> dict:
    """Start a server in `mode`, load it, scrape its metrics, stop it."""
    import httpx

    from tests.http_server import ServerProcess

    extra = ["--speculate-mode", mode, "--max-concurrent-requests", str(args.max_concurrent_requests)]
    if args.threads:
        extra += ["--num-threads", str(args.threads)]
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    server = ServerProcess(Path(args.model), Path(args.log_dir) / f"load-{mode}.log", *extra)
    try:
        server.wait_healthy()
        result = asyncio.run(run_load(server.url, args.clients, args.seconds, args.max_new_tokens))
        figures = speculation_figures(httpx.get(server.url + "/metrics").text)
    finally:
        server.stop()
    return {"speculate_mode": mode, **result.summary(), **figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder; a server is started per mode")
    parser.add_argument("--url", help="an already running server instead of --model (one run, its own mode)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-concurrent-requests", type=int, default=256)
    parser.add_argument("--modes", default="space,none")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument("--log-dir", default="build")
    parser.add_argument("--out", default="benchmarks/load.json")
    args = parser.parse_args(argv)
    if args.url:
        runs = [{"url": args.url, **asyncio.run(run_load(args.url, args.clients, args.seconds, args.max_new_tokens)).summary()}]
    elif args.model:
        runs = [_bench_mode(args, mode) for mode in args.modes.split(",")]
    else:
        parser.error("give --model or --url")
    report = {"clients": args.clients, "seconds": args.seconds, "max_new_tokens": args.max_new_tokens, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if any(r["lost"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
