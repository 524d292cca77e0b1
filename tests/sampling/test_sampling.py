import itertools

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.models.tiny import tiny_denoiser
from faircalib.sampling import (
    DreamSampling,
    LLaDASampling,
    Schedule,
    generate,
    plan,
    sampling_from_json_dict,
)
from faircalib.sampling.schedule import dream_transfer_counts, llada_transfer_counts
from tests.reference_samplers import dream_reference, llada_reference

PROMPT = torch.tensor([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]])


class Diversified(torch.nn.Module):
    """A tiny model plus a fixed random position x token bias: random tiny models put most of their mass
    on one token, which would let a greedy comparison pass with the commit order wrong."""

    def __init__(self, family: str):
        super().__init__()
        self.model = tiny_denoiser(family, seed=2)
        self.spec = self.model.spec
        self.bias = 3.0 * torch.randn(64, self.spec.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(self, tokens):
        return self.model(tokens) + self.bias[: tokens.shape[1]]


@pytest.fixture(scope="module")
def llada():
    return Diversified("llada")


@pytest.fixture(scope="module")
def dream():
    return Diversified("dream")


LLADA_CASES = [
    dict(gen_length=12, block_length=12, steps=5),
    dict(gen_length=12, block_length=4, steps=6),
    dict(gen_length=12, block_length=4, steps=6, temperature=0.8),
    dict(gen_length=12, block_length=6, steps=4, remasking="random", temperature=1.0),
    dict(gen_length=8, block_length=4, steps=4, cfg_scale=1.5),
]


@pytest.mark.parametrize("case", LLADA_CASES)
def test_llada_matches_reference(llada, case):
    sampling = LLaDASampling(**case)
    ours = generate(llada, PROMPT, sampling, llada.spec, seed=7)
    g = torch.Generator().manual_seed(7)
    ref = llada_reference(
        llada, PROMPT, sampling.steps, sampling.gen_length, sampling.block_length, sampling.temperature,
        sampling.cfg_scale, sampling.remasking, llada.spec.mask_token_id, g,
    )  # fmt: skip
    assert torch.equal(ours.tokens, ref)
    assert len(set(ours.generated.flatten().tolist())) > sampling.gen_length // 2  # decisions are not trivial


DREAM_CASES = [
    dict(gen_length=16, steps=8, alg="origin"),
    dict(gen_length=16, steps=8, alg="origin", temperature=0.7),
    dict(gen_length=16, steps=8, alg="maskgit_plus"),
    dict(gen_length=16, steps=5, alg="topk_margin"),
    dict(gen_length=16, steps=8, alg="entropy", temperature=0.5),
    dict(gen_length=16, steps=8, alg="maskgit_plus", alg_temp=0.3),
]


@pytest.mark.parametrize("case", DREAM_CASES)
def test_dream_matches_reference(dream, case):
    sampling = DreamSampling(**case)
    ours = generate(dream, PROMPT, sampling, dream.spec, seed=11)
    g = torch.Generator().manual_seed(11)
    ref = dream_reference(
        dream, PROMPT, sampling.gen_length, sampling.steps, sampling.eps, sampling.alg, sampling.alg_temp,
        sampling.temperature, dream.spec.mask_token_id, g,
    )  # fmt: skip
    assert torch.equal(ours.tokens, ref)


def reference_transfer_counts(mask_num: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens, as published."""
    base = torch.tensor([[mask_num]]) // steps
    remainder = torch.tensor([[mask_num]]) % steps
    counts = torch.zeros(1, steps, dtype=torch.int64) + base
    counts[0, : remainder[0]] += 1
    return counts[0].tolist()


@pytest.mark.parametrize("masked,steps", [(10, 4), (7, 7), (32, 5), (3, 8), (128, 48)])
def test_llada_transfer_counts_match_reference_for_uneven_splits(masked, steps):
    assert llada_transfer_counts(masked, steps) == reference_transfer_counts(masked, steps)


def test_llada_trajectory_commits_the_planned_counts(llada):
    sampling = LLaDASampling(gen_length=10, block_length=10, steps=4)
    result = generate(llada, PROMPT, sampling, llada.spec, record=True)
    per_step = [int(s.committed[0].sum()) for s in result.trajectory.steps]
    assert per_step == [3, 3, 2, 2]


def test_dream_counts_are_not_an_even_split():
    assert dream_transfer_counts(16, 8, 1e-3) == [1, 2, 2, 2, 2, 2, 2, 3]
    schedule = plan(DreamSampling(gen_length=16, steps=8, alg="entropy"), prompt_length=3)
    assert [s.commit for s in schedule.steps] == [1, 2, 2, 2, 2, 2, 2, 3]


@pytest.mark.parametrize(
    "sampling",
    [LLaDASampling(gen_length=12, block_length=4, steps=6, temperature=1.0), DreamSampling(gen_length=12, steps=6)],
    ids=["llada", "dream"],
)
def test_committed_tokens_are_never_remasked(llada, dream, sampling):
    model = dream if isinstance(sampling, DreamSampling) else llada
    result = generate(model, PROMPT, sampling, model.spec, record=True, seed=3)
    mask = model.spec.mask_token_id
    states = [s.tokens for s in result.trajectory.steps] + [result.tokens]
    for earlier, later in itertools.pairwise(states):
        settled = earlier != mask
        assert torch.equal(later[settled], earlier[settled])
    assert not (result.tokens == mask).any()


def test_tokens_outside_the_current_block_stay_masked(llada):
    sampling = LLaDASampling(gen_length=12, block_length=4, steps=6)
    result = generate(llada, PROMPT, sampling, llada.spec, record=True)
    p, mask = PROMPT.shape[1], llada.spec.mask_token_id
    for step in result.trajectory.steps:
        after_block = slice(p + (step.block + 1) * 4, None)
        assert (step.tokens[:, after_block] == mask).all()
        assert not step.committed[:, after_block].any()
        before_block = slice(p, p + step.block * 4)
        assert (step.tokens[:, before_block] != mask).all()  # earlier blocks are finished first


def test_dream_shift_is_applied():
    """Position i's logits point at token 10 + i: after the shift position j must receive 10 + j - 1."""
    vocab, mask, length = 64, 63, 12

    def denoise(tokens):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], vocab)
        positions = torch.arange(tokens.shape[1])
        logits[:, positions, 10 + positions] = 5.0 + positions.float()  # distinct confidences
        return logits

    from faircalib.models.base import DenoiserSpec

    spec = DenoiserSpec("test", mask, (), vocab, logit_shift=True, sampler="dream")
    prompt = torch.tensor([[1, 2, 3]])
    result = generate(denoise, prompt, DreamSampling(gen_length=length, steps=4, alg="maskgit_plus"), spec)
    expected = torch.arange(3, 3 + length) - 1 + 10
    assert result.generated[0].tolist() == expected.tolist()


def test_same_seed_same_output_and_seeds_differ(llada):
    sampling = LLaDASampling(gen_length=16, block_length=8, steps=8, temperature=1.0)
    a = generate(llada, PROMPT, sampling, llada.spec, seed=5)
    b = generate(llada, PROMPT, sampling, llada.spec, seed=5)
    c = generate(llada, PROMPT, sampling, llada.spec, seed=6)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_trajectory_records_teacher_statistics(llada):
    sampling = LLaDASampling(gen_length=8, block_length=8, steps=4)
    result = generate(llada, PROMPT[:1], sampling, llada.spec, record=True)
    step = result.trajectory.steps[0]
    probs = torch.softmax(llada(step.tokens), dim=-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(step.top1, top.indices[..., 0])
    torch.testing.assert_close(step.top1_prob, top.values[..., 0])
    torch.testing.assert_close(step.margin, top.values[..., 0] - top.values[..., 1])
    written = step.committed_tokens[step.committed]
    assert torch.equal(written, step.top1[step.committed])  # greedy: the commit is the argmax


# --- configuration and schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
        (dict(gen_length=12, block_length=4, steps=5), "not a multiple of the number of blocks 3"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(remasking="lowest"), "remasking must be one of"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
    ],
)
def test_llada_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLaDASampling(**kwargs)


def test_dream_config_errors():
    with pytest.raises(ConfigError, match="alg must be one of"):
        DreamSampling(alg="greedy")
    with pytest.raises(ConfigError, match="top_p must be in"):
        DreamSampling(top_p=0.0)


@pytest.mark.parametrize(
    "sampling",
    [LLaDASampling(gen_length=12, block_length=4, steps=6, cfg_scale=1.0), DreamSampling(alg="entropy", top_k=3)],
)
def test_sampling_and_schedule_round_trip_json(sampling):
    import json

    assert sampling_from_json_dict(json.loads(json.dumps(sampling.to_json_dict()))) == sampling
    schedule = plan(sampling, prompt_length=7)
    assert Schedule.from_json_dict(json.loads(json.dumps(schedule.to_json_dict()))) == schedule


def test_generate_rejects_bad_prompts(llada, dream):
    sampling = LLaDASampling(gen_length=4, block_length=4, steps=2)
    with pytest.raises(ConfigError, match="contains the mask token"):
        generate(llada, torch.tensor([[1, llada.spec.mask_token_id]]), sampling, llada.spec)
    with pytest.raises(ConfigError, match="must be in \\[0, 96\\)"):
        generate(llada, torch.tensor([[1, 500]]), sampling, llada.spec)
    with pytest.raises(ConfigError, match="does not fit a dream model"):
        generate(dream, torch.tensor([[1, 2]]), sampling, dream.spec)
    with pytest.raises(ConfigError, match="schedule is for prompt 3"):
        generate(llada, torch.tensor([[1, 2]]), sampling, llada.spec, schedule=plan(sampling, 3))
