"""Linear-chain CRF and BIO-constrained decoding, checked against brute force over all label paths."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.func import functional_call

from bp_apps.text.labeling.crf import CRF, _log_partition, bio_constraints, constrained_decode, viterbi_decode

BIO = ["O", "B-A", "I-A", "B-B", "I-B"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def all_paths(num_labels: int, steps: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_labels), repeat=steps)))


def path_scores(paths, emissions, transitions, start, end) -> torch.Tensor:
    """Scores of the paths ``[P, T]`` for one sentence ``emissions[T, L]``."""
    score = emissions[torch.arange(paths.shape[1]), paths].sum(1) + start[paths[:, 0]] + end[paths[:, -1]]
    return score + transitions[paths[:, :-1], paths[:, 1:]].sum(1)


def is_valid_bio(tags: list[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return False
        previous = tag
    return True


def random_crf(labels, constrain=True, seed=0) -> CRF:
    generator = torch.Generator().manual_seed(seed)
    crf = CRF(labels, constrain=constrain).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return crf


def valid_paths(paths, labels):
    keep = torch.tensor([is_valid_bio([labels[i] for i in path]) for path in paths.tolist()])
    return paths[keep]


def test_bio_constraints_rules():
    start, allowed, end = bio_constraints(["O", "B-A", "I-A", "B-ARGM-TMP", "I-ARGM-TMP", "I-C-ARG1"])
    assert start.tolist() == [True, True, False, True, False, False]
    assert end.all()
    # Column j: which labels may precede label j.
    assert allowed[:, 2].tolist() == [False, True, True, False, False, False]
    assert allowed[:, 4].tolist() == [False, False, False, True, True, False]
    assert allowed[:, 5].tolist() == [False, False, False, False, False, True]  # I-C-ARG1 without B-C-ARG1
    for j in (0, 1, 3):
        assert allowed[:, j].all()
    start, allowed, end = bio_constraints(["O", "COMMA|C", "PERIOD|U"])
    assert start.all() and allowed.all() and end.all()


@pytest.mark.parametrize("num_labels", [3, 4, 5])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_log_likelihood_and_viterbi_match_brute_force(num_labels, steps):
    crf = random_crf(list("abcde")[:num_labels], constrain=True, seed=num_labels * 10 + steps)  # non-BIO: no rules
    emissions = torch.randn(1, steps, num_labels, dtype=torch.float64)
    mask = torch.ones(1, steps, dtype=torch.bool)
    paths = all_paths(num_labels, steps)
    scores = path_scores(paths, emissions[0], crf.transitions, crf.start, crf.end)
    gold = paths[torch.randint(len(paths), ())]
    expected = scores[(paths == gold).all(1)][0] - torch.logsumexp(scores, 0)
    assert crf.log_likelihood(emissions, gold[None], mask).item() == pytest.approx(expected.item(), abs=1e-10)
    assert crf.decode(emissions, mask) == [paths[scores.argmax()].tolist()]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_constrained_partition_and_decoding_use_only_valid_paths(steps):
    crf = random_crf(BIO, seed=steps)
    with torch.no_grad():
        crf.transitions[1, 4] += 5.0  # make the forbidden B-A -> I-B attractive
        crf.start[2] += 5.0  # and starting with I-A
    paths = valid_paths(all_paths(len(BIO), steps), BIO)
    for seed in range(3):
        emissions = torch.randn(1, steps, len(BIO), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(1, steps, dtype=torch.bool)
        scores = path_scores(paths, emissions[0], crf.transitions, crf.start, crf.end)
        gold = paths[-1]
        expected = scores[-1] - torch.logsumexp(scores, 0)
        assert crf.log_likelihood(emissions, gold[None], mask).item() == pytest.approx(expected.item(), abs=1e-10)
        assert crf.decode(emissions, mask) == [paths[scores.argmax()].tolist()]


@pytest.mark.parametrize(
    ("labels", "gold"), [(BIO, [1, 2, 0, 3, 4, 4]), (["I-A", "B-A", "O", "I-B", "B-B"], [1, 0, 2, 4, 3, 3])]
)
def test_variable_length_batch_equals_sentences_alone(labels, gold):
    crf = random_crf(labels, seed=3)
    lengths = [6, 1, 3, 2, 5, 1, 4, 2, 3, 1, 6, 2]
    emissions = torch.randn(len(lengths), 6, len(labels), dtype=torch.float64)
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]
    tags = torch.tensor(gold).expand(len(lengths), 6).masked_fill(~mask, -100)
    emissions[~mask] = 1e3  # padding must not leak into the results
    batched = crf.log_likelihood(emissions, tags, mask)
    decoded = crf.decode(emissions, mask)
    for b, n in enumerate(lengths):
        alone = crf.log_likelihood(emissions[b : b + 1, :n], tags[b : b + 1, :n], mask[b : b + 1, :n])
        assert batched[b].item() == pytest.approx(alone.item(), abs=1e-12)
        assert decoded[b] == crf.decode(emissions[b : b + 1, :n], mask[b : b + 1, :n])[0]
        assert len(decoded[b]) == n


def test_decoded_paths_are_valid_bio_for_random_scores():
    crf = random_crf(BIO, seed=5)
    with torch.no_grad():
        crf.transitions.mul_(10)
    emissions = 3 * torch.randn(64, 7, len(BIO), dtype=torch.float64)
    mask = torch.ones(64, 7, dtype=torch.bool)
    mask[::2, 5:] = False
    for path in crf.decode(emissions, mask) + constrained_decode(emissions, mask, BIO):
        assert is_valid_bio([BIO[i] for i in path])
    # The unconstrained argmax is invalid for many of these sentences, so the constraint did work.
    assert not all(is_valid_bio([BIO[i] for i in row]) for row in emissions.argmax(-1).tolist())


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_constrained_decode_picks_best_valid_path(steps):
    scores = torch.randn(5, steps, len(BIO), dtype=torch.float64).log_softmax(-1)
    mask = torch.ones(5, steps, dtype=torch.bool)
    paths = valid_paths(all_paths(len(BIO), steps), BIO)
    zeros = torch.zeros(len(BIO), len(BIO), dtype=torch.float64)
    expected = [paths[path_scores(paths, s, zeros, zeros[0], zeros[0]).argmax()].tolist() for s in scores]
    assert constrained_decode(scores, mask, BIO) == expected


def test_constrained_decode_is_argmax_for_non_bio_labels():
    labels = ["O", "COMMA|C", "PERIOD|U", "QUESTION|C"]
    scores = torch.randn(3, 6, len(labels), dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    best = scores.argmax(-1).tolist()
    assert constrained_decode(scores, mask, labels) == [best[0], best[1][:4], best[2][:1]]


def test_viterbi_decode_respects_minus_inf_moves():
    emissions = torch.tensor([[[0.0, 5.0], [0.0, 5.0], [0.0, 5.0]]])
    transitions = torch.tensor([[0.0, 0.0], [0.0, float("-inf")]])  # 1 -> 1 forbidden
    start = torch.tensor([float("-inf"), 0.0])
    best = viterbi_decode(emissions, torch.ones(1, 3, dtype=torch.bool), transitions, start, torch.zeros(2))
    assert best == [[1, 0, 1]]


def test_gradcheck_nll():
    crf = random_crf(BIO, seed=7)
    emissions = torch.randn(2, 3, len(BIO), dtype=torch.float64, requires_grad=True)
    tags = torch.tensor([[1, 2, 0], [3, 4, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    params = tuple(p.detach().clone().requires_grad_() for p in (crf.transitions, crf.start, crf.end))

    def loss(emissions, transitions, start, end):
        values = {"transitions": transitions, "start": start, "end": end}
        return -functional_call(crf, values, (emissions, tags, mask)).sum()

    assert torch.autograd.gradcheck(loss, (emissions, *params))


def test_noisy_gold_path_gives_finite_loss_and_gradients():
    crf = random_crf(BIO, seed=8)
    unconstrained = random_crf(BIO, constrain=False, seed=8)
    emissions = torch.randn(2, 3, len(BIO), dtype=torch.float64, requires_grad=True)
    tags = torch.tensor([[0, 4, 4], [1, 2, 0]])  # first sentence: O I-B I-B breaks the BIO rules
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = crf.nll(emissions, tags, mask, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (emissions.grad, crf.transitions.grad, crf.start.grad, crf.end.grad):
        assert torch.isfinite(grad).all()
    per_sentence = -crf.log_likelihood(emissions, tags, mask)
    free = -unconstrained.log_likelihood(emissions, tags, mask)
    assert per_sentence[0].item() == pytest.approx(free[0].item())  # constraints dropped for the noisy sentence
    assert 0 < per_sentence[1].item() < free[1].item()  # and applied (smaller partition) for the valid one


def test_nll_reductions():
    crf = random_crf(BIO, seed=9)
    emissions = torch.randn(2, 3, len(BIO), dtype=torch.float64)
    tags = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    per_sentence = -crf.log_likelihood(emissions, tags, mask)
    assert crf.nll(emissions, tags, mask).item() == pytest.approx(per_sentence.mean().item())
    assert crf.nll(emissions, tags, mask, reduction="sum").item() == pytest.approx(per_sentence.sum().item())
    assert crf.nll(emissions, tags, mask, reduction="token_mean").item() == pytest.approx(per_sentence.sum().item() / 4)
    with pytest.raises(ValueError, match="reduction"):
        crf.nll(emissions, tags, mask, reduction="none")


def test_input_checks():
    crf = CRF(BIO)
    with pytest.raises(ValueError, match="left-aligned"):
        crf.decode(torch.zeros(1, 3, len(BIO)), torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="at least one token"):
        crf.decode(torch.zeros(1, 2, len(BIO)), torch.tensor([[False, False]]))
    with pytest.raises(ValueError, match="emissions"):
        crf.decode(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))


def test_float32_agrees_with_float64_and_state_dict_round_trip():
    crf = random_crf(BIO, seed=10)
    emissions = torch.randn(3, 5, len(BIO), dtype=torch.float64)
    tags = torch.tensor([[1, 2, 2, 0, 3]] * 3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    expected = crf.log_likelihood(emissions, tags, mask)
    single = copy.deepcopy(crf).float()
    assert single.allowed.dtype == torch.bool and single.transitions.dtype == torch.float32
    assert torch.allclose(single.log_likelihood(emissions.float(), tags, mask).double(), expected, atol=1e-4)

    assert set(crf.state_dict()) == {"transitions", "start", "end"}
    restored = CRF(BIO).double()
    restored.load_state_dict(crf.state_dict())
    assert restored.decode(emissions, mask) == crf.decode(emissions, mask)
    assert torch.equal(restored.log_likelihood(emissions, tags, mask), crf.log_likelihood(emissions, tags, mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    crf = random_crf(BIO, seed=11)
    emissions = torch.randn(4, 6, len(BIO), dtype=torch.float64)
    tags = torch.randint(len(BIO), (4, 6))
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 5])[:, None]
    expected = crf.log_likelihood(emissions, tags, mask)
    gpu = crf.to("cuda")
    assert gpu.allowed.is_cuda
    got = gpu.log_likelihood(emissions.cuda(), tags.cuda(), mask.cuda())
    assert torch.allclose(got.cpu(), expected)
    assert gpu.decode(emissions.cuda(), mask.cuda()) == crf.cpu().decode(emissions, mask)


def test_sgd_training_learns_transitions():
    labels = ["A", "B", "C"]
    crf = CRF(labels).double()
    tags = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 0, 0], [0, 1, 2, 0, 1, 0]])
    emissions = torch.zeros(3, 6, 3, dtype=torch.float64)  # uninformative: the order must come from transitions
    mask = torch.ones(3, 6, dtype=torch.bool)
    optimizer = torch.optim.SGD(crf.parameters(), lr=0.5)
    initial = crf.nll(emissions, tags, mask).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = crf.nll(emissions, tags, mask)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * initial
    assert crf.start.argmax().item() == 0
    assert crf.transitions[0].argmax().item() == 1 and crf.transitions[1].argmax().item() == 2
    assert crf.decode(emissions[:1, :4], mask[:1, :4]) == [[0, 1, 2, 0]]



def _logsumexp_partition(alpha, transitions, emissions, mask, end):
    """The textbook forward recursion: a [B, L, L] logsumexp per step."""
    for t in range(1, emissions.shape[1]):
        nxt = torch.logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t]
        alpha = torch.where(mask[:, t].unsqueeze(1), nxt, alpha)
    return torch.logsumexp(alpha + end, dim=1)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_matrix_product_partition_matches_logsumexp_recursion(scale):
    # Large emission scores (40) underflow most labels' mass in probability space: the shifted matrix products
    # must still agree with the log-space recursion, with the constraint penalties, and keep gradients finite.
    torch.manual_seed(3)
    labels = ["O", "B-A", "I-A", "B-B", "I-B", "B-C", "I-C"]
    start_ok, allowed, end_ok = bio_constraints(labels)
    transitions = (torch.randn(6, 7, 7) * 2 + (~allowed).float() * -1.0e4).requires_grad_()
    start = torch.randn(6, 7) + (~start_ok).float() * -1.0e4
    end = torch.randn(6, 7) + (~end_ok).float() * -1.0e4
    emissions = (torch.randn(6, 30, 7) * scale).requires_grad_()
    mask = torch.arange(30)[None] < torch.tensor([30, 29, 17, 5, 2, 1])[:, None]
    alpha = start + emissions[:, 0]
    fast = _log_partition(alpha, transitions, emissions, mask, end)
    reference = _logsumexp_partition(alpha.double(), transitions.double(), emissions.double(), mask, end.double())
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=1e-4)
    fast.sum().backward()
    assert torch.isfinite(emissions.grad).all() and torch.isfinite(transitions.grad).all()
    # the gradient of log Z w.r.t. the emissions is the label marginals: each real token's row sums to 1
    torch.testing.assert_close(emissions.grad.sum(-1), mask.float(), rtol=1e-4, atol=1e-4)
