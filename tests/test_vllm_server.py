"""`alignrl vllm-serve` and VLLMServerEngine (alignrl.engines.vllm_server): one server subprocess for the module,
on a tiny char-level Llama of head size 32, checked against the native engine like tests/test_vllm.py checks the
in-process engine. vLLM runs in `.venv-vllm` (`make test-vllm`); where it is not installed only the client-side
tests run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from test_vllm import check_load_weights, check_seeded_sampling, needs_vllm, same_rollout

from alignrl.errors import AlignRLError
from alignrl.generation import SamplingParams

MAX_MODEL_LEN = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_one_line_error(tiny_model):
    from alignrl.engines.vllm_server import VLLMServerEngine
    from alignrl.models import load_tokenizer

    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(AlignRLError, match=r"did not answer /health within 1 s; start it with `alignrl vllm-serve"):
        VLLMServerEngine(url, load_tokenizer(tiny_model), connect_timeout=1)
    assert time.monotonic() - start < 5


def test_weight_blob_copies_shared_tensors():
    """Tied weights share storage, which safetensors refuses to save: the blob holds a copy of each."""
    from safetensors.torch import load

    from alignrl.engines.vllm_server import _state_dict_blob

    emb = torch.randn(4, 3)
    tensors = load(_state_dict_blob([("embed", emb), ("head", emb), ("t", emb.t()), ("row", emb[1])]))
    assert set(tensors) == {"embed", "head", "t", "row"}
    for name, want in [("embed", emb), ("head", emb), ("t", emb.t()), ("row", emb[1])]:
        assert torch.equal(tensors[name], want), name


class Server:
    """A `vllm-serve` subprocess on a free port, its client, and the native engine on the same model."""

    def __init__(self, model_dir: Path, log: Path):
        from transformers import AutoModelForCausalLM

        from alignrl.engines.vllm_server import VLLMServerEngine
        from alignrl.models import load_tokenizer
        from alignrl.rollout import NativeEngine

        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        self.model_dir = model_dir
        args = [sys.executable, "-m", "alignrl.cli", "vllm-serve", str(model_dir), "--port", self.url.rsplit(":")[-1],
                "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "0.25"]  # fmt: skip
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f)
        self.tokenizer = tok = load_tokenizer(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.native = NativeEngine(self.model, tok)
        texts = ["hello world", "ab", "the quick brown fox", "12+3=", "zz"]
        self.prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
        self.started = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - self.started < 180:
            try:
                self.client = VLLMServerEngine(self.url, tok, connect_timeout=1)
                self.started = time.monotonic() - self.started
                return
            except AlignRLError:
                pass
        raise AssertionError(f"vllm-serve did not come up (exit {self.proc.poll()}):\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def post(self, endpoint: str, data: bytes) -> tuple[int, dict]:
        """A raw POST: (HTTP status, JSON answer)."""
        request = urllib.request.Request(f"{self.url}/{endpoint}", data=data, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from alignrl.models import init_model

    out = tmp_path_factory.mktemp("served") / "model"
    init_model(out, hidden_size=64, num_layers=2, num_heads=2, max_length=MAX_MODEL_LEN, seed=0)
    s = None
    try:
        s = Server(out, out.parent / "server.log")
        yield s
    finally:
        proc = s.proc if s is not None else None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_vllm
def test_health(server):
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["max_model_len"] == MAX_MODEL_LEN
    assert server.client.eos == health["eos"] == [server.tokenizer.eos_token_id]


@needs_vllm
def test_greedy_matches_native(server):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    same_rollout(server.client.generate(server.prompts, params), server.native.generate(server.prompts, params))


@needs_vllm
def test_seeded_sampling_is_reproducible(server):
    params = SamplingParams(max_new_tokens=24, temperature=0.8)
    r, again = check_seeded_sampling(server.client, server.prompts * 2, params)
    assert torch.equal(r.logprobs, again.logprobs)


@needs_vllm
def test_bad_requests_are_one_line_errors(server):
    for body, error in [
        (b"{not json", "generate: the body is not JSON"),
        (b'{"max_new_tokens": 4}', "generate: missing field 'prompts'"),
        (b'{"prompts": [[1, "a"]], "max_new_tokens": 4}', "generate: prompts must be a list of lists of token ids"),
        (b'{"prompts": [[1]], "max_new_tokens": 4, "seeds": [1, 2]}', "generate: 2 seeds for 1 prompts"),
    ]:
        status, answer = server.post("generate", body)
        assert status == 400 and set(answer) == {"error"}, answer
        assert answer["error"].startswith(error) and "\n" not in answer["error"], answer
    status, answer = server.post("load_weights", b"not safetensors")
    assert status == 400 and answer["error"].startswith("load_weights: the body is not a safetensors blob")
    with pytest.raises(AlignRLError, match=r"^vllm server: generate: .*maximum context length is 64") as e:
        server.client.generate([[5] * (MAX_MODEL_LEN + 10)], SamplingParams(max_new_tokens=4, temperature=0))
    assert "\n" not in str(e.value)
    assert server.client.generate(server.prompts[:1], SamplingParams(max_new_tokens=4, temperature=0))  # still up


@needs_vllm
def test_load_weights(server):
    check_load_weights(server.client, server.native, server.model, server.prompts,
                       r"^vllm server: VLLMEngine.load_weights: .* pass the whole state dict")  # fmt: skip


@needs_vllm
@pytest.mark.parametrize("ranks", [1, 2])
def test_grpo_with_server_rollouts(server, tmp_path, ranks):
    """`rollout_engine=vllm_server`: GRPO (one process, or two DDP ranks sharing the server, rank 0 pushing the
    weights) samples from the server with the policy's weights of every step: the trainer's log π_old equals the
    sampler's, and the digit-share reward rises."""
    from test_distributed import torchrun
    from test_vllm import _grpo_args, _learned, _metrics

    args, out = _grpo_args(tmp_path, "rollout_engine=vllm_server", f"vllm_server_url={server.url}")
    args[0] = f"model={server.model_dir}"
    cli = ["-m", "alignrl.cli", "train", "grpo", *args]
    try:
        if ranks == 1:
            proc = subprocess.run([sys.executable, *cli], capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            torchrun([*cli, "distributed=ddp"], timeout=600)
    finally:
        server.client.load_weights(server.model.state_dict().items())  # the module's other tests use the original
    rows = _metrics(out)
    assert max(m["rollout_correction/abs_logp_diff"] for m in rows) < 1e-3
    first, last = _learned(rows)
    assert last > first + 0.1, (first, last)


@needs_vllm
def test_shutdown_exits_zero(server):
    """Last in this module: the server is gone afterwards."""
    assert server.post("shutdown", b"") == (200, {"status": "shutting down"})
    assert server.proc.wait(timeout=60) == 0, server.log_tail()
    with pytest.raises(AlignRLError, match=r"^vllm server at http://127\.0\.0\.1:\d+: generate failed"):
        server.client.generate(server.prompts, SamplingParams(max_new_tokens=4, temperature=0))
