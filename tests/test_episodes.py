"""Multi-turn episodes: the loss mask covers exactly the model's tokens, a trajectory's ids are what was sampled plus
what the environment appended (no re-tokenisation drift), log-probs over a trajectory match a float64 reference,
TRL-style environment classes and tool functions run unchanged, and the failure cases behave as documented."""

from __future__ import annotations

import json
import time

import pytest
import torch

from alignrl.data import encode, pad_batch
from alignrl.envs import Environment, Step
from alignrl.envs.tool_env import ToolEnvironment
from alignrl.episodes import Interaction, appended_ids, run_episodes
from alignrl.errors import AlignRLError
from alignrl.generation import Rollout, SamplingParams
from alignrl.models import build_char_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# renders earlier assistant turns without their <think> block (as Qwen3's template does): re-rendering a conversation
# gives other ids than the ones that were sampled
DRIFTING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1] %}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + c + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer(template: str | None = None):
    tok = build_char_tokenizer()
    if template:
        tok.chat_template = template
    return tok


class ScriptedEngine:
    """A rollout engine that answers from a script: reply(prompt_text) -> text; the turn ends with EOS unless the
    text is longer than max_new_tokens. Log-prob of token j is -(j + 1) / 100 (to check where they land)."""

    def __init__(self, tokenizer, reply):
        self.tok, self.reply, self.calls = tokenizer, reply, []

    def generate(self, prompts, params, seeds=None) -> Rollout:
        outs = []
        for p in prompts:
            text = self.tok.decode(p, skip_special_tokens=False)
            self.calls.append(text)
            ids = encode(self.tok, self.reply(text)) + [self.tok.eos_token_id]
            outs.append(ids[: params.max_new_tokens])
        pad = self.tok.pad_token_id
        pids, pmask = pad_batch(prompts, pad, left=True)
        cids, cmask = pad_batch(outs, pad)
        logp = -(torch.arange(cids.shape[1]) + 1.0).expand_as(cids) / 100 * cmask
        truncated = torch.tensor([self.tok.eos_token_id not in o for o in outs])
        return Rollout(pids, pmask, cids, cmask, logp, truncated)


class Countdown(Environment):
    """Answers "again" until the third turn; rewards the turn count."""

    def reset(self, row):
        return [{"role": "user", "content": f"count {row['n']}"}]

    def step(self, episode, message):
        if episode.turn == 3:
            return Step(done=True, rewards={"success": 1.0})
        return Step([{"role": "user", "content": "again"}], rewards={"turn": 0.1})


def _interaction(factory, max_turns=5, budget=1000, tools=(), timeout=10.0) -> Interaction:
    return Interaction("test", factory, list(tools), max_turns, budget, timeout)


def _run(tok, reply, factory, rows, **kw):
    engine = ScriptedEngine(tok, reply)
    eps = run_episodes(engine, tok, _interaction(factory, **kw), rows, SamplingParams(200), max_prompt_length=2000)
    return eps, engine


@pytest.mark.parametrize("template", [None, CHATML, "smollm2"], ids=["init-model", "chatml", "smollm2"])
def test_mask_covers_exactly_the_model_tokens(template, request):
    if template == "smollm2":  # the real ChatML template and BPE tokenizer (<|im_end|> ends a turn)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2"))
    else:
        tok = _tokenizer(template)
    eps, engine = _run(tok, lambda text: f"turn{text.count('again')}", Countdown, [{"n": 1}, {"n": 2}])
    ro = eps.rollout
    for b in range(2):
        ids = ro.completion_ids[b][ro.completion_mask[b].bool()].tolist()
        model = ro.completion_ids[b][ro.sampled_mask[b].bool()].tolist()
        # the model's tokens are its three turns, each up to and including EOS
        assert tok.decode(model, skip_special_tokens=False) == "".join(f"turn{k}{tok.eos_token}" for k in range(3))
        # the others are exactly what the template renders for the environment's two "again" messages
        env = [t for t, a in zip(ids, ro.action_mask[b][ro.completion_mask[b].bool()].tolist()) if not a]
        assert env == 2 * appended_ids(tok, [{"role": "user", "content": "again"}])
        assert ro.logprobs[b][ro.sampled_mask[b] == 0].abs().sum() == 0  # no log-prob on environment tokens
    assert eps.stats["episode/turns"].tolist() == [3, 3]
    assert eps.env_rewards[0] == {"turn": pytest.approx(0.2), "success": 1.0}
    assert [m["role"] for m in eps.completions[0]] == ["assistant", "user", "assistant", "user", "assistant"]
    # the whole trajectory renders as the template renders the conversation (no drift with a stable template)
    full = encode(tok, tok.apply_chat_template(eps.prompts[0] + eps.completions[0], tokenize=False))
    traj = ro.prompt_ids[0][ro.prompt_mask[0].bool()].tolist() + ro.completion_lists()[0]
    assert full[: len(traj)] == traj


def test_trajectory_ids_are_sampled_plus_appended_without_retokenising():
    """With a template that drops earlier <think> blocks, re-rendering would change the ids; the episode keeps the
    ids as they were sampled, and every later turn is sampled after exactly those ids."""
    tok = _tokenizer(DRIFTING)
    eps, engine = _run(tok, lambda text: f"<think>t{text.count('again')}</think>a", Countdown, [{"n": 7}])
    ro = eps.rollout
    traj = ro.prompt_ids[0][ro.prompt_mask[0].bool()].tolist() + ro.completion_lists()[0]
    again = appended_ids(tok, [{"role": "user", "content": "again"}])
    turn = [encode(tok, f"<think>t{k}</think>a") + [tok.eos_token_id] for k in range(3)]
    prompt = encode(tok, tok.apply_chat_template(eps.prompts[0], tokenize=False, add_generation_prompt=True))
    assert traj == prompt + turn[0] + again + turn[1] + again + turn[2]
    assert engine.calls[2] == tok.decode(prompt + turn[0] + again + turn[1] + again, skip_special_tokens=False)
    rerendered = encode(tok, tok.apply_chat_template(eps.prompts[0] + eps.completions[0], tokenize=False))
    assert rerendered[: len(traj)] != traj  # the drift the token-in, token-out design avoids


def test_logprobs_over_a_trajectory_match_a_float64_reference(tiny_model):
    """The training log-prob path on a multi-turn batch equals log softmax(logits / T) of a float64 forward, at the
    model's tokens only (environment tokens score 0)."""
    from alignrl.logprobs import token_logprobs
    from alignrl.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model, "model")
    model = load_causal_lm(tiny_model, "float32", "cpu", "model").eval()
    eps, _ = _run(tok, lambda text: f"x{text.count('again')}", Countdown, [{"n": 3}, {"n": 12}], budget=60)
    ro, T = eps.rollout, 0.7
    with torch.no_grad():
        got = token_logprobs(model, ro.input_ids, ro.attention_mask, ro.sampled_mask, start=ro.prompt_ids.shape[1],
                             temperature=T)[0]  # fmt: skip
    ref_model = load_causal_lm(tiny_model, "float32", "cpu", "model").double().eval()
    P = ro.prompt_ids.shape[1]
    for b in range(2):
        keep = ro.attention_mask[b].bool()
        ids = ro.input_ids[b][keep]
        with torch.no_grad():
            logits = ref_model(ids[None]).logits[0].double()
        logp = (logits / T).log_softmax(-1)
        first = int((~keep[:P]).sum())  # left padding of the prompt
        for t in range(ro.completion_ids.shape[1]):
            if not ro.completion_mask[b, t]:
                continue
            pos = P - first + t  # the token's index in the unpadded sequence
            want = float(logp[pos - 1, ids[pos]]) if ro.sampled_mask[b, t] else 0.0
            assert float(got[b, t]) == pytest.approx(want, abs=2e-5)


class TRLCounter:
    """A TRL environment_factory class, as TRL's docs write them: reset(**row), tools as methods, get_reward."""

    def reset(self, **kwargs) -> str | None:
        self.count = 0
        return f" Start at {kwargs['start']}."

    def increment(self, step: int) -> int:
        """Increment the counter.

        Args:
            step: how much to add.

        Returns:
            The new value.
        """
        self.count += step
        return self.count

    def get_reward(self) -> float:
        return float(self.count)


def _tool_reply(calls):
    """A script that makes the given tool-call texts on successive turns, then answers "done"."""

    def reply(text: str) -> str:
        k = text.count("tool:") + text.count("<|im_start|>tool")
        return calls[k] if k < len(calls) else "done"

    return reply


def test_trl_environment_factory_and_tools_run_unchanged():
    tok = _tokenizer()

    def shout(text: str) -> str:
        """Upper-case a text.

        Args:
            text: the text.
        """
        return text.upper()

    calls = ['<tool_call>{"name": "increment", "arguments": {"step": 2}}</tool_call>',
             '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>'
             '<tool_call>{"name": "increment", "arguments": {"step": 3}}</tool_call>']  # fmt: skip
    eps, engine = _run(tok, _tool_reply(calls), TRLCounter, [{"prompt": "Count.", "start": 0}], tools=[shout])
    first = engine.calls[0]
    assert "Count. Start at 0." in first  # reset's string is appended to the last user message
    assert "increment(step: integer)" in first and "shout(text: string)" in first  # both kinds of tool in the prompt
    tool_msgs = [m for m in eps.completions[0] if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs] == ["2", "HI", "5"]
    assert eps.env_rewards[0] == {"TRLCounter": 5.0}  # get_reward at the end, named after the class
    assert eps.stats["episode/tool_calls"].tolist() == [3] and eps.stats["episode/tool_errors"].tolist() == [0]
    assert eps.stats["episode/turns"].tolist() == [3]


def test_tool_failures_become_tool_error_messages():
    """A malformed call, an unknown tool, a tool that raises and a tool that hangs each give a tool message with
    an error, count as tool errors, and the episode goes on."""
    tok = _tokenizer()

    def boom(x: int) -> int:
        """Fail.

        Args:
            x: anything.
        """
        raise ValueError("no good")

    def hang(x: int) -> int:
        """Never return.

        Args:
            x: anything.
        """
        time.sleep(30)
        return x

    calls = ['<tool_call>{"name": "boom", "arguments": {"x": 1</tool_call>',  # malformed JSON
             '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>',
             '<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call>']  # fmt: skip
    t0 = time.perf_counter()
    eps, _ = _run(tok, _tool_reply(calls), ToolEnvironment, [{"prompt": "Go."}], tools=[boom, hang],
                  timeout=0.5)  # fmt: skip
    assert time.perf_counter() - t0 < 10
    errors = [json.loads(m["content"])["error"] for m in eps.completions[0] if m["role"] == "tool"]
    assert len(errors) == 4
    assert "malformed" in errors[0] and "nope" in errors[1] and "no good" in errors[2] and "timed out" in errors[3]
    assert eps.stats["episode/tool_errors"].tolist() == [4] and eps.stats["episode/turns"].tolist() == [5]


class Endless(Environment):
    def step(self, episode, message):
        return Step([{"role": "user", "content": "more"}], rewards={"turn": 1.0})


def test_an_endless_environment_stops_at_max_turns_and_the_token_budget():
    tok = _tokenizer()
    eps, engine = _run(tok, lambda text: "ok", Endless, [{"prompt": "Go."}], max_turns=4)
    assert eps.stats["episode/turns"].tolist() == [4] and eps.stats["episode/hit_max_turns"].tolist() == [1.0]
    assert eps.env_rewards[0] == {"turn": 4.0}  # step is called once per assistant turn, the last one included
    assert eps.completions[0][-1]["role"] == "assistant"  # the last answer's messages are not appended
    eps, _ = _run(tok, lambda text: "ok", Endless, [{"prompt": "Go."}], max_turns=50, budget=60)
    assert eps.stats["episode/hit_token_budget"].tolist() == [1.0] and eps.rollout.completion_mask.sum() < 60


def test_environment_errors_are_one_line_naming_it():
    tok = _tokenizer()

    class Broken(Environment):
        def step(self, episode, message):
            raise KeyError("secret")

    with pytest.raises(AlignRLError, match=r"environment: test.step raised KeyError"):
        _run(tok, lambda text: "ok", Broken, [{"prompt": "Go."}])
    with pytest.raises(AlignRLError, match="returned None and the row has no prompt"):
        _run(tok, lambda text: "ok", Endless, [{"n": 1}])


def test_turn_seeds_make_episodes_independent_of_the_batch(tiny_model):
    """Each episode's turns draw their noise from its own seed: sampling two episodes together gives what each
    gives alone."""
    from alignrl.models import load_causal_lm, load_tokenizer
    from alignrl.rollout import NativeEngine

    tok = load_tokenizer(tiny_model, "model")
    model = load_causal_lm(tiny_model, "float32", "cpu", "model").eval()
    engine = NativeEngine(model, tok)
    inter = _interaction(Endless, max_turns=3, budget=40)
    rows = [{"prompt": "a"}, {"prompt": "bb"}]
    both = run_episodes(engine, tok, inter, rows, SamplingParams(6), max_prompt_length=20, seeds=[11, 12])
    for i in range(2):
        alone = run_episodes(engine, tok, inter, rows[i : i + 1], SamplingParams(6), max_prompt_length=20,
                             seeds=[11 + i])  # fmt: skip
        assert alone.rollout.completion_lists()[0] == both.rollout.completion_lists()[i]
