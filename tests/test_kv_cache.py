"""The paged KV cache: decoding and chunked prefill equal recomputation; the paged-attention op equals a
float64 oracle; blocks are shared between prompts that start alike."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import prefill_logits

from llminfer import AutoModel, EngineConfig, SamplingParams
from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.sampler import SamplerOutput
from llminfer.kv_cache import KVCacheManager
from llminfer.kv_cache.paged import DecodeBatch
from llminfer.ops import OPS


def compute_step(engine, batch) -> torch.Tensor:
    """Run a step's forward pass and let the scheduler advance the requests, sampling nothing: these tests feed
    the tokens themselves."""
    logits = engine.runner.compute_logits(batch)
    engine.scheduler.update_from_output(batch, SamplerOutput([], [], []))
    return logits


def full_recompute_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of the last position with a fresh cache, all tokens in one prefill."""
    return prefill_logits(model, [ids])[0]


@pytest.mark.parametrize("block_size", [16, 3])
def test_decode_steps_match_full_recompute(tiny_hf, block_size):
    _, _, folder = tiny_hf
    model = AutoModel.from_pretrained(folder)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], list(range(30, 50))]
    engine = LLMEngine(model, None, EngineConfig(block_size=block_size))
    requests = [engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts]
    compute_step(engine, engine.scheduler.schedule())  # prefill all three
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        for r in requests:  # feed arbitrary tokens: the cache must not care where they came from
            r.output_token_ids.append(int(torch.randint(0, model.config.vocab_size, (1,), generator=generator)))
        batch = engine.scheduler.schedule()
        assert batch.num_new_tokens == [1, 1, 1]
        decoded = compute_step(engine, batch)
        for row, r in enumerate(batch.requests):
            expected = full_recompute_logits(model, r.all_token_ids)
            torch.testing.assert_close(decoded[row], expected, atol=1e-4, rtol=0, msg=f"step {step} row {row}")


def test_chunked_prefill_matches_one_prefill(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    ids = list(range(10, 50))
    engine = LLMEngine(model, None, EngineConfig(max_num_batched_tokens=16, block_size=4))
    engine.add_request(ids, SamplingParams(max_tokens=1))
    chunks = []
    while True:
        batch = engine.scheduler.schedule()
        chunks.append(batch.num_new_tokens[0])
        logits = compute_step(engine, batch)
        if batch.requests[0].num_computed_tokens == len(ids):
            break
    assert chunks == [16, 16, 8]
    torch.testing.assert_close(logits[0], full_recompute_logits(model, ids), atol=1e-4, rtol=0)


def attention_oracle(q, key_cache, value_cache, block_tables, context_lens, scale, window=None):
    """Float64, one sequence and one head at a time, straight from the definition."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    block_size = key_cache.shape[2]  # [num_blocks, Hkv, block_size, D]
    group = q.shape[1] // key_cache.shape[1]
    for b, length in enumerate(context_lens):
        for h in range(q.shape[1]):
            keys = torch.stack([key_cache[block_tables[b, p // block_size], h // group, p % block_size]
                                for p in range(length)]).double()
            values = torch.stack([value_cache[block_tables[b, p // block_size], h // group, p % block_size]
                                  for p in range(length)]).double()
            scores = keys @ q[b, h].double() * scale
            if window is not None:
                scores[: max(0, length - window)] = -math.inf
            out[b, h] = torch.softmax(scores, 0) @ values
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shared_prefix_blocks", [0, 2])
def test_paged_decode_attention_equals_float64_oracle(num_heads, num_kv_heads, window, shared_prefix_blocks):
    generator = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    block_size, num_blocks, head_dim = 4, 40, 8
    key_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=generator)
    context_lens = [1, 7, 16, 23, 4] if not shared_prefix_blocks else [9, 17, 16, 23, 12]
    block_tables = torch.zeros(len(context_lens), 6, dtype=torch.long)
    for b in range(len(context_lens)):  # random, non-contiguous blocks
        block_tables[b] = torch.randperm(num_blocks, generator=generator)[:6]
    block_tables[:, :shared_prefix_blocks] = block_tables[0, :shared_prefix_blocks]  # a common prompt prefix
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=generator)
    expected = attention_oracle(q, key_cache, value_cache, block_tables, context_lens, 0.3, window)
    batch = DecodeBatch.build(block_tables, context_lens, block_size)
    assert batch.num_shared == shared_prefix_blocks
    implementations = OPS["paged_decode_attention"].implementations
    assert set(implementations) >= {"reference", "batched"}
    for impl in implementations.values():  # every registered implementation, and its torch.library op
        for fn in (impl.fn, impl.custom_op):
            got = fn(q, key_cache, value_cache, None, None, batch.block_tables, batch.context_lens, batch.num_shared,
                     0.3, window)
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=impl.name)
        for b in range(len(context_lens)):  # a batch of one takes its own path
            alone = DecodeBatch.build(block_tables[b:b + 1], context_lens[b:b + 1], block_size)
            got = impl.fn(q[b:b + 1], key_cache, value_cache, None, None, alone.block_tables, alone.context_lens,
                          alone.num_shared, 0.3, window)
            torch.testing.assert_close(got.double(), expected[b:b + 1], atol=1e-5, rtol=1e-5, msg=impl.name)


class _Req:
    def __init__(self, request_id: str, tokens: list[int]) -> None:
        self.request_id, self.all_token_ids, self.num_computed_tokens = request_id, tokens, 0


def test_prompts_with_a_common_prefix_share_its_full_blocks():
    block_size, k = 4, 3
    prefix = list(range(100, 100 + k * block_size))
    a, b = _Req("a", prefix + [1, 2, 3, 4, 5]), _Req("b", prefix + [6, 7])

    def run(requests, manager):
        for request in requests:
            cached = manager.find_cached_prefix(request)
            manager.record_prefix_lookup(len(request.all_token_ids), len(cached) * block_size)
            hit = len(cached) * block_size
            assert manager.allocate(request, len(request.all_token_ids) - hit, cached)
            request.num_computed_tokens = len(request.all_token_ids)
            manager.cache_full_blocks(request)
            manager.check_invariants()
        return manager.stats()

    apart = [run([_Req(r.request_id, r.all_token_ids)], KVCacheManager(64, block_size)).used_blocks for r in (a, b)]
    together = run([a, b], KVCacheManager(64, block_size))
    assert together.used_blocks == sum(apart) - k
    assert together.prefix_cache_hit_tokens == k * block_size
    assert together.prefix_cache_queried_tokens == len(a.all_token_ids) + len(b.all_token_ids)


def test_freed_blocks_stay_reusable_until_evicted_least_recently_used_first():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    first = _Req("first", [1, 2, 3, 4, 9])
    assert manager.allocate(first, 5)
    first.num_computed_tokens = 5
    manager.cache_full_blocks(first)
    manager.free(first)
    again = _Req("again", [1, 2, 3, 4, 7])
    assert len(manager.find_cached_prefix(again)) == 2  # both full blocks survive being freed
    # Free order was: never-used block 3, then first's blocks tail-first (partial 2, full 1, full 0).
    filler = _Req("filler", [50, 51, 52, 53, 54])
    assert manager.allocate(filler, 5)  # 3 blocks: 3, 2, then 1, the second full block, is evicted
    manager.check_invariants()
    assert len(manager.find_cached_prefix(again)) == 1
    assert manager.stats().free_blocks == 1
