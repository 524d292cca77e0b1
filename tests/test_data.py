"""Prompts files: one prompt per non-empty line, through the model's tokenizer."""

import pytest

from faircalib.data import read_prompt_file
from faircalib.models import load_tokenizer


@pytest.fixture
def bert_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("A B C D\nQ R S\n\nE F G H I\nK L M N\n")
    return path


def test_prompt_files_one_prompt_per_line_optionally_truncated(tiny_dirs, bert_prompts):
    tokenizer = load_tokenizer(tiny_dirs["bert"])
    whole = read_prompt_file(bert_prompts, tokenizer, limit=None)
    assert [len(p) for p in whole] == [5, 4, 6, 5]  # [CLS] + letters; the empty line is skipped
    assert read_prompt_file(bert_prompts, tokenizer, limit=2, max_tokens=3) == [p[:3] for p in whole[:2]]
