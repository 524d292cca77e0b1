import json

import pytest
import torch

from faircalib.errors import CheckpointError
from faircalib.exporter.schedule_file import read_schedule, write_schedule
from faircalib.models.tiny import tiny_denoiser
from faircalib.sampling import DreamSampling, LLaDASampling, generate


@pytest.mark.parametrize(
    "family,sampling",
    [
        ("llada", LLaDASampling(gen_length=12, block_length=4, steps=6)),
        ("dream", DreamSampling(gen_length=8, steps=5, alg="entropy")),
    ],
)
def test_the_file_replays_the_same_generation(tmp_path, family, sampling):
    model = tiny_denoiser(family, seed=1)
    write_schedule(tmp_path, model.spec, sampling)
    loaded = read_schedule(tmp_path)
    assert loaded.spec == model.spec and loaded.sampling == sampling
    data = json.loads((tmp_path / "schedule.json").read_text())
    assert data["mask_token_id"] == model.spec.mask_token_id and data["logit_shift"] == model.spec.logit_shift
    assert sum(row["commit"] for row in data["table"]) == sampling.gen_length
    for prompt in (torch.tensor([[3, 4, 5]]), torch.tensor([[7, 8, 9, 10, 11, 12, 13]])):  # any prompt length
        direct = generate(model, prompt, sampling, model.spec)
        replay = generate(model, prompt, loaded.sampling, loaded.spec, schedule=loaded.for_prompt(prompt.shape[1]))
        assert torch.equal(direct.tokens, replay.tokens)


def test_edited_table_is_rejected(tmp_path):
    model = tiny_denoiser("llada")
    write_schedule(tmp_path, model.spec, LLaDASampling(gen_length=8, block_length=8, steps=4))
    data = json.loads((tmp_path / "schedule.json").read_text())
    data["table"][0]["commit"], data["table"][1]["commit"] = 3, 1
    (tmp_path / "schedule.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match its own sampling settings"):
        read_schedule(tmp_path)


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no schedule.json"):
        read_schedule(tmp_path)
    (tmp_path / "schedule.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="schedule format 99"):
        read_schedule(tmp_path)
