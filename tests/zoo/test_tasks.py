"""The task with a verifier: a held-out split no training item reaches, answers judged by reasoning-gym."""

import pytest

from faircalib.data import task_data
from faircalib.zoo import tasks
from faircalib.zoo.train_task import char_tokenizer, encode


def test_held_out_problems_are_never_training_problems():
    training = tasks.training_problems(3000)
    unseen = tasks.unseen_held_out(training, size=300)
    assert 100 <= len(unseen) < 300  # the puzzle space is small: a pool this size already meets some held-out items
    held_out = tasks.held_out_problems(100, unseen)
    assert not {p.prompt for p in training} & {p.prompt for p in held_out}
    assert {p.prompt for p in tasks.calibration_problems(50)} != {p.prompt for p in held_out[:50]}
    assert all(p.prompt.endswith("=") and len(p.answer) == tasks.ANSWER_CHARS for p in held_out)
    # the same seeds give the same problems: the split is a pure function of the seed ranges
    assert [p.prompt for p in tasks.held_out_problems(10, unseen)] == [p.prompt for p in held_out[:10]]


def test_the_verifier_takes_solutions_and_refuses_the_rest():
    item = tasks.held_out_problems(1, [0])[0]
    assert tasks.verify(item, item.answer)
    wrong = item.answer.replace("1", "x").replace("2", "1").replace("x", "2")  # swap two digits everywhere
    assert not tasks.verify(item, wrong) and not tasks.verify(item, item.answer[:-1]) and not tasks.verify(item, "")


def test_the_character_tokenizer_round_trips_the_format():
    tokenizer, items = char_tokenizer(), tasks.training_problems(3)
    ids, prompt = encode(tokenizer, items)
    assert ids.shape == (3, len(items[0].prompt) + tasks.ANSWER_CHARS + 1) and prompt == len(items[0].prompt)
    assert tokenizer.decode(ids[0, prompt:], skip_special_tokens=True) == items[0].answer


TASK = {"task": tasks.TASK, "held_out_unseen": list(range(10)), "sampling": {"gen_length": 20}}


def test_task_windows_are_the_solved_problems():
    tokenizer = char_tokenizer()
    data = task_data(tokenizer, TASK, 4, "calib", offset=2)
    problems = tasks.calibration_problems(6)[2:]
    assert data.text_windows.shape == (4, len(problems[0].prompt) + 20)
    for window, problem in zip(data.text_windows, problems, strict=True):
        assert tokenizer.decode(window, skip_special_tokens=True) == problem.prompt + problem.answer
        assert window[-1] == tokenizer.eos_token_id  # the generation ends in EOS, as the model writes it


def test_parity_reports_the_task_accuracy_of_student_and_teacher():
    from faircalib.models.llada import LLaDA
    from faircalib.models.tiny import randomize_, tiny_llada_config
    from faircalib.sampling import LLaDASampling
    from faircalib.sampling.parity import parity_report

    tokenizer = char_tokenizer()
    cfg = tiny_llada_config(vocab_size=len(tokenizer), embedding_size=len(tokenizer), mask_token_id=1, eos_token_id=0)
    model = LLaDA(cfg).eval()
    randomize_(model, 3)
    data = task_data(tokenizer, TASK, 6, "eval")
    verdicts = []
    judge = lambda prompt, generated: verdicts.append(data.judge(prompt, generated)) or verdicts[-1]  # noqa: E731
    sampling = LLaDASampling(gen_length=20, block_length=20, steps=20)
    report = parity_report(model, model, data.prompts, sampling, model.spec, judge=judge)
    assert len(verdicts) == 12  # six problems, the student's answers and the teacher's
    assert report["task_accuracy"] == report["task_accuracy_teacher"] == sum(verdicts) / 12


def test_the_bundled_task_model_solves_held_out_puzzles_and_order_matters():
    from faircalib.data import task_of
    from faircalib.models import load_denoiser, load_tokenizer
    from faircalib.zoo import model_dir
    from faircalib.zoo.train_task import solve_rate

    path = model_dir("llada-sudoku-tiny")
    model, tokenizer, task = load_denoiser(path), load_tokenizer(path), task_of(path)
    items = tasks.held_out_problems(200, task["held_out_unseen"])
    low_confidence, random = solve_rate(model, tokenizer, items), solve_rate(model, tokenizer, items, "random")
    assert low_confidence >= 0.85 and random <= low_confidence - 0.15, (low_confidence, random)


@pytest.mark.slow
def test_the_bundled_task_models_held_out_puzzles_were_never_trained_on():
    from faircalib.data import task_of
    from faircalib.zoo import model_dir

    task = task_of(model_dir("llada-sudoku-tiny"))
    assert task["held_out_unseen"] == tasks.unseen_held_out(tasks.training_problems(task["training_problems"]))
