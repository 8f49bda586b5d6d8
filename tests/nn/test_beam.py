"""softtopk.nn.soft_beam_search: inference is plain beam search exactly (against an independent loop written here),
beam 1 is greedy decoding, EOS handling, shapes and dtypes, gradients in training, gradcheck, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from softtopk.nn import BEAM_METHODS, Beams, soft_beam_search

SOFT_METHODS = ["sinkhorn", "bitonic", "odd_even", "hard_soft_weights"]
V, H = 7, 5


class TinyLM(nn.Module):
    """A random recurrent LM: h' = tanh(E[token] + h W), log p = log_softmax(h' U). Takes token ids or (soft)
    token distributions."""

    def __init__(self, seed=0, dtype=torch.float64, vocab=V, scale=2.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, H, generator=g, dtype=dtype))
        self.w = nn.Parameter(torch.randn(H, H, generator=g, dtype=dtype) / math.sqrt(H))
        self.u = nn.Parameter(scale * torch.randn(H, vocab, generator=g, dtype=dtype))

    def forward(self, tokens, h):
        e = tokens @ self.emb if tokens.dtype.is_floating_point else self.emb[tokens]
        h = torch.tanh(e + h @ self.w)
        return torch.log_softmax(h @ self.u, dim=-1), h


def initial_state(batch=3, seed=1, dtype=torch.float64):
    return torch.randn(batch, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plain_beam_search(step, h, beam, max_len, bos, eos):
    """Textbook beam search, written independently: the K hypotheses start equal with scores (0, −inf, …), the
    candidates are score + log-prob over beam × vocabulary, flattened, ``torch.topk``; a finished hypothesis
    continues only with eos at its own score; stop when all are finished."""
    batch = h.shape[0]
    h = h.repeat_interleave(beam, 0)
    tokens = torch.full((batch * beam,), bos, dtype=torch.long)
    scores = torch.full((batch, beam), -math.inf, dtype=h.dtype)
    scores[:, 0] = 0.0
    seqs = torch.zeros(batch, beam, 0, dtype=torch.long)
    finished = torch.zeros(batch, beam, dtype=torch.bool)
    for _ in range(max_len):
        log_probs, h = step(tokens, h)
        vocab = log_probs.shape[-1]
        cand = scores.unsqueeze(-1) + log_probs.view(batch, beam, vocab)
        if eos is not None:
            eos_only = torch.full((vocab,), -math.inf, dtype=cand.dtype)
            eos_only[eos] = 0.0
            cand = torch.where(finished.unsqueeze(-1), scores.unsqueeze(-1) + eos_only, cand)
        values, idx = torch.topk(cand.view(batch, beam * vocab), beam)
        parent, token = idx // vocab, idx % vocab
        seqs = torch.cat([torch.stack([seqs[b, parent[b]] for b in range(batch)]), token.unsqueeze(-1)], -1)
        finished = torch.stack([finished[b, parent[b]] for b in range(batch)])
        if eos is not None:
            finished = finished | (token == eos)
        h = h.view(batch, beam, -1)[torch.arange(batch).unsqueeze(-1), parent].reshape(batch * beam, -1)
        tokens, scores = token.flatten(), values
        if eos is not None and bool(finished.all()):
            break
    return seqs, scores


def soft_kwargs(method, temperature=0.5):
    """The smoothing of a method: none for "hard", SOFT's ``epsilon`` for "sinkhorn", else ``temperature``."""
    if method == "hard":
        return {}
    return {"epsilon": 0.2 * temperature} if method == "sinkhorn" else {"temperature": temperature}


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("eos", [None, 2])
def test_inference_is_plain_beam_search_exactly(method, beam, eos):
    lm, h = TinyLM(seed=beam), initial_state()
    ref_seqs, ref_scores = plain_beam_search(lm, h, beam, 6, bos=0, eos=eos)
    with torch.no_grad():
        out = soft_beam_search(lm, h, beam_size=beam, max_len=6, bos=0, eos=eos, method=method, **soft_kwargs(method))
    assert torch.equal(out.sequences, ref_seqs)
    assert torch.equal(out.scores, ref_scores)
    # training=False with gradients enabled, and token distributions fed to the step: the same, exactly
    again = soft_beam_search(
        lm, h, beam_size=beam, max_len=6, bos=0, eos=eos, method=method, training=False, soft_tokens=True,
        **soft_kwargs(method),
    )  # fmt: skip
    assert torch.equal(again.sequences, ref_seqs) and torch.equal(again.scores.detach(), ref_scores)
    assert torch.equal(again.soft_tokens, nn.functional.one_hot(ref_seqs, V).to(torch.float64))


def test_beam_one_is_greedy():
    lm, h = TinyLM(seed=3), initial_state(batch=4)
    tokens, state, greedy, total = torch.zeros(4, dtype=torch.long), h, [], torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(5):
            log_probs, state = lm(tokens, state)
            total = total + log_probs.max(-1).values
            tokens = log_probs.argmax(-1)
            greedy.append(tokens)
        out = soft_beam_search(lm, h, beam_size=1, max_len=5, bos=0)
    assert torch.equal(out.sequences[:, 0], torch.stack(greedy, -1))
    torch.testing.assert_close(out.scores[:, 0], total)


def bigram(table):
    """A step from a fixed (V, V) table of logits: the state is unused."""

    def step(tokens, state):
        rows = tokens @ table if tokens.dtype.is_floating_point else table[tokens]
        return torch.log_softmax(rows, dim=-1), state

    return step


def test_eos_handling():
    # eos = 3 is likely everywhere: hypotheses finish, keep their score, are padded with eos; the search stops early
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, 3] += 2.5
    step = bigram(logits)
    out = soft_beam_search(step, torch.zeros(2, 1), beam_size=3, max_len=20, bos=0, eos=3, training=False)
    assert out.finished.all() and out.sequences.shape[-1] < 20
    lp = torch.log_softmax(logits, -1)
    for b in range(2):
        for j in range(3):
            seq = out.sequences[b, j].tolist()
            end = seq.index(3)
            assert all(tok == 3 for tok in seq[end:])
            prev, total = 0, 0.0
            for tok in seq[: end + 1]:
                total, prev = total + lp[prev, tok].item(), tok
            assert out.scores[b, j].item() == pytest.approx(total, abs=1e-12)
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])  # best first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", BEAM_METHODS)
def test_shapes_and_dtypes_in_training(method, dtype):
    lm, h = TinyLM(seed=0, dtype=dtype), initial_state(batch=2, dtype=dtype)
    state = (h, torch.arange(2))  # a tuple state with an integer tensor: it follows the hard parent
    step = lambda tokens, s: (lambda lp, hh: (lp, (hh, s[1])))(*lm(tokens, s[0]))  # noqa: E731
    out = soft_beam_search(step, state, beam_size=3, max_len=4, bos=0, eos=1, method=method, soft_tokens=True,
                           **soft_kwargs(method))  # fmt: skip
    assert isinstance(out, Beams)
    length = out.sequences.shape[-1]
    assert 1 <= length <= 4 and out.sequences.shape == (2, 3, length) and out.sequences.dtype == torch.long
    assert out.scores.shape == (2, 3) and out.scores.dtype == dtype and out.scores.requires_grad
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, dtype=dtype))
    assert out.finished.shape == (2, 3) and out.finished.dtype == torch.bool
    assert out.soft_tokens.shape == (2, 3, length, V) and out.soft_tokens.dtype == dtype
    torch.testing.assert_close(out.soft_tokens.sum(-1), torch.ones(2, 3, length, dtype=dtype))
    assert out.state[0].shape == (6, H) and torch.equal(out.state[1], torch.arange(2).repeat_interleave(3))


@pytest.mark.parametrize("method", ["sinkhorn", "bitonic", "odd_even"])
def test_small_temperature_gives_the_hard_beam(method):
    lm, h = TinyLM(seed=7, scale=4.0), initial_state(batch=2)
    ref_seqs, ref_scores = plain_beam_search(lm, h, 3, 4, bos=0, eos=None)
    out = soft_beam_search(lm, h, beam_size=3, max_len=4, bos=0, method=method, **soft_kwargs(method, 1e-3))
    assert torch.equal(out.sequences, ref_seqs)
    torch.testing.assert_close(out.scores.detach(), ref_scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", SOFT_METHODS)
def test_gradients_reach_the_step_and_unselected_candidates(method):
    """Expected cost over the beam through the soft tokens: the gradient reaches every parameter of the step, and
    (unlike the hard beam) log-probabilities of candidates that no hypothesis kept."""
    lm, h = TinyLM(seed=2), initial_state(batch=2)
    cost = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    kept = {}

    def step(tokens, state):
        log_probs, state = lm(tokens, state)
        log_probs.retain_grad()
        kept.setdefault("lp", []).append(log_probs)
        return log_probs, state

    out = soft_beam_search(step, h, beam_size=2, max_len=3, bos=0, method=method, soft_tokens=True,
                           **soft_kwargs(method, 1.0))  # fmt: skip
    loss = (out.weights.unsqueeze(-1) * (out.soft_tokens @ cost)).sum()
    loss.backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    first = kept["lp"][0].grad.view(2, 2, V)[:, 0]  # the first step's V candidates of each input
    chosen = out.sequences[:, :, 0]
    unselected = torch.ones_like(first, dtype=torch.bool).scatter(-1, chosen, False)
    assert first[unselected].abs().max() > 0


def test_hard_beam_gradient_only_on_the_kept_paths():
    logits = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    out = soft_beam_search(bigram(logits), torch.zeros(1, 1), beam_size=2, max_len=1, bos=0, method="hard")
    lp_grad = torch.autograd.grad(out.scores.sum(), logits)[0]
    # d/dlogits of log_softmax(row 0) at the two kept tokens: nonzero in row 0 only
    assert lp_grad[1:].abs().max() == 0 and lp_grad[0].abs().min() > 0
    first = soft_beam_search(bigram(logits), torch.zeros(1, 1), beam_size=2, max_len=1, bos=0, method="bitonic",
                             temperature=1.0)  # fmt: skip
    lp_first = torch.log_softmax(logits[0], -1).detach()
    soft_values = first.scores.detach()
    hard_values = torch.topk(lp_first, 2).values
    assert not torch.equal(soft_values, hard_values)  # the soft sorted values mix the candidates


@pytest.mark.parametrize("method", ["bitonic", "sinkhorn"])
def test_gradcheck_float64(method):
    opts = {"temperature": 0.7} if method == "bitonic" else {"epsilon": 0.3}
    cost = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base = torch.tensor([[0.0, 1.1, -0.6, 2.1], [0.5, -1.3, 1.7, 0.2], [1.9, 0.3, -0.9, -0.1], [0.8, 0.1, 1.2, -2.0]],
                        dtype=torch.float64)  # fmt: skip

    def objective(logits):
        out = soft_beam_search(bigram(logits), torch.zeros(1, 1), beam_size=2, max_len=2, bos=0, method=method,
                               soft_tokens=True, **opts)  # fmt: skip
        return (out.weights.unsqueeze(-1) * (out.soft_tokens @ cost)).sum() + out.scores.sum()

    assert gradcheck(objective, (base.clone().requires_grad_(),), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beam_size": 0}, ValueError, "`beam_size` must be a positive int"),
        ({"beam_size": 2.0}, TypeError, "`beam_size` must be an int"),
        ({"max_len": 0}, ValueError, "`max_len`"),
        ({"bos": -1}, ValueError, "`bos`"),
        ({"eos": "x"}, TypeError, "`eos`"),
        ({"method": "topk"}, ValueError, "unknown `method`"),
        ({"method": 3}, TypeError, "`method` must be a string"),
        ({"method": "hard", "temperature": 1.0}, TypeError, "method='hard' takes no `temperature`"),
        ({"method": "bitonic", "temperature": -1.0}, ValueError, "`temperature`"),
        ({"training": 1}, TypeError, "`training` must be a bool"),
        ({"soft_tokens": None}, TypeError, "`soft_tokens` must be a bool"),
        ({"candidates": 1}, ValueError, "`candidates` must be at least beam_size"),
        ({"method": "hard_soft_weights", "candidates": 4}, TypeError, "takes no `candidates`"),
        ({"method": "bitonic", "epsilon": 0.1}, TypeError, "takes no option `epsilon`"),
        ({"temperature": 0.5}, TypeError, "method='sinkhorn' .* takes no `temperature`"),
        ({"method": "hard_soft_weights", "mask_method": "nope"}, ValueError, "unknown `method`"),
        ({"beam_size": V + 1}, ValueError, "`beam_size`=8 exceeds the vocabulary size"),
        ({"eos": V}, ValueError, "`eos`=7 is not a token of the V=7"),
    ],
)
def test_argument_errors(kwargs, error, match):
    lm, h = TinyLM(), initial_state()
    args = {"beam_size": 2, "max_len": 3, "bos": 0, **kwargs}
    with pytest.raises(error, match=match) as info:
        soft_beam_search(lm, h, **args)
    assert "soft_beam_search" in str(info.value)


def test_bad_step_and_state():
    lm, h = TinyLM(), initial_state()
    with pytest.raises(TypeError, match="soft_beam_search: `step` must be callable"):
        soft_beam_search(None, h, beam_size=2, max_len=3, bos=0)
    with pytest.raises(TypeError, match="soft_beam_search: `state` must be a tensor"):
        soft_beam_search(lm, [h], beam_size=2, max_len=3, bos=0)
    with pytest.raises(ValueError, match="soft_beam_search: the tensors of `state` must share"):
        soft_beam_search(lambda t, s: lm(t, s[0]), (h, h[:2]), beam_size=2, max_len=3, bos=0)
    with pytest.raises(ValueError, match=r"soft_beam_search: `step` must return log_probs of shape"):
        soft_beam_search(lambda t, s: (torch.zeros(3, V), s), h, beam_size=2, max_len=3, bos=0)
    with pytest.raises(ValueError, match="soft_beam_search: `step` returned log_probs with NaN"):
        soft_beam_search(lambda t, s: (torch.full((6, V), math.nan), s), h, beam_size=2, max_len=3, bos=0)
