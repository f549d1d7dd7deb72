from __future__ import annotations

import pytest

from alignrl.data import load_rows, require_columns, tokenize_sft, write_jsonl
from alignrl.errors import AlignRLError
from alignrl.models import load_tokenizer


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(AlignRLError, match=r"d\.jsonl line 3: invalid JSON"):
        load_rows(str(p))


def test_non_object_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(AlignRLError, match=r"line 2: expected a JSON object"):
        load_rows(str(p))


def test_missing_column_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"prompt": "a"}, {"question": "b"}])
    rows = load_rows(str(p))
    with pytest.raises(AlignRLError, match=r"d\.jsonl line 2: missing column 'prompt'"):
        require_columns(rows, ["prompt"])


def test_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(str(tmp_path / "ds"))
    assert rows.rows == [{"prompt": "1+1=", "answer": "2"}]
    with pytest.raises(AlignRLError, match="not a saved `datasets` directory"):
        (tmp_path / "empty").mkdir()
        load_rows(str(tmp_path / "empty"))


def test_sft_masks_prompt_and_keeps_eos(tiny_model):
    tok = load_tokenizer(tiny_model)
    ex = tokenize_sft({"prompt": "ab", "completion": "cd"}, tok, "x")
    assert tok.decode(ex.input_ids) == "abcd</s>"
    assert ex.loss_mask == [0, 0, 1, 1, 1]


def test_sft_messages_train_on_assistant_turns_only(tiny_model):
    tok = load_tokenizer(tiny_model)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    ex = tokenize_sft({"messages": msgs}, tok, "x")
    trained = "".join(tok.decode([t]) for t, m in zip(ex.input_ids, ex.loss_mask) if m)
    assert trained == "yo</s>a</s>"  # the newline the template adds after end-of-turn is never generated


def test_bad_messages(tiny_model):
    tok = load_tokenizer(tiny_model)
    with pytest.raises(AlignRLError, match="f line 4: column 'messages'"):
        tokenize_sft({"messages": [{"content": "no role"}]}, tok, "f line 4")
