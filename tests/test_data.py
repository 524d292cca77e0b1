"""Prompts files (one prompt per non-empty line, through the model's tokenizer) and self-written calibration data."""

import pytest
import torch

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


def test_self_written_data_is_the_teachers_own_text(tiny_dirs):
    from faircalib.data import self_written_data
    from faircalib.models import load_denoiser

    model = load_denoiser(tiny_dirs["llada"])
    data = self_written_data(model, 5, 4, 6, seed=3)
    windows = data.text_windows
    assert windows.shape == (5, 10) and data.prompts == windows[:, :4].tolist()
    assert not (windows == model.spec.mask_token_id).any()  # every position written
    assert data.description == {"source": "self-written by the teacher", "prompt_tokens": 4, "seed": 3}
    assert torch.equal(self_written_data(model, 5, 4, 6, seed=3).text_windows, windows)
    assert not torch.equal(self_written_data(model, 5, 4, 6, seed=4).text_windows, windows)


def test_calibrate_from_self_written_prompts(tiny_dirs, tmp_path, capsys):
    import json

    from faircalib.cli import main

    out = tmp_path / "self"
    argv = ["calibrate", "--model", str(tiny_dirs["llada"]), "--method", "rtn", "--calib-source", "self",
            "--n-prompts", "3", "--gen-length", "4", "--steps", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration_data"]["source"] == "self-written by the teacher"
    assert main([*argv[:-3], "--calib-prompts", str(tmp_path / "x.txt"), "--out", str(tmp_path / "y")]) == 2
    assert "drop --calib-prompts" in capsys.readouterr().err
