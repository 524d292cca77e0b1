import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faircalib.bench import BenchConfig, bench_page, markdown_table, summarise
from faircalib.errors import ConfigError


def rows():
    base = {"format": "W4A16", "calib_seconds": 10.0, "peak_rss_mb": 500.0, "masked_nll_q": 5.0}
    out = []
    for method, flips in (("gptq", [0.2, 0.3, 0.25]), ("fair", [0.1, 0.12, 0.11])):
        for seed, f in enumerate(flips):
            metrics = dict.fromkeys(("commit_set_disagreement", "frontier_write_error", "post_commit_mismatch",
                                     "teacher_divergence", "exact_match"), 0.5)  # fmt: skip
            out.append({**base, **metrics, "method": method, "seed": seed, "frontier_flip_rate": f,
                        "flip_curve": [f, None, f / 2]})  # fmt: skip
    out.append({**base, "method": "quarot", "seed": 0, "error": "boom"})
    return out


def test_summary_means_and_spread_over_seeds():
    summary = {(e["format"], e["method"]): e for e in summarise(rows())}
    fair = summary[("W4A16", "fair")]
    assert fair["runs"] == 3 and abs(fair["frontier_flip_rate"] - 0.11) < 1e-12
    assert abs(fair["frontier_flip_rate_std"] - 0.01) < 1e-12
    assert summary[("W4A16", "quarot")]["failed"] == 1 and summary[("W4A16", "quarot")]["frontier_flip_rate"] is None


def test_markdown_and_page_render(tmp_path):
    table = markdown_table(summarise(rows()), BenchConfig())
    assert "| W4A16 | fair | 0.1100 +- 0.0100 |" in table and "failed" in table and "teacher's own" not in table
    assert "teacher's own post_commit_mismatch on these prompts is 0.1127" in markdown_table(
        summarise(rows()), BenchConfig(), teacher_post_commit=0.11268
    )
    page = bench_page(rows(), summarise(rows()), BenchConfig(), tmp_path)
    text = page.read_text()
    assert "<h2>W4A16</h2>" in text and "0.1100 ± 0.0100" in text
    for image in ("methods_W4A16.png", "curves_W4A16.png"):
        assert f'src="{image}"' in text and (tmp_path / image).read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_a_child_reports_its_own_peak_memory_not_its_parents():
    ballast = torch.ones(384 * 2**20)  # 1.5 GiB resident in this (parent) process
    child = "from faircalib.calib.runner import host_peak_mb; print(host_peak_mb())"
    peak = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert 10 < peak < 1024, peak  # importing torch takes a few hundred MiB, far from the parent's 1.5 GiB
    del ballast


def test_bad_bench_configs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown methods"):
        BenchConfig(methods=("gptq", "awq"))
    with pytest.raises(ConfigError, match="eval_windows_per_article"):
        BenchConfig(eval_windows_per_article=0)
    with pytest.raises(ConfigError, match="post_commit_probes"):
        BenchConfig(post_commit_probes=0)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_the_task_model(tmp_path):
    """Calibrations in child processes (teacher states and text windows of solved problems), parity with
    task accuracy and the forced post-commit distance, on held-out problems."""
    import json

    from faircalib.bench import run_bench
    from faircalib.zoo import model_dir

    cfg = BenchConfig(model=str(model_dir("llada-sudoku-tiny")), methods=("rtn", "gptq-text"), formats=("W4A16",),
                      seeds=(0,), n_calib_prompts=4, n_eval_prompts=8, post_commit_probes=1,
                      out=str(tmp_path))  # fmt: skip
    run_bench(cfg)
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["method"] for r in rows] == ["rtn", "gptq-text"] and not any("error" in r for r in rows)
    for row in rows:
        assert 0 <= row["task_accuracy"] <= 1 and row["task_accuracy_teacher"] > 0.5
        assert row["post_commit_forced_distance"] >= 0 and row["masked_nll_q"] > 0
