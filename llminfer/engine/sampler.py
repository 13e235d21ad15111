"""Logits -> next token for each sequence of a batch, each with its own SamplingParams.

Order, as in Hugging Face and vLLM: penalties on raw logits, then greedy argmax, or
temperature -> top-k / top-p / min-p filtering -> softmax -> draw with the request's generator.

Every stage runs on the whole batch at once (a step's cost must not grow with Python work per row); the only
per-row work is one uniform number from each seeded row's own generator, so a seeded row draws the same
token whatever else is in the batch (tests compare against a row-by-row sampler).

A row whose logits are not finite (NaN or +inf: broken weights, an overflow) gets an error instead of a
token; the other rows are sampled as if it were not there. Every later stage keeps finite rows finite:
the parameters are bounded by validation, and values are clamped where arithmetic could still overflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from llminfer.engine.sampling_params import SamplingParams
from llminfer.errors import NON_FINITE_LOGITS

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingInput:
    """One row of the batch: its params, its history (for penalties), and its random generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """logits: [V]. Repetition penalty over prompt+output; presence/frequency over output only."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(output_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return _clamp_overflow(logits)


def apply_penalties_batch(logits: torch.Tensor, rows: list[SamplingInput]) -> torch.Tensor:
    """logits: [B, V], one row per input: apply_penalties on every row at once. The histories become two
    scatters into [B, V] tables (tokens seen anywhere, tokens counted in the output); the arithmetic is
    apply_penalties' own, element for element, so both give the same bits."""
    batch, vocab = logits.shape
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device)[:, None]

    def history_table(histories: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        rows_of = torch.repeat_interleave(torch.arange(batch, device=device),
                                          torch.tensor([len(h) for h in histories], device=device))
        ids = torch.tensor(list(chain.from_iterable(histories)), dtype=torch.long, device=device)
        keep = ids < vocab
        rows_of, ids = rows_of[keep], ids[keep]
        table = torch.zeros(batch, vocab, dtype=dtype, device=device)
        return table.index_put_((rows_of, ids), torch.ones_like(ids, dtype=dtype), accumulate=True)

    params = [row.params for row in rows]
    repetition = column([p.repetition_penalty for p in params])
    seen = history_table([row.prompt_token_ids + row.output_token_ids for row in rows], logits.dtype) > 0
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen & (repetition != 1.0), penalised, logits)
    counts = history_table([row.output_token_ids for row in rows], logits.dtype)
    logits = logits - (column([p.frequency_penalty for p in params]) * counts
                       + column([p.presence_penalty for p in params]) * (counts > 0).to(logits.dtype))
    return _clamp_overflow(logits)


def _clamp_overflow(logits: torch.Tensor) -> torch.Tensor:
    """Logits pushed past float32's range become +-max, not inf: softmax of finite values is never NaN, and a
    token at -max (a masked one included) still gets probability 0 next to any real logit."""
    return logits.clamp(min=-_FLOAT32_MAX, max=_FLOAT32_MAX)


def _clamp_overflow_(logits: torch.Tensor) -> torch.Tensor:
    return logits.clamp_(min=-_FLOAT32_MAX, max=_FLOAT32_MAX)


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without the copy when rows are all of them (in order)."""
    return tensor if len(rows) == tensor.shape[0] else tensor[rows]


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] bool: no NaN, no +inf, and at least one token that is not -inf (masked). One reduction: the
    row maximum is NaN if any logit is (amax propagates NaN), +inf if one is, -inf if all are (1.5 ms -> 30 us a
    step over SmolLM2's 49152 logits, where the element-wise version made five passes)."""
    return torch.isfinite(logits.amax(dim=-1))


# Ranking a whole row means sorting it (SmolLM2, batch 64: 200 ms for 49152 logits a row, more than the
# model's step), so rows are ranked only as deep as they need with topk: their top-k, or for top-p alone these
# many candidates, which is exact when they already hold top_p of the mass (tokens past them are cut anyway);
# rows they do not cover, and top-k over a large share of the vocabulary, still sort.
TOP_P_CANDIDATES = 256
_TOPK_SHARE = 8


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside top-k, outside the top-p nucleus, or below min_p * max prob.

    logits: [B, V] (already temperature-scaled); top_k: [B] (0 = off), top_p: [B], min_p: [B].
    The most likely token always survives. Which way a row is ranked (not at all for min-p alone, topk, or a
    full sort) depends on that row alone, so batching never changes its result.
    """
    vocab = logits.shape[-1]
    small_k = (top_k > 0) & (top_k < vocab // _TOPK_SHARE)
    nucleus_only = (top_k == 0) & (top_p < 1) & (vocab > TOP_P_CANDIDATES)
    min_p_only = (top_k == 0) & (top_p >= 1)
    shallow = small_k | nucleus_only
    parts = []  # (rows, their filtered logits)
    if bool(min_p_only.any()):
        rows = _where(min_p_only)
        sub = _take(logits, rows)
        probs = sub.softmax(dim=-1)
        parts.append((rows, sub.masked_fill(probs < _take(min_p, rows)[:, None] * probs.amax(dim=-1, keepdim=True),
                                            float("-inf"))))
    if bool(shallow.any()):
        rows = _where(shallow)
        depth = int(torch.where(small_k, top_k, torch.full_like(top_k, TOP_P_CANDIDATES))[shallow].max())
        filtered, covered = _filter_ranked(_take(logits, rows), _take(top_k, rows), _take(top_p, rows),
                                           _take(min_p, rows), depth)
        covered |= _take(small_k, rows)  # top-k cuts everything past its k anyway
        if not bool(covered.all()):  # those rows sort after all
            rows = torch.arange(len(logits), device=logits.device) if rows is None else rows
            shallow[rows[~covered]] = False
            rows, filtered = rows[covered], filtered[covered]
        parts.append((rows, filtered))
    deep = ~(shallow | min_p_only)
    if bool(deep.any()):
        rows = _where(deep)
        parts.append((rows, _filter_ranked(_take(logits, rows), _take(top_k, rows), _take(top_p, rows),
                                           _take(min_p, rows), vocab)[0]))
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    result = torch.empty_like(logits)
    for rows, filtered in parts:
        result[slice(None) if rows is None else rows] = filtered
    return result


def _where(mask: torch.Tensor) -> torch.Tensor | None:
    """The rows a mask selects, or None for all of them (the common case: every row of a step alike)."""
    return None if bool(mask.all()) else mask.nonzero()[:, 0]


def _take(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows]


def _filter_ranked(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank each row's best `depth` tokens and filter them; everything past them is cut. Also returns which
    rows that is exact for under top-p alone: those whose candidates hold at least top_p of the mass."""
    vocab = logits.shape[-1]
    if depth < vocab:  # probabilities under the whole row's softmax (its maximum is the first candidate)
        ranked_logits, order = logits.topk(depth, dim=-1)
        best = ranked_logits[:, :1]
        probs = (ranked_logits - best).exp_() / (logits - best).exp_().sum(dim=-1, keepdim=True)
    else:
        ranked_logits, order = logits.sort(dim=-1, descending=True)
        probs = ranked_logits.softmax(dim=-1)
    rank = torch.arange(depth, device=logits.device).expand_as(ranked_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = rank >= k[:, None]
    mass = probs.cumsum(dim=-1)
    mass_before = mass - probs  # probability of the strictly better tokens
    remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # top_p 1 is off, whatever the rounding
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    ranked_logits = ranked_logits.masked_fill(remove, float("-inf"))
    covered = (mass[:, -1] >= top_p) | (depth >= vocab)
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, ranked_logits), covered


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: [B, V] probabilities and one uniform in [0, 1) per row -> [B] token ids. Each token's
    share of [0, total) is its probability up to one float32 rounding (6e-8), however long the vocabulary, and
    a token of probability 0 owns an empty interval, so it is never drawn."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def row_uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform per row: from the row's own generator where it has one (its seed then fixes its draws
    whatever else is batched with it), from the global generator for the rest, in one call."""
    uniforms = torch.rand(len(generators), device=device)
    for i, generator in enumerate(generators):
        if generator is not None:
            uniforms[i] = torch.rand(1, generator=generator, device=device)[0]
    return uniforms


@dataclass
class TokenLogprob:
    """The log-probability of a sampled token under the model's (unprocessed) distribution, and the most
    likely alternatives at that position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # -1 where the row failed
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs (or failed)
    errors: list[str | None]  # why a row got no token; None for the rows that did
    # (request, logprobs of the prompt tokens this step predicted) for requests that score their prompt
    prompt_logprobs: list[tuple[Any, list[TokenLogprob]]] = field(default_factory=list)


NO_ALLOWED_TOKEN = "structured output: no token can continue the output"


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingInput],
                 allowed: tuple[list[int], torch.Tensor] | None = None) -> SamplerOutput:
        """logits: [B, V] -> one token id per row (and its logprobs where asked), or that row's error.
        allowed: (rows, [R, V] bool) the tokens structured rows may draw; every other token is cut."""
        logits = logits.float()
        ok = finite_rows(logits).tolist()
        errors: list[str | None] = [None if row_ok else NON_FINITE_LOGITS for row_ok in ok]
        if not all(ok):  # failed rows ride along as zeros, so batched operations stay finite
            logits = logits.masked_fill(~torch.tensor(ok, device=logits.device)[:, None], 0.0)
        raw_logits = logits  # logprobs are reported from the model's own distribution, before any mask
        if allowed is not None:
            constrained, table = allowed
            table = table.to(logits.device)
            logits = logits.clone()
            logits[constrained] = logits[constrained].masked_fill(~table, float("-inf"))
            for i, any_allowed in zip(constrained, table.any(dim=-1).tolist()):
                if not any_allowed and ok[i]:  # a broken matcher; the row rides along as zeros
                    ok[i], errors[i] = False, NO_ALLOWED_TOKEN
                    logits[i] = 0.0
        penalised = [i for i, row in enumerate(rows) if row.params.has_penalties and ok[i]]
        if penalised:
            logits = logits.clone()
            logits[penalised] = apply_penalties_batch(logits[penalised], [rows[i] for i in penalised])
        greedy = [i for i, row in enumerate(rows) if row.params.is_greedy and ok[i]]
        chosen = [-1] * len(rows)
        if greedy:
            for i, token in zip(greedy, _rows(logits, greedy).argmax(dim=-1).tolist()):
                chosen[i] = token
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy and ok[i]]
        if sampled:
            params = [rows[i].params for i in sampled]
            temperature = torch.tensor([p.temperature for p in params], device=logits.device)
            sub = _clamp_overflow_(_rows(logits, sampled) / temperature[:, None])
            filtered = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1 or p.min_p > 0]
            if filtered:
                kept = filter_logits(
                    _rows(sub, filtered),
                    torch.tensor([max(params[j].top_k, 0) for j in filtered], device=sub.device),
                    torch.tensor([params[j].top_p for j in filtered], device=sub.device),
                    torch.tensor([params[j].min_p for j in filtered], device=sub.device),
                )
                if len(filtered) == len(sampled):
                    sub = kept
                else:
                    sub[filtered] = kept
            uniforms = row_uniforms([rows[i].generator for i in sampled], sub.device)
            for i, token in zip(sampled, draw(sub.softmax(dim=-1), uniforms).tolist()):
                chosen[i] = token
        chosen = [token if row_ok else -1 for token, row_ok in zip(chosen, ok)]
        logprobs = token_logprobs(raw_logits, chosen, [row if ok[i] else None for i, row in enumerate(rows)])
        return SamplerOutput(chosen, logprobs, errors)


def token_logprobs(logits: torch.Tensor, chosen: list[int],
                   rows: list[SamplingInput | None]) -> list[TokenLogprob | None]:
    """Log-probabilities from the raw logits (before penalties and temperature, as vLLM and OpenAI report);
    rows given as None get none."""
    wanted = [i for i, row in enumerate(rows) if row is not None and row.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return result
    widest = max(rows[i].params.logprobs for i in wanted)
    for i, logprob in zip(wanted, scored_logprobs(logits[wanted], [chosen[i] for i in wanted], widest)):
        logprob.top = logprob.top[:rows[i].params.logprobs]
        result[i] = logprob
    return result


def scored_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """[N, V] logits and the token that actually came next at each row -> its logprob and the `top` best."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(t, v, list(zip(ids, values)))
            for t, v, ids, values in zip(targets, chosen, top_ids.tolist(), top_values.tolist())]
