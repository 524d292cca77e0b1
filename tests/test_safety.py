"""Nothing lost, nothing hidden: the findings of issue 33, one test each (the kill-anywhere test is in
tests/calib/test_kill_anywhere.py)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from faircalib.cli import build_parser, main
from faircalib.models.tiny import write_tiny_checkpoint

SCHEDULE = ["--gen-length", "6", "--steps", "6"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("A B C D\nQ R S\nE F G H I\nK L M N\n")
    return path


def calibrate(capsys, model, prompts, out, *extra):
    return run(capsys, "calibrate", "--model", model, "--method", "rtn", "--calib-prompts", prompts, "--n-prompts", 4,
               "--states-per-prompt", 2, *SCHEDULE, "--out", out, "--quiet", *extra)  # fmt: skip


def test_an_output_directory_holding_the_users_files_is_never_replaced(capsys, tiny_dirs, prompts, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = calibrate(capsys, tiny_dirs["bert"], prompts, out)
    assert code == 2 and "faircalib did not write (notes.txt)" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "art.partial").exists()
    code, _, err = run(capsys, "export", "--model", tiny_dirs["bert"], "--profile", "ort-fp32", "--out", out)
    assert code == 2 and (out / "notes.txt").read_text() == "mine"
    assert calibrate(capsys, tiny_dirs["bert"], prompts, out, "--overwrite")[0] == 0  # asked for: replaced
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tensors.safetensors"]
    assert calibrate(capsys, tiny_dirs["bert"], prompts, out, "--seed", 1)[0] == 0  # our own: replaced
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1


def test_non_finite_weights_are_refused_by_name_before_any_work(capsys, tmp_path, prompts):
    model = write_tiny_checkpoint("llada", tmp_path / "nan", seed=1)
    tensors = load_file(model / "model.safetensors")
    tensors["model.transformer.blocks.1.ff_out.weight"][3, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = run(capsys, "generate", "--model", model, "--prompt-ids", "3,4", *SCHEDULE, "--quiet")
    assert code == 2 and "blocks.1.ff_out.weight holds NaN or infinite values" in err and out == ""
    code, _, err = run(capsys, "calibrate", "--model", model, "--calib-prompts", prompts, "--out", tmp_path / "a")
    assert code == 2 and "NaN" in err and not (tmp_path / "a.partial").exists()


def test_an_empty_resume_directory_starts_cleanly(capsys, tiny_dirs, prompts, tmp_path):
    (tmp_path / "art.partial").mkdir()  # what a run killed before its first write leaves
    assert calibrate(capsys, tiny_dirs["bert"], prompts, tmp_path / "art")[0] == 0
    assert not (tmp_path / "art.partial").exists()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_ends_in_one_line_saying_what_was_kept(tiny_dirs, prompts, tmp_path):
    out = tmp_path / "art"
    argv = [sys.executable, "-m", "faircalib", "calibrate", "--model", str(tiny_dirs["bert"]), "--method",
            "gptq-recon", "--recon-steps", "1000000", "--calib-prompts", str(prompts), "--out", str(out), "--quiet",
            *SCHEDULE]  # fmt: skip
    # a shell's Ctrl-C: SIGINT neither ignored nor blocked, whatever this test process inherited from the suite
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "art.partial" / "states.safetensors").is_file() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # inside block 0's (long) reconstruction now
        child.send_signal(signal.SIGINT)
        err = child.communicate(timeout=120)[1]
    finally:
        child.kill()  # a million reconstruction steps must not outlive a failed test
    assert child.returncode == 130, err
    assert err.strip().splitlines() == [
        f"faircalib: interrupted: what was finished is kept in {out}.partial: run the same command again to resume"
    ]


def test_a_binary_prompts_file_names_the_file_and_line(capsys, tiny_dirs, tmp_path):
    path = tmp_path / "prompts.bin"
    path.write_bytes(b"A B C\nD \xff\xfe E\n")
    code, _, err = run(capsys, "calibrate", "--model", tiny_dirs["bert"], "--calib-prompts", path,
                       "--out", tmp_path / "a")  # fmt: skip
    assert code == 2 and f"{path}, line 2: not UTF-8 text" in err and "Traceback" not in err


def test_schedule_files_are_checked_field_by_field(capsys, tiny_dirs, tmp_path):
    bundle = tmp_path / "bundle"
    assert run(capsys, "export", "--model", tiny_dirs["llada"], "--profile", "ort-fp32", *SCHEDULE, "--block-length",
               6, "--out", bundle)[0] == 0  # fmt: skip
    schedule = json.loads((bundle / "schedule.json").read_text())
    for field, value, message in (("steps", -6, "field steps"), ("mask_token_id", -1, "mask_token_id must be"),
                                  ("eos_token_ids", [10**9], "eos_token_ids must be")):  # fmt: skip
        (bundle / "schedule.json").write_text(json.dumps({**schedule, field: value}))
        code, _, err = run(capsys, "generate", "--backend", "ort", "--onnx", bundle, "--prompt-ids", "3,4", "--quiet")
        assert code == 2 and message in err, (field, err)


def test_refusals_speak_in_words_not_python_reprs(capsys, tiny_dirs, prompts, tmp_path):
    calibrate(capsys, tiny_dirs["bert"], prompts, tmp_path / "art")
    code, _, err = run(capsys, "export", "--model", tiny_dirs["bert"], "--artifact", tmp_path / "art", "--profile",
                       "trt-w8a8", "--out", tmp_path / "b")  # fmt: skip
    assert code == 2 and "4-bit weights (it takes 8-bit)" in err and "(8,)" not in err
    code, _, err = run(capsys, "export", "--model", tiny_dirs["bert"], "--artifact", tmp_path / "art", "--profile",
                       "trt-w4a16", "--out", tmp_path / "b")  # fmt: skip
    assert code == 2 and "per-channel scales (it takes blocks of 64 along K or blocks of 128 along K)" in err
    assert "None" not in err


def test_outputs_get_ordinary_permissions(capsys, tiny_dirs, prompts, tmp_path):
    old = os.umask(0o022)
    try:
        calibrate(capsys, tiny_dirs["bert"], prompts, tmp_path / "art")
        run(capsys, "export", "--model", tiny_dirs["bert"], "--profile", "ort-fp32", "--out", tmp_path / "bundle")
    finally:
        os.umask(old)
    for directory in (tmp_path / "art", tmp_path / "bundle"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o644}


def test_every_flag_has_a_help_line_with_its_default():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for verb, sub in verbs.items():
        for action in sub._actions:
            if action.dest in ("help",) or not action.option_strings:
                continue
            assert action.help, f"{verb} {action.option_strings[0]} has no help"
            needs_default = action.nargs != 0 and action.const is None and not action.required
            if needs_default:
                assert "default" in action.help or "reference" in action.help, (verb, action.option_strings[0])


def test_progress_bars_per_stage_with_their_own_clocks(capsys, tiny_dirs, prompts, tmp_path):
    code, _, err = run(capsys, "calibrate", "--model", tiny_dirs["bert"], "--method", "gptq-recon", "--abits", 8,
                       "--no-rotate", "--recon-steps", 2, "--calib-prompts", prompts, "--n-prompts", 4,
                       "--states-per-prompt", 2, *SCHEDULE, "--out", tmp_path / "b")  # fmt: skip
    assert code == 0
    assert "stage I: teacher probe" in err and "stage II: blocks" in err and "prompt" in err
    code, out, err = run(capsys, "parity", "--model", tiny_dirs["bert"], "--artifact", tmp_path / "b", "--prompts",
                         prompts)  # fmt: skip
    assert code == 0 and "parity: teacher" in err and "parity: student" in err
    header, *rows = out.strip().splitlines()
    assert header.split() == ["metric", "student", "teacher", "better"]
    flips = next(r for r in rows if r.startswith("frontier_flip_rate"))
    assert flips.split()[2:] == ["0", "lower"]
    forced = next(r for r in rows if r.startswith("post_commit_mismatch_forced"))
    assert forced.split()[3:] == ["nearer", "the", "teacher"] and float(forced.split()[2]) >= 0


def test_progress_moves_within_a_batch_of_prompts(tiny_dirs):
    """A bar counted in prompts moves at every denoising step, not once per batch of 16."""
    from faircalib.models import load_denoiser
    from faircalib.sampling import LLaDASampling, record_runs

    model, updates = load_denoiser(tiny_dirs["llada"]), []
    prompts = [[3, 4, 5]] * 3 + [[6, 7]]  # two batches: three prompts of one length, one of another
    record_runs(
        model, prompts, LLaDASampling(gen_length=6, block_length=6, steps=6), model.spec, on_progress=updates.append
    )
    assert len(updates) == 12 and max(updates) <= 0.5 and sum(updates) == pytest.approx(4)


def test_calibrating_for_a_target_makes_what_it_exports(capsys, tiny_dirs, prompts, tmp_path):
    code, _, err = calibrate(capsys, tiny_dirs["bert"], prompts, tmp_path / "a", "--target", "trt-w4a16",
                             "--group-size", 32)  # fmt: skip
    assert code == 2 and "profile trt-w4a16 cannot express" in err and "--group-size 32" in err
    assert not (tmp_path / "a.partial").exists()  # refused before any work
    code, _, err = run(capsys, "calibrate", "--model", tiny_dirs["bert"], "--method", "gptq", "--target", "trt-w4a16",
                       "--calib-prompts", prompts, *SCHEDULE, "--out", tmp_path / "b", "--quiet")  # fmt: skip
    assert code == 0 and "exports as trt-w4a16, ort-w4a16" in err
    config = json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]
    assert (config["wbits"], config["abits"], config["group_size"], config["w_symmetric"]) == (4, 16, 64, True)
    code, _, err = calibrate(capsys, tiny_dirs["bert"], prompts, tmp_path / "c", "--target", "trt-w8a8")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert code == 0 and manifest["config"]["a_static"] and manifest["format"] == "W8A8"


def test_the_readme_tour_only_reads_what_it_made():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    made, lines = set(), [line for line in readme.splitlines() if line.startswith(("$F ", ".venv/bin/faircalib "))]
    for line in lines:
        words = line.replace("\\", " ").split()
        for flag, path in zip(words, words[1:], strict=False):
            if flag in ("--artifact", "--onnx", "--bundle", "check-onnx") and path.startswith("runs/"):
                assert path.split("/model.onnx")[0] in made, f"{path} is read before the tour makes it: {line}"
            if flag == "--out":
                made.add(path)
    assert made, "the tour writes no output"


def test_the_module_and_function_sizes_stay_small():
    """docs/DESIGN.md's rule: no module over 300 lines, no function over 60 (but the CLI's argument table)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "faircalib"
    for path in root.rglob("*.py"):
        source = path.read_text()
        assert source.count("\n") <= 300, f"{path} has {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name != "build_parser":
                assert node.end_lineno - node.lineno < 60, f"{path}:{node.lineno} {node.name}"


def test_quantize_leaves_no_gradient_on_the_model(tiny_dirs):
    import faircalib

    model = faircalib.load_denoiser(tiny_dirs["llada"])
    cfg = faircalib.preset("fair", abits=4, rotation_steps=2, recon_steps=2, n_prompts=2, states_per_prompt=2)
    prompts = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(0)).tolist()
    faircalib.quantize(model, cfg, prompts, faircalib.LLaDASampling(gen_length=4, block_length=4, steps=4),
                       inplace=True)  # fmt: skip
    assert all(p.grad is None for p in model.parameters())
