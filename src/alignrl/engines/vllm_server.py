"""vLLM in its own process (or on its own GPU) behind HTTP: `alignrl vllm-serve MODEL` runs `serve`, and the trainer
samples through `VLLMServerEngine`, a `RolloutEngine` like `VLLMEngine` (TRL's `trl vllm-serve` with
`vllm_mode="server"`).

Standard library only (`http.server`, `urllib`): one `VLLMEngine` behind a lock, and these endpoints:

- `GET /health`: `{"status": "ok", "model", "max_model_len", "eos": [ids], "pad": id}`
- `POST /generate`: JSON `{"prompts": [[ids]], "max_new_tokens", "temperature", "top_p", "top_k", "seeds"}` ->
  `{"completion_ids": [[ids]], "logprobs": [[floats]]}`, unpadded (the client pads as `VLLMEngine` does)
- `POST /load_weights`: the whole state dict as one safetensors blob (`application/octet-stream`)
- `POST /shutdown`: the server stops and the process exits 0

Bad input is HTTP 400 and `{"error": "one line"}`, which the client raises as `AlignRLError`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from alignrl.engines.vllm_engine import build_rollout
from alignrl.errors import AlignRLError
from alignrl.generation import Rollout, SamplingParams

if TYPE_CHECKING:
    from alignrl.engines.vllm_engine import VLLMEngine

SAMPLING_FIELDS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int}


class BadRequest(Exception):
    """A request the server answers with HTTP 400."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _int_lists(value: Any, name: str) -> list[list[int]]:
    """`value` as a list of token-id lists, or BadRequest."""
    if not isinstance(value, list) or not all(
        isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row) for row in value
    ):
        raise BadRequest(f"generate: {name} must be a list of lists of token ids")
    return value


def _generate_args(body: Any) -> tuple[list[list[int]], SamplingParams, list[int] | None]:
    """The prompts, sampling parameters and seeds of a /generate body, checked."""
    if not isinstance(body, dict):
        raise BadRequest("generate: the body must be a JSON object")
    for name in ("prompts", "max_new_tokens"):
        if name not in body:
            raise BadRequest(f"generate: missing field {name!r}")
    prompts = _int_lists(body["prompts"], "prompts")
    kwargs: dict[str, Any] = {}
    for name, kind in SAMPLING_FIELDS.items():
        if name in body:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise BadRequest(f"generate: {name} must be a number" + (" (an integer)" if kind is int else ""))
            kwargs[name] = kind(value)
    seeds = body.get("seeds")
    if seeds is not None:
        seeds = _int_lists([seeds], "seeds")[0]
        if len(seeds) != len(prompts):
            raise BadRequest(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    return prompts, SamplingParams(**kwargs), seeds


def _load_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob, or BadRequest."""
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on a bad header
        raise BadRequest(f"load_weights: the body is not a safetensors blob ({_first_line(e)})") from None


class _Handler(BaseHTTPRequestHandler):
    """One request: routes to the server's engine, answers JSON."""

    server: _EngineServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a trainer polls and posts every step."""

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, self.server.health)
        else:
            self._answer(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:
        routes: dict[str, Callable[[bytes], dict[str, Any]]] = {
            "/generate": self._generate,
            "/load_weights": self._load_weights,
            "/shutdown": self._shutdown,
        }
        route = routes.get(self.path)
        if route is None:
            self._answer(404, {"error": f"no such endpoint: POST {self.path}"})
            return
        try:
            self._answer(200, route(self._body()))
        except (BadRequest, AlignRLError) as e:
            self._answer(400, {"error": _first_line(e)})
        except self.server.client_errors as e:  # vLLM's own checks: a prompt longer than max_model_len, ...
            self._answer(400, {"error": f"{self.path[1:]}: {_first_line(e)}"})
        except Exception as e:
            traceback.print_exc(file=sys.stderr)  # the server's log; the client gets one line
            self._answer(500, {"error": f"{self.path[1:]}: {type(e).__name__}: {_first_line(e)}"})

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("the request has no Content-Length")
        return self.rfile.read(int(length))

    def _generate(self, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body)
        except ValueError as e:
            raise BadRequest(f"generate: the body is not JSON ({_first_line(e)})") from None
        prompts, params, seeds = _generate_args(request)
        with self.server.lock:
            comps, logps = self.server.engine.sample(prompts, params, seeds)
        return {"completion_ids": comps, "logprobs": logps}

    def _load_weights(self, body: bytes) -> dict[str, Any]:
        weights = _load_state_dict(body)
        with self.server.lock:
            self.server.engine.load_weights(weights.items())
        return {"loaded": len(weights)}

    def _shutdown(self, body: bytes) -> dict[str, Any]:
        threading.Thread(target=self.server.shutdown, daemon=True).start()  # after this answer is sent
        return {"status": "shutting down"}

    def _answer(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _EngineServer(ThreadingHTTPServer):
    """The HTTP server holding the engine, its lock, the /health answer and the exceptions that are bad input."""

    daemon_threads = True

    engine: VLLMEngine
    health: dict[str, Any]

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.client_errors = _vllm_client_errors()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a /health poll that timed out while the model loaded) is not the server's error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _vllm_client_errors() -> tuple[type[Exception], ...]:
    """The exceptions vLLM raises for requests it will not take (its VLLMClientError is no ValueError)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return ValueError, VLLMClientError


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None = None,
    kv_cache_gib: float | None = None,
    dtype: str = "float32",
) -> None:
    """Serve one `VLLMEngine` over `model` (an HF directory or `.gguf` file) on host:port until POST /shutdown."""
    from alignrl.engines.vllm_engine import VLLMEngine
    from alignrl.models import check_model_dir, resolve_model_path

    check_model_dir(model)
    try:  # before the engine: a port in use fails at once (requests wait in the listen backlog until serving)
        server = _EngineServer((host, port))
    except OSError as e:
        raise AlignRLError(f"vllm-serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    with server:
        engine = VLLMEngine(
            resolve_model_path(model), dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib
        )
        length = engine.llm.model_config.max_model_len
        server.engine = engine
        server.health = {"status": "ok", "model": model, "max_model_len": length, "eos": engine.eos, "pad": engine.pad}
        print(f"alignrl: vllm server for {model} on http://{host}:{server.server_address[1]}", file=sys.stderr)
        sys.stderr.flush()
        server.serve_forever()


def _state_dict_blob(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """A safetensors blob of the tensors (on CPU, contiguous; a tensor sharing storage with an earlier one, such as
    a tied embedding, is copied, since safetensors refuses shared tensors)."""
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        tensors[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return save(tensors)


class VLLMServerEngine:
    """Samples through a running `alignrl vllm-serve` server; `generate` returns what `VLLMEngine.generate` does."""

    def __init__(
        self,
        url: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: torch.device | str = "cpu",
        timeout: float = 600,
        connect_timeout: float = 60,
    ) -> None:
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.device = device
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        health = self._wait_for_health(connect_timeout)
        self.model: str = health["model"]
        self.max_model_len: int = health["max_model_len"]
        self.eos: list[int] = list(health["eos"])
        self.pad: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(health["pad"])

    def _wait_for_health(self, connect_timeout: float) -> dict[str, Any]:
        """/health's answer, polled until the server is up (it may still be loading the model)."""
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                with self._opener.open(f"{self.url}/health", timeout=max(0.1, min(5.0, connect_timeout))) as r:
                    return json.loads(r.read())
            except (OSError, ValueError):  # refused, reset, timed out, not yet JSON
                if time.monotonic() >= deadline:
                    raise AlignRLError(
                        f"vllm server at {self.url} did not answer /health within {connect_timeout:g} s; start it "
                        "with `alignrl vllm-serve MODEL`"
                    ) from None
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _post(self, endpoint: str, data: bytes, content_type: str) -> dict[str, Any]:
        """POST to the server; its error answers and lost connections become one-line AlignRLErrors."""
        request = urllib.request.Request(
            f"{self.url}/{endpoint}", data=data, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AlignRLError(f"vllm server: {_error_of(e)}") from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise AlignRLError(f"vllm server at {self.url}: {endpoint} failed ({_first_line(reason)})") from None

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> Rollout:
        body = {
            "prompts": [[int(t) for t in p] for p in prompts],
            **{name: getattr(params, name) for name in SAMPLING_FIELDS},
            "seeds": None if seeds is None else [int(s) for s in seeds],
        }
        out = self._post("generate", json.dumps(body).encode(), "application/json")
        return build_rollout(prompts, out["completion_ids"], out["logprobs"], self.eos, self.pad, self.device)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send all the model's weights (HF checkpoint names, as `VLLMEngine.load_weights` takes them)."""
        self._post("load_weights", _state_dict_blob(named_tensors), "application/octet-stream")

    def generated(self) -> None:
        """The rollout is done (the server manages its own memory)."""

    def close(self, barrier: bool = True) -> None:
        """Nothing to release: the server is the user's and keeps running."""


def _error_of(e: urllib.error.HTTPError) -> str:
    """The one-line error of a server's error answer (its JSON `error`, else the HTTP status)."""
    try:
        return str(json.loads(e.read())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"HTTP {e.code} {e.reason}"
