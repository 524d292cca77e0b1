"""Training continued with --init-from keeps the whole run's record, and the card tells every phase of it."""

import json
from dataclasses import asdict

import pytest

from faircalib.zoo import kjv
from faircalib.zoo.card import write_model_card
from faircalib.zoo.train import TrainConfig, resume_log


def first_run_log() -> dict:
    cfg = asdict(TrainConfig())
    history = [{"step": 300, "train_loss": 6.9, "minutes": 12.0, "accuracy": 0.04, "nll": 6.8}]
    return {"train_config": cfg, "parameters": 10, "train_tokens": 1000, "unigram_accuracy": 0.04,
            "history": history, "steps_done": 300, "train_minutes": 12.0}  # fmt: skip


def test_a_continued_run_starts_from_the_checkpoints_own_record(tmp_path):
    (tmp_path / "train_log.json").write_text(json.dumps(first_run_log()))
    log = {"history": [], "phases": []}
    assert resume_log(tmp_path, log) == (300, 12.0)
    assert log["history"] == first_run_log()["history"]
    assert [p["steps"] for p in log["phases"]] == [300] and log["phases"][0]["command"] == "make train"


def test_init_from_a_directory_without_a_log_says_so(tmp_path):
    with pytest.raises(SystemExit, match="train_log.json is missing"):
        resume_log(tmp_path, {"history": [], "phases": []})


def test_the_card_tells_every_phase_and_the_accuracy_outside_wikipedia(tmp_path):
    log = first_run_log()
    second = {**log["train_config"], "lr": 0.001, "seed": 1, "steps": 200}
    later = "python -m faircalib.zoo.train --out X --init-from X --lr 0.001 --seed 1"
    log["phases"] = [
        {"train_config": log["train_config"], "steps": 300, "minutes": 12.0, "command": "make train"},
        {"train_config": second, "steps": 200, "minutes": 8.0, "command": later},
    ]
    log.update(train_config=second, steps_done=500, train_minutes=20.0)
    log["outside_wikipedia"] = {"text": "KJV gen1:1-50:26", "windows": 7, "mask_ratio": 0.15, "accuracy": 0.11,
                                "best_constant_accuracy": 0.05, "ratio_to_constant": 2.2}  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"0" * 2048)
    text = write_model_card(tmp_path, log, [("The river", " flows")]).read_text()
    assert "2400 steps planned at peak lr 0.002" in text and "stopped by the time limit at step 300" in text
    assert "then 200 steps planned at peak lr 0.001" in text
    assert "In all 500 steps" in text and "20 minutes" in text
    assert f"then `{later}`" in text and "`make train` (`python -m faircalib.zoo.train" in text
    assert "it scores 0.1100 against 0.0500" in text and "2.20x" in text


@pytest.mark.skipif(not kjv.available(), reason="needs Debian's bible-kjv-text")
def test_the_king_james_text_is_running_verses_without_numbers():
    text = kjv.kjv_text("gen1:1-1:2")
    assert text.startswith("In the beginning God created the heaven and the earth. And the earth was")
    assert not any(ch.isdigit() for ch in text)
