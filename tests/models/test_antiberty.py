"""AntiBERTy, a real pretrained masked LM that `make install` puts in place: the
BERT adapter loads its checkpoint as published, and generation, FAIR-Calib and parity run on it from the
command line."""

import importlib.resources
import json
from pathlib import Path

import pytest

from faircalib.cli import main

pytestmark = pytest.mark.slow

ANTIBODIES = Path(__file__).parents[1] / "data" / "antibodies.txt"  # 12 public VH / VL sequences, residues spaced
SCHEDULE = ["--gen-length", "16", "--block-length", "16", "--steps", "16"]


@pytest.fixture(scope="module")
def antiberty() -> Path:
    import antiberty  # installed by `make install`, --no-deps like the wiki data

    return Path(str(importlib.resources.files(antiberty) / "trained_models" / "AntiBERTy_md_smooth"))


def test_antiberty_continues_a_heavy_chain_with_its_conserved_framework(antiberty, capsys):
    """After CDR-H1's opening "...C A A S" every human VH3 framework reads G F T F ... W V R Q: a model loaded
    wrongly (a missing head bias, shuffled layers) writes no such thing."""
    prompt = "E V Q L V E S G G G L V Q P G G S L R L S C A A S"
    assert main(["generate", "--model", str(antiberty), "--prompt", prompt, *SCHEDULE, "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "hf_mlm" and len(out["generated_ids"]) == 16
    assert "W V R Q" in out["text"], out["text"]


def test_fair_calib_and_parity_on_antiberty(antiberty, tmp_path, capsys):
    held_out = tmp_path / "eval.txt"
    held_out.write_text("".join(ANTIBODIES.read_text().splitlines(keepends=True)[6:]))
    common = ["--model", str(antiberty), "--prompt-tokens", "24", *SCHEDULE, "--quiet"]
    argv = ["calibrate", *common, "--method", "fair", "--wbits", "4", "--abits", "16", "--calib-prompts",
            str(ANTIBODIES), "--n-prompts", "6", "--recon-steps", "20", "--out", str(tmp_path / "art")]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    # one post-commit probe: this test reads the teacher-forced decisions, not the post-commit estimates
    parity = ["parity", *common, "--artifact", str(tmp_path / "art"), "--prompts", str(held_out), "--json"]
    assert main([*parity, "--post-commit-probes", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 6 and report["teacher_commits"] == 6 * 16
    # int4 weights move the commit order (the prototype's finding) far more than the tokens written
    assert report["frontier_flip_rate"] <= 0.1 and report["frontier_write_error"] <= 0.1
    assert 0 <= report["commit_set_disagreement"] <= 1


def test_post_ln_bert_refuses_rotation_with_a_way_out(antiberty, tmp_path, capsys):
    argv = ["calibrate", "--model", str(antiberty), "--method", "fair", "--wbits", "4", "--abits", "4",
            "--calib-prompts", str(ANTIBODIES), "--n-prompts", "2", "--prompt-tokens", "24", *SCHEDULE,
            "--quiet", "--out", str(tmp_path / "art")]  # fmt: skip
    assert main(argv) == 2
    assert "--no-rotate" in capsys.readouterr().err
