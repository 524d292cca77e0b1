"""The parity report page: written from a real parity run, every figure drawn, and rendered by a browser."""

import json
import shutil
import subprocess

import pytest

from faircalib.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    """A W4A4 artifact of the tiny BERT with a few linears kept at 8 bits, its prompts, and the report of its parity
    run."""
    root = tmp_path_factory.mktemp("page")
    prompts = root / "prompts.txt"
    prompts.write_text("A B C D\nQ R S\nE F G H I\nK L M N\n")
    model = str(tiny_dirs["bert"])
    assert main(["calibrate", "--model", model, "--method", "rtn", "--abits", "4", "--calib-prompts", str(prompts),
                 "--gen-length", "8", "--block-length", "4", "--steps", "8", "--out", str(root / "art"),
                 "--promote-budget", "20", "--promote-by", "hessian", "--quiet"]) == 0  # fmt: skip
    assert main(["parity", "--model", model, "--artifact", str(root / "art"), "--prompts", str(prompts), "--quiet",
                 "--json", "--report", str(root / "report")]) == 0  # fmt: skip
    return root


def test_the_page_shows_every_figure(run_dir):
    report_dir = run_dir / "report"
    html = (report_dir / "report.html").read_text()
    for image in ("steps.png", "positions.png", "leads.png", "layers.png"):
        assert f'src="{image}"' in html
        data = (report_dir / image).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, image  # a drawn figure, not an empty canvas
    assert "frontier_flip_rate" in html


def test_breakdown_counts_match_the_totals(tiny_dirs, run_dir, capsys):
    capsys.readouterr()
    assert main(["parity", "--model", str(tiny_dirs["bert"]), "--artifact", str(run_dir / "art"), "--prompts",
                 str(run_dir / "prompts.txt"), "--quiet", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    breakdown, commits = report["breakdown"], report["teacher_commits"]
    assert sum(breakdown["commits_at"]) == sum(breakdown["lead_commits"]) == commits
    flips = round(report["frontier_flip_rate"] * commits)
    assert sum(breakdown["flips_at"]) == sum(breakdown["lead_flips"]) == flips
    assert len(breakdown["commits_at"]) == 8 and all(c == 4 for c in breakdown["commits_at"])  # each once a prompt


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium (Debian package chromium)")
def test_the_page_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,2400", (run_dir / "report" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20000
