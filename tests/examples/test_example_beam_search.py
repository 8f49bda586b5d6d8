"""examples/beam_search.py: its --tiny run learns to sort digit strings with every objective, and decoding the trained
models with ``soft_beam_search`` under ``no_grad`` equals a plain beam search written here, exactly."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("example_env")


def plain_beam_search(step, h, beam, max_len, bos, eos):
    """Textbook beam search (independent of the library): scores (0, −inf, …) at the start, candidates score +
    log-prob over beam × vocabulary flattened, ``torch.topk``; a finished hypothesis continues only with eos at its
    own score; stop when every hypothesis has finished."""
    batch = h.shape[0] // beam
    tokens = torch.full((batch * beam,), bos, dtype=torch.long)
    scores = torch.full((batch, beam), -math.inf)
    scores[:, 0] = 0.0
    seqs = torch.zeros(batch, beam, 0, dtype=torch.long)
    finished = torch.zeros(batch, beam, dtype=torch.bool)
    rows = torch.arange(batch).unsqueeze(-1)
    for _ in range(max_len):
        log_probs, h = step(tokens, h)
        vocab = log_probs.shape[-1]
        cand = scores.unsqueeze(-1) + log_probs.view(batch, beam, vocab)
        eos_only = torch.full((vocab,), -math.inf)
        eos_only[eos] = 0.0
        cand = torch.where(finished.unsqueeze(-1), scores.unsqueeze(-1) + eos_only, cand)
        values, idx = torch.topk(cand.view(batch, -1), beam)
        parent, token = idx // vocab, idx % vocab
        seqs = torch.cat([seqs[rows, parent], token.unsqueeze(-1)], -1)
        finished = finished[rows, parent] | (token == eos)
        h = h.view(batch, beam, -1)[rows, parent].reshape(batch * beam, -1)
        tokens, scores = token.flatten(), values
        if bool(finished.all()):
            break
    return seqs, scores


def test_beam_search_example_learns_and_decodes_exactly(tmp_path, capsys):
    from examples import beam_search

    out = beam_search.main(["--tiny", "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "exact match, beam 4" in printed and "ms / training step" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    for name, row in out["results"].items():
        # chance: a token is right with probability about 1/11, a whole sorted string essentially never
        assert row["tok4"][0] > 0.8, f"{name}: token accuracy {row['tok4'][0]:.3f} is not above 0.8 (chance ≈ 0.09)"
        assert row["em4"][0] > 0.5, f"{name}: exact match {row['em4'][0]:.3f} at beam 4 is not above 0.5"
    source = out["test_source"]
    for name, model in out["models"].items():
        for beam in (1, 4, 8):
            got = beam_search.decode(model, source, beam)
            with torch.no_grad():
                step, h = model.decoder_step(source, beam)
                ref_seqs, ref_scores = plain_beam_search(
                    step, h.repeat_interleave(beam, 0), beam, beam_search.MAX_LEN + 1, beam_search.BOS, beam_search.EOS
                )
            assert torch.equal(got.sequences, ref_seqs), (name, beam)
            assert torch.equal(got.scores, ref_scores), (name, beam)
