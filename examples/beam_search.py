"""Relaxed beam search: a GRU encoder-decoder with attention learns to sort digit strings, trained with teacher
forcing, then fine-tuned through beam search whose top-k is soft (SOFT / a sorting network), straight-through
(BT-Cell's hard top-k with soft weights) or hard.

Xie et al. 2020, "Differentiable Top-k with Optimal Transport" (SOFT), section 5.3: beam search inside training,
its top-k over beam × vocabulary replaced by a soft sorted top-k Γ, so that the next states (and token embeddings)
are Γ-mixtures of the candidates' and the gradient reaches the selection; Ray Chowdhury & Caragea 2023 (BT-Cell):
the hard top-k selects, and soft weights over the kept beams carry the gradient. ``softtopk.nn.soft_beam_search``
does both; at test time it is plain beam search.

The task, generated on the fly: a string of 4 to 9 digits → the same digits sorted, then EOS. Every seed first
trains the model with teacher forcing (cross-entropy; 100 Adam steps of 64 strings, lr 3e-3), then continues from
that one checkpoint for 60 steps (lr 1e-3) with each objective: (a) teacher forcing only; (b)–(d) teacher forcing
plus the sequence-level risk of a beam of 4 decoded in training, Σ_j w_j · err_j, w = softmax of the beam's
scores and err_j the fraction of wrong tokens of hypothesis j, read from its soft tokens: Γ-mixtures of SOFT's
soft sorted top-k for (b), one-hot with the straight-through gradient of a sigmoid top-k mask for (c, BT-Cell),
plain one-hot for (d), whose gradient reaches only the kept hypotheses' scores (minimum-risk training on the
beam). Reported: exact match and token accuracy of plain beam search at beam 1, 4 and 8 on 1000 held-out
strings, and the time of a training step.

Run: ``python -m examples.beam_search`` (``--tiny``, ``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtopk.nn import soft_beam_search

from . import _common

DIGITS, EOS, BOS = 10, 10, 11  # target tokens 0-9 and EOS; BOS is fed only
VOCAB = 12  # the decoder's input vocabulary (digits, EOS, BOS); it predicts the first 11
MIN_LEN, MAX_LEN = 4, 9
BEAM_TRAIN, BEAMS_TEST = 4, (1, 4, 8)
RISK_WEIGHT = 1.0
# the objectives after the shared teacher-forcing phase: soft_beam_search's keyword arguments (None: CE only)
CONFIGS = {
    "teacher forcing (CE)": None,
    "CE + soft beam risk, SOFT (Γ-mixed)": {"method": "sinkhorn", "epsilon": 0.05},
    "CE + straight-through beam risk (BT-Cell)": {"method": "hard_soft_weights", "temperature": 0.5},
    "CE + hard beam risk (MRT on the beam)": {"method": "hard"},
}


def batch_of(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(source (n, MAX_LEN) digits padded with -1, target (n, MAX_LEN + 1) sorted digits then EOS-padded, lengths)."""
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=g)
    digits = torch.randint(0, DIGITS, (n, MAX_LEN), generator=g)
    valid = torch.arange(MAX_LEN) < lengths.unsqueeze(-1)
    source = torch.where(valid, digits, -1)
    target = torch.full((n, MAX_LEN + 1), EOS)
    target[:, :MAX_LEN] = torch.where(valid, digits, DIGITS + 100).sort(-1).values.masked_fill(~valid, EOS)
    return source, target, lengths


class Seq2Seq(nn.Module):
    """A GRU encoder and a GRU decoder with Luong (dot-product) attention; ``step`` is one decoding step."""

    def __init__(self, hidden: int = 64, emb: int = 32):
        super().__init__()
        self.src_emb = nn.Embedding(DIGITS + 1, emb)  # the last row pads
        self.encoder = nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.keys = nn.Linear(2 * hidden, hidden, bias=False)
        self.tgt_emb = nn.Parameter(0.3 * torch.randn(VOCAB, emb))
        self.decoder = nn.GRU(emb, hidden, batch_first=True)
        self.out = nn.Sequential(nn.Linear(hidden + 2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, EOS + 1))

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's initial state: (h (B, H), encoder outputs (B, S, 2H), padding mask (B, S))."""
        pad = source < 0
        enc, _ = self.encoder(self.src_emb(source.masked_fill(pad, DIGITS)))
        mean = (enc * (~pad).unsqueeze(-1)).sum(1) / (~pad).sum(1, keepdim=True)
        return torch.tanh(self.bridge(mean)), enc, pad

    def logits(self, dec: Tensor, enc: Tensor, pad: Tensor) -> Tensor:
        att = (self.keys(enc) @ dec.transpose(1, 2)).masked_fill(pad.unsqueeze(-1), -math.inf).softmax(1)
        context = att.transpose(1, 2) @ enc  # (B, T, 2H)
        return self.out(torch.cat([dec, context], -1))

    def teacher_forcing(self, source: Tensor, target: Tensor) -> Tensor:
        h, enc, pad = self.encode(source)
        inputs = torch.cat([torch.full_like(target[:, :1], BOS), target[:, :-1]], 1)
        dec, _ = self.decoder(self.tgt_emb[inputs], h.unsqueeze(0).contiguous())
        return F.cross_entropy(self.logits(dec, enc, pad).flatten(0, 1), target.flatten())

    def decoder_step(self, source: Tensor, beam: int):
        """(step, initial state) for ``softtopk.nn.soft_beam_search``: the state is the decoder's hidden state (B, H)
        alone; the encoder outputs, the same for the K hypotheses of an input, stay outside it (in the closure,
        repeated K times) so that the search does not reorder them at every step."""
        h, enc, pad = self.encode(source)
        enc, pad = enc.repeat_interleave(beam, 0), pad.repeat_interleave(beam, 0)

        def step(tokens: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
            # token ids, or (B·K, 11) token distributions with soft_tokens=True (their mixture of embeddings)
            e = tokens @ self.tgt_emb[: tokens.shape[-1]] if tokens.dtype.is_floating_point else self.tgt_emb[tokens]
            dec, h_new = self.decoder(e.unsqueeze(1), h.unsqueeze(0).contiguous())
            return self.logits(dec, enc, pad)[:, 0].log_softmax(-1), h_new[0]

        return step, h


def beam_risk(beams, target: Tensor) -> Tensor:
    """Σ_j w_j err_j: err_j the expected fraction of wrong tokens of hypothesis j (its soft tokens against the
    target, over the target's MAX_LEN + 1 positions; a search that stopped early is padded with EOS)."""
    soft = beams.soft_tokens  # (B, K, L, V)
    missing = target.shape[1] - soft.shape[2]
    if missing > 0:
        pad = F.one_hot(torch.full(soft.shape[:2] + (missing,), EOS), soft.shape[-1]).to(soft.dtype)
        soft = torch.cat([soft, pad], 2)
    hit = soft.gather(-1, target.unsqueeze(1).expand(-1, soft.shape[1], -1).unsqueeze(-1)).squeeze(-1)
    err = 1.0 - hit.mean(-1)
    return (beams.weights * err).sum(-1).mean()


def train(
    model: Seq2Seq, config: dict | None, steps: int, g: torch.Generator, bar, lr: float, batch: int = 64
) -> float:
    """``steps`` Adam steps; returns the seconds per step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        source, target, _ = batch_of(batch, g)
        loss = model.teacher_forcing(source, target)
        if config is not None:
            step, h = model.decoder_step(source, BEAM_TRAIN)
            beams = soft_beam_search(step, h, beam_size=BEAM_TRAIN, max_len=MAX_LEN + 1, bos=BOS, eos=EOS,
                                     soft_tokens=True, training=True, **config)  # fmt: skip
            loss = loss + RISK_WEIGHT * beam_risk(beams, target)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def decode(model: Seq2Seq, source: Tensor, beam: int):
    """Plain beam search (``soft_beam_search`` under ``no_grad`` is exactly that)."""
    model.eval()
    step, h = model.decoder_step(source, beam)
    return soft_beam_search(step, h, beam_size=beam, max_len=MAX_LEN + 1, bos=BOS, eos=EOS)


def accuracy(model: Seq2Seq, test: tuple[Tensor, Tensor, Tensor], beam: int) -> tuple[float, float]:
    """(exact match, token accuracy) of the best hypothesis, over the target's positions up to its EOS."""
    source, target, lengths = test
    best = decode(model, source, beam).sequences[:, 0]
    if best.shape[1] < target.shape[1]:
        best = F.pad(best, (0, target.shape[1] - best.shape[1]), value=EOS)
    counted = torch.arange(target.shape[1]) <= lengths.unsqueeze(-1)
    right = (best == target) | ~counted
    tokens = ((best == target) & counted).sum() / counted.sum()
    return right.all(-1).float().mean().item(), tokens.item()


def run_seed(seed: int, pre_steps: int, steps: int, n_test: int, bar) -> tuple[dict, dict[str, Seq2Seq]]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    test = batch_of(n_test, torch.Generator().manual_seed(10_000 + seed))
    base = Seq2Seq()
    bar.set_postfix_str(f"teacher forcing, seed {seed}")
    train(base, None, pre_steps, g, bar, lr=3e-3)
    rows, models = {}, {}
    for name, config in CONFIGS.items():
        bar.set_postfix_str(f"{name}, seed {seed}")
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        sec = train(model, config, steps, torch.Generator().manual_seed(seed + 1), bar, lr=1e-3)
        row = {"ms": 1000 * sec}
        for beam in BEAMS_TEST:
            row[f"em{beam}"], row[f"tok{beam}"] = accuracy(model, test, beam)
        rows[name], models[name] = row, model
    return rows, models


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("beam_search", __doc__.split("\n\n")[0], argv)
    pre_steps, steps, n_test = (100, 5, 200) if args.tiny else (100, 60, 1000)
    bar = _common.progress(args.seeds * (pre_steps + len(CONFIGS) * steps), "beam search", unit="step")
    models: dict[str, Seq2Seq] = {}
    with _common.Timer("beam_search"):

        def run(seed: int) -> dict[str, dict[str, float]]:
            rows, trained = run_seed(seed, pre_steps, steps, n_test, bar)
            if seed == 0:
                models.update(trained)
            return rows

        results = _common.run_seeds(args.seeds, run)
        bar.close()
    columns = [(f"em{b}", f"exact match, beam {b}", ".3f") for b in BEAMS_TEST]
    columns += [("tok4", "token accuracy, beam 4", ".3f"), ("ms", "ms / training step", ".0f")]
    print(f"\n### sorting {MIN_LEN}-{MAX_LEN} digits: plain beam search on {n_test} test strings\n")
    print(_common.format_table(results, columns, first="training objective (after the shared CE phase)",
                               n_seeds=args.seeds))  # fmt: skip
    if args.plot is not None:
        _plot(results, args.plot)
    test = batch_of(64, torch.Generator().manual_seed(123))
    return {"results": results, "models": models, "test_source": test[0]}


def _plot(results: _common.Results, path) -> None:
    fig, axes = _common.plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    names = list(results)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ms = [_common.mean_std(results[name][f"em{b}"]) for b in BEAMS_TEST]
        xs = np.arange(len(BEAMS_TEST)) + (i - (len(names) - 1) / 2) * width
        axes[0].bar(xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], label=name)
    axes[0].set_xticks(np.arange(len(BEAMS_TEST)), [f"beam {b}" for b in BEAMS_TEST])
    axes[0].set_ylabel("exact match (test, mean ± std over seeds)")
    low = min(_common.mean(results[n][f"em{b}"]) for n in names for b in BEAMS_TEST)
    axes[0].set_ylim(max(0.0, low - 0.1), 1.0)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].grid(axis="y", alpha=0.3)
    ms = [_common.mean(results[n]["ms"]) for n in names]
    axes[1].barh(np.arange(len(names)), ms, color=[f"C{i}" for i in range(len(names))])
    axes[1].set_yticks(np.arange(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("ms per training step (batch 64)")
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
