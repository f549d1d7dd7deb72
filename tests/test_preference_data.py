"""Preference rows: tokenization (text and chat), margin column, and bad rows as errors or counted skips."""

from __future__ import annotations

import logging

import pytest

from alignrl.data import Rows, encode, load_preference_examples, load_rows, tokenize_preference, write_jsonl
from alignrl.errors import AlignRLError
from alignrl.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def test_text_row_tokenization(tok):
    ex = tokenize_preference({"prompt": "1+2=", "chosen": "3", "rejected": "12", "margin": 1}, tok, "d line 1", 64)
    assert ex.prompt_ids == encode(tok, "1+2=")
    assert ex.chosen_ids == encode(tok, "3") + [tok.eos_token_id]
    assert ex.rejected_ids == encode(tok, "12") + [tok.eos_token_id]
    assert ex.margin == 1.0 and ex.length == 4 + 3
    no_eos = tokenize_preference({"prompt": "a", "chosen": "b", "rejected": "c"}, tok, "d", 64, add_eos=False)
    assert no_eos.chosen_ids == encode(tok, "b") and no_eos.margin is None


def test_chat_row_tokenization(tok):
    prompt = [{"role": "user", "content": "hi"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yo"}],
           "rejected": [{"role": "assistant", "content": "no"}]}  # fmt: skip
    ex = tokenize_preference(row, tok, "d", 64)
    assert tok.decode(ex.prompt_ids) == "user: hi\nassistant: "
    assert tok.decode(ex.chosen_ids) == "yo</s>\n"
    full = tok.apply_chat_template(prompt + row["chosen"], tokenize=False)
    assert ex.prompt_ids + ex.chosen_ids == encode(tok, full)
    with pytest.raises(AlignRLError, match="'prompt' must be a message list"):
        tokenize_preference({**row, "prompt": "hi"}, tok, "d line 3", 64)


BAD = [
    ({"prompt": "p", "rejected": "x"}, "missing column 'chosen'", "missing column"),
    ({"prompt": "p", "chosen": "x"}, "missing column 'rejected'", "missing column"),
    ({"chosen": "x", "rejected": "y"}, "missing column 'prompt'", "missing column"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical", "identical chosen and rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "y"}, "'chosen' is an empty completion", "empty completion"),
    ({"prompt": "p", "chosen": "x", "rejected": " "}, "'rejected' is an empty completion", "empty completion"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "empty completion", "empty completion"),  # fmt: skip
    ({"prompt": "p" * 20, "chosen": "x" * 30, "rejected": "y"}, "longer than max_length=40", "longer than max_length"),
    ({"prompt": "p", "chosen": 3, "rejected": "y"}, "must be a string or a list", "invalid value"),
    ({"prompt": "p", "chosen": "x", "rejected": "y", "margin": "big"}, "'margin' must be a number", "invalid value"),
]


@pytest.mark.parametrize("row, message, reason", BAD)
def test_bad_row_is_a_one_line_error_naming_file_and_line(tok, tmp_path, row, message, reason):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(AlignRLError) as e:
        load_preference_examples(load_rows(str(path)), tok, 40, "error")
    msg = str(e.value)
    assert f"{path} line 2:" in msg and message in msg and "on_bad_row=skip" in msg and "\n" not in msg


def test_bad_rows_skipped_counted_and_logged(tok, tmp_path, caplog):
    good = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(3)]
    rows = Rows("pairs.jsonl", good + [r for r, _, _ in BAD], list(range(1, 4 + len(BAD))))
    with caplog.at_level(logging.WARNING, logger="alignrl"):
        examples, skipped = load_preference_examples(rows, tok, 40, "skip")
    assert len(examples) == 3
    assert skipped == {"missing column": 3, "identical chosen and rejected": 1, "empty completion": 3,
                       "longer than max_length": 1, "invalid value": 2}  # fmt: skip
    assert f"skipped {len(BAD)} of {len(rows)} rows of pairs.jsonl" in caplog.text
    assert "first: pairs.jsonl line 4: missing column 'chosen'" in caplog.text
    with pytest.raises(AlignRLError, match="no usable preference rows"):
        load_preference_examples(rows.subset([3, 4]), tok, 40, "skip")


def test_datasets_directory(tok, tmp_path):
    import datasets

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    examples, skipped = load_preference_examples(load_rows(str(tmp_path / "ds")), tok, 64)
    assert len(examples) == 2 and not skipped
