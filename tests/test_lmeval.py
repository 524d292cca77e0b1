import json

import pytest
import torch

pytest.importorskip("lm_eval")

from faircalib.cli import main  # noqa: E402
from faircalib.lmeval import DenoiserLM, cut, task_specs  # noqa: E402
from faircalib.models import load_denoiser, load_tokenizer  # noqa: E402
from faircalib.models.tiny import tiny_denoiser  # noqa: E402
from faircalib.sampling import default_sampling, shift_logits  # noqa: E402
from faircalib.zoo.train_task import char_tokenizer  # noqa: E402


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_token_loglikelihood_is_exact(family):
    """With one continuation token every Monte Carlo sample masks exactly it at ratio 1: the estimate is the
    model's log-probability of the token, for either logit alignment."""
    model, tokenizer = tiny_denoiser(family), char_tokenizer()
    lm = DenoiserLM(model, model.spec, tokenizer, default_sampling(model.spec), mc_num=5)
    context = tokenizer("12_4/", add_special_tokens=False)["input_ids"]
    target = tokenizer("3", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = model(torch.tensor([context + [model.spec.mask_token_id]]))
    logits = shift_logits(logits) if model.spec.logit_shift else logits
    expected = torch.log_softmax(logits[0, -1].float(), -1)[target]
    assert lm.masked_loglikelihood("12_4/", "3") == pytest.approx(float(expected), rel=1e-5)


def test_multi_token_estimate_is_seeded_and_finite():
    model, tokenizer = tiny_denoiser("llada"), char_tokenizer()
    lm = DenoiserLM(model, model.spec, tokenizer, default_sampling(model.spec), mc_num=8,
                    batch_size=3)  # fmt: skip
    first = lm.masked_loglikelihood("12_4/", "3421")
    assert first == lm.masked_loglikelihood("12_4/", "3421") and first < 0


def test_cut_at_first_stop():
    assert cut("ab.cd\nef", [".", "\n"]) == "ab"
    assert cut("abc", "") == "abc"


def test_mini_sudoku_needs_a_task_model():
    with pytest.raises(Exception, match="task.json"):
        task_specs(["mini_sudoku"], None, 4)


def _write_tasks(root):
    """A multiple-choice task and a generation task, lm-eval YAML with JSONL data beside them."""
    (root / "choice.jsonl").write_text(
        "\n".join(json.dumps(d) for d in [
            {"context": "A B C", "choices": [" D", " Z"], "label": 0},
            {"context": "Q R", "choices": [" S", " A"], "label": 0},
        ]) + "\n"
    )  # fmt: skip
    (root / "gen.jsonl").write_text(json.dumps({"question": "A B C", "answer": "D"}) + "\n")
    (root / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['Z']\nmetric_list:\n  - metric: exact_match\n"
    )


def test_eval_runs_local_yaml_tasks_end_to_end(tmp_path, tiny_dirs, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _write_tasks(tmp_path)
    model_dir, out = tiny_dirs["bert"], tmp_path / "scores.json"
    schedule = ("--gen-length", "6", "--steps", "3")
    code = main(["eval", "--model", str(model_dir), "--tasks", "tiny_choice", str(tmp_path / "tiny_gen.yaml"),
                 "--include-path", str(tmp_path), "--mc-num", "4", "--out", str(out), *schedule])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "tiny_choice (teacher): acc" in printed and "tiny_gen (teacher): exact_match" in printed
    scores = json.loads(out.read_text())
    assert scores["results"]["tiny_choice"]["examples"] == 2 and scores["results"]["tiny_gen"]["examples"] == 1

    # the choices were scored by our estimator on the context and continuation lm-eval split off
    model, tokenizer = load_denoiser(model_dir), load_tokenizer(model_dir)
    lm = DenoiserLM(model, model.spec, tokenizer, default_sampling(model.spec), mc_num=4)
    logprobs = [value for value, _ in scores["samples"]["tiny_choice"][0]["response"]]
    assert logprobs == pytest.approx([lm.masked_loglikelihood("A B C", " D"), lm.masked_loglikelihood("A B C", " Z")])

    # the generation is what `faircalib generate` writes for the prompt under the same schedule, cut at the stop
    main(["generate", "--model", str(model_dir), "--prompt", "A B C", "--json", "--quiet", *schedule])
    generated = json.loads(capsys.readouterr().out)["generated_ids"]
    written = tokenizer.decode(generated, skip_special_tokens=True)
    assert scores["samples"]["tiny_gen"][0]["response"] == [cut(written, ["Z"])]


def test_eval_unknown_task_is_one_error_line(tmp_path, tiny_dirs, capsys):
    code = main(["eval", "--model", str(tiny_dirs["bert"]), "--tasks", "no_such_task", "--include-path",
                 str(tmp_path)])  # fmt: skip
    assert code == 2 and "no_such_task" in capsys.readouterr().err


def test_eval_of_the_task_model_equals_parity_task_accuracy(tmp_path, capsys):
    """Teacher, fake-quant student and its ONNX Runtime bundle: lm-eval's mini_sudoku score is parity's
    task accuracy on the same held-out problems."""
    from faircalib.zoo import model_dir

    model = str(model_dir("llada-sudoku-tiny"))
    artifact, bundle = tmp_path / "rtn", tmp_path / "bundle"
    assert main(["calibrate", "--model", model, "--method", "rtn", "--out", str(artifact), "--quiet"]) == 0
    assert main(["export", "--model", model, "--artifact", str(artifact), "--profile", "ort-w4a16",
                 "--out", str(bundle)]) == 0  # fmt: skip
    capsys.readouterr()

    def eval_score(*student: str) -> float:
        out = tmp_path / "eval.json"
        assert main(["eval", "--model", model, "--tasks", "mini_sudoku", "--limit", "32", "--out", str(out),
                     *student]) == 0  # fmt: skip
        return json.loads(out.read_text())["results"]["mini_sudoku"]["acc"]

    def parity(*student: str) -> dict:
        capsys.readouterr()
        assert main(["parity", "--model", model, "--n-prompts", "32", "--post-commit-probes", "1", "--json",
                     "--quiet", "--artifact", str(artifact), *student]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out)

    on_torch = parity()
    assert eval_score() == on_torch["task_accuracy_teacher"] > 0.5
    assert eval_score("--artifact", str(artifact)) == on_torch["task_accuracy"]
    on_ort = parity("--backend", "ort", "--bundle", str(bundle))
    assert eval_score("--backend", "ort", "--bundle", str(bundle)) == on_ort["task_accuracy"]
