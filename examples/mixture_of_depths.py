"""Mixture-of-depths: a tiny causal transformer whose routed blocks process only some of the tokens.

Raposo et al. 2024, "Mixture-of-Depths": every other block runs on the top-k tokens of each sequence by a learnt
router score (capacity k / S), the other tokens skipping it through the residual stream; MoDification (Zhang et al.
2024) replaces the top-k by a threshold (threshold-p), so that the count adapts to the sequence. Here on a
synthetic language generated on the fly where only some tokens are predictable: random tokens and, at random places
(a rate drawn per sequence, so the number varies), a marker R_j whose next token is a copy of the token j places
before the marker (j = 1 or 2). Only the token after a marker can be predicted, and it takes attention; everywhere
else no compute helps. A 4-layer causal transformer (d_model 64, blocks 1 and 3 routed at capacity 0.5) is
compared: dense; MoD top-k with the soft top-k mask of ``softtopk.nn.DepthRouter`` (method ``"sigmoid"``); MoD
top-k as the paper (hard top-k, the router's score r_i multiplying the block's output); and threshold-p. The MoD
top-k models are also evaluated with their causal predictor's selection (the one usable when decoding, token by
token) instead of the non-causal top-k over the whole sequence.

Run: ``python -m examples.mixture_of_depths`` (``--tiny``: 2 layers, block 1 routed, 100 steps of 16 sequences;
``--seeds N``; results in docs/examples.md).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtopk.nn import DepthRouter

from . import _common

VOCAB = 16  # data tokens 0..15; the markers R_j follow
OFFSETS = (1, 2)  # R_j: the next token is the token j positions before the marker
SEQ = 32
D_MODEL, HEADS = 64, 4
CAPACITY = 0.5  # of the routed blocks (every other block, as the paper)
MARKER_RATE = (0.05, 0.35)  # the rate of markers, uniform per sequence: the number of predictable tokens varies

# name -> DepthRouter arguments (None: dense)
MODELS: dict[str, dict | None] = {
    "dense": None,
    "MoD top-k, soft (sigmoid)": {"method": "sigmoid", "temperature": 0.5, "causal": "predictor"},
    "MoD top-k, hard + r_i (paper)": {"method": "hard", "score": "logit", "causal": "predictor"},
    "MoD threshold-p": {"mode": "threshold", "method": "sigmoid", "temperature": 0.2, "threshold": 0.5},
}
BUDGET_WEIGHT = 10.0  # the coefficient of threshold-p's budget loss (mean soft mask − capacity)²


def batch(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(tokens (n, SEQ), predictable (n, SEQ − 1) bool: the targets that follow a marker).

    Random data tokens, and at random places (never two in a row, the rate drawn per sequence) a marker R_j
    followed by a copy of the token j places before the marker: only the tokens after a marker are predictable,
    and predicting them takes attention; the rest is noise, where no compute helps.
    """
    x = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    low, high = MARKER_RATE
    rate = low + (high - low) * torch.rand(n, 1, generator=generator)
    draw = torch.rand(n, SEQ, generator=generator) < rate
    which = torch.randint(0, len(OFFSETS), (n, SEQ), generator=generator)
    offsets, rows = torch.tensor(OFFSETS), torch.arange(n)
    marker = torch.zeros(n, SEQ, dtype=torch.bool)
    for t in range(max(OFFSETS), SEQ - 1):
        m = draw[:, t] & ~marker[:, t - 1]
        marker[:, t] = m
        src = x[rows, t - offsets[which[:, t]]]
        x[:, t] = torch.where(m, VOCAB + which[:, t], x[:, t])
        x[:, t + 1] = torch.where(m, src, x[:, t + 1])
    return x, marker[:, :-1]


def sinusoids(n: int, d: int) -> Tensor:
    """Fixed sinusoidal positions (learnt ones make the relative offsets slower to learn)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Block(nn.Module):
    """A pre-LN transformer block as the residual branch f(x) (its output excludes x), causal over its tokens."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if valid is not None:  # padding slots are no keys (but each slot still sees itself: no empty row)
            allowed = allowed & (valid[:, None, None, :] | torch.eye(s, dtype=torch.bool, device=x.device))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(b, s, d)
        h = x + self.proj(a)
        return h + self.mlp(self.ln2(h)) - x


class Transformer(nn.Module):
    """A causal transformer whose odd blocks are routed (``router_args``: a :class:`DepthRouter`'s) or dense."""

    def __init__(self, layers: int, router_args: dict | None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + len(OFFSETS), D_MODEL)
        self.register_buffer("pos", sinusoids(SEQ, D_MODEL))
        self.blocks = nn.ModuleList(Block(D_MODEL, HEADS) for _ in range(layers))
        self.routers = nn.ModuleDict()
        if router_args is not None:
            for i in range(1, layers, 2):
                self.routers[str(i)] = DepthRouter(D_MODEL, CAPACITY, **router_args)
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB + len(OFFSETS))
        self.masks: list[Tensor] = []  # the routed blocks' selections (B, S) of the last forward

    def forward(self, tokens: Tensor, causal: bool = False) -> tuple[Tensor, Tensor, float]:
        """(logits, auxiliary loss, fraction of the routed blocks' tokens selected); ``self.compute``: the blocks'
        token-slots relative to the dense model's (threshold-p and causal decoding pad to the batch's largest
        count, and that padding is computed too)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        aux, fractions, slots, self.masks = x.new_zeros(()), [], 0.0, []
        for i, block in enumerate(self.blocks):
            router = self.routers[str(i)] if str(i) in self.routers else None
            if router is None:
                x = x + block(x)
                slots += 1.0
                continue
            r = router(x, causal=causal)
            x = router.route(block, x, r, pass_valid=router.mode == "threshold" or causal)
            aux = aux + r.aux_loss + BUDGET_WEIGHT * r.budget_loss
            fractions.append(r.fraction.item())
            slots += r.indices.shape[1] / tokens.shape[1]
            self.masks.append(r.mask)
        self.compute = slots / len(self.blocks)
        return self.head(self.ln(x)), aux, (sum(fractions) / len(fractions) if fractions else 1.0)


def evaluate(model: Transformer, tokens: Tensor, predictable: Tensor, causal: bool = False) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits, _, fraction = model(tokens, causal=causal)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    out = {
        "loss": ce.mean().item(),
        "loss_pred": ce[predictable].mean().item(),
        "acc_pred": correct[predictable].float().mean().item(),
        "fraction": fraction,
        "compute": model.compute,
    }
    if model.masks:  # the share of the predictable positions (the markers) that the routed blocks process
        out["markers"] = torch.stack(model.masks)[:, :, :-1][:, predictable].float().mean().item()
    return out


def train(name: str, layers: int, steps: int, seed: int, bar, batch_size: int = 32, lr: float = 3e-3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(layers, MODELS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    for _ in range(steps):
        tokens, _ = batch(batch_size, gen)
        logits, aux, _ = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
    return model


def step_times(models: dict[str, Transformer], batch_size: int, rounds: int) -> dict[str, float]:
    """ms per training step (forward + backward) of each model on one batch: the fastest of ``rounds`` rounds that
    alternate the models, so that other work on a shared machine slows them alike and the minimum is rarely hit."""
    tokens, _ = batch(batch_size, torch.Generator().manual_seed(0))
    best = dict.fromkeys(models, math.inf)
    for _ in range(rounds):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            logits, aux, _ = model(tokens)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
            loss.backward()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
            model.zero_grad(set_to_none=True)
    return best


def main(argv: Sequence[str] | None = None) -> dict:
    args = _common.parse_args("mixture_of_depths", __doc__.split("\n\n")[0], argv)
    steps, layers, lr, size = (100, 2, 6e-3, 16) if args.tiny else (300, 4, 3e-3, 32)
    bar = _common.progress(args.seeds * len(MODELS) * steps, "mixture of depths", unit="step")

    def run(seed: int) -> dict[str, dict[str, float]]:
        test = batch(256 if args.tiny else 1024, torch.Generator().manual_seed(10_000 + seed))
        rows, models = {}, {}
        for name in MODELS:
            bar.set_postfix_str(f"{name}, seed {seed}")
            models[name] = model = train(name, layers, steps, seed, bar, batch_size=size, lr=lr)
            rows[name] = evaluate(model, *test)
            if MODELS[name] is not None and MODELS[name].get("causal"):
                causal = evaluate(model, *test, causal=True)
                rows[name].update({f"causal_{key}": val for key, val in causal.items()})
        for name, ms in step_times(models, size, rounds=5 if args.tiny else 15).items():
            rows[name]["ms"] = ms
        return rows

    with _common.Timer("mixture_of_depths"):
        results = _common.run_seeds(args.seeds, run)
        bar.close()
    columns = [
        ("loss", "test loss", ".3f"),
        ("loss_pred", "loss, copied tokens", ".3f"),
        ("acc_pred", "accuracy, copied tokens", ".3f"),
        ("fraction", "routed blocks: tokens processed", ".2f"),
        ("markers", "markers processed", ".2f"),
        ("compute", "block compute vs dense", ".2f"),
        ("ms", "ms / step", ".1f"),
        ("causal_loss_pred", "causal decoding: loss, copied", ".3f"),
        ("causal_acc_pred", "causal decoding: accuracy, copied", ".3f"),
        ("causal_fraction", "causal decoding: tokens processed", ".2f"),
    ]
    print(f"\n### marker-copy task, {layers} layers (every other one routed), unigram loss {math.log(VOCAB):.3f}\n")
    print(_common.format_table(results, columns, first="model", n_seeds=args.seeds))
    if args.plot is not None:
        _plot(results, args.plot)
    return {"results": results, "unigram": math.log(VOCAB)}


def _plot(results: _common.Results, path) -> None:
    names = list(results)
    ypos = np.arange(len(names))
    fig, axes = _common.plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    for j, (key, label) in enumerate((("loss_pred", "top-k / threshold selection"),
                                      ("causal_loss_pred", "causal predictor's selection"))):  # fmt: skip
        ms = [_common.mean_std(results[n][key]) if key in results[n] else (np.nan, 0.0) for n in names]
        axes[0].barh(ypos + (j - 0.5) * 0.38, [m for m, _ in ms], 0.38, xerr=[s for _, s in ms], label=label)
    axes[0].axvline(math.log(VOCAB), color="gray", ls="--", lw=1, label="unigram (uniform)")
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("test loss on the copied tokens (mean ± std over seeds)")
    axes[0].legend(loc="lower right", fontsize=8)
    for n, y in zip(names, ypos):
        ms = _common.mean_std(results[n]["ms"])
        compute = _common.mean(results[n]["compute"])
        axes[1].barh(y, ms[0], 0.6, xerr=ms[1], color="C2" if compute < 1 else "C7")
        axes[1].text(ms[0] + ms[1], y, f"  block compute {compute:.2f}", va="center", fontsize=8)
    axes[1].set_yticks(ypos, [""] * len(names))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("ms per training step (fastest of interleaved rounds)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
