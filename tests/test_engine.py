"""Continuous batching over the paged cache: batched = alone, preemption, aborts, forks, and the
block pool's invariants checked after every step."""

from __future__ import annotations

import random

import pytest

from llminfer import LLM, AutoModel, EngineConfig, SamplingParams
from llminfer.engine.llm_engine import LLMEngine
from llminfer.kv_cache import PagedKVCache


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_folder):
    return AutoModel.from_pretrained(tiny_llama_folder)


def kv_bytes(model, blocks: int, block_size: int) -> int:
    cfg = model.config
    return blocks * PagedKVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                                                 cfg.head_dim, model.dtype)


def run_checked(engine: LLMEngine) -> dict:
    """Drive the engine to the end, checking the block pool after every step."""
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        engine.kv.check_invariants()
    return finished


def assert_pool_empty(engine: LLMEngine) -> None:
    stats = engine.kv_cache_stats()
    assert stats.free_blocks == stats.total_blocks and stats.used_blocks == 0
    assert all(block.ref_count == 0 for block in engine.kv.pool.blocks)
    engine.kv.check_invariants()


def make_prompts(count: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(300) for _ in range(20)]
    prompts = []
    for i in range(count):
        length = rng.randint(1, max_len)
        prompt = (shared + [rng.randrange(300) for _ in range(length)])[:length] if i % 3 == 0 else \
            [rng.randrange(300) for _ in range(length)]
        prompts.append(prompt)
    return prompts


def generate_alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = LLMEngine(model, None, EngineConfig(enable_prefix_caching=False))
    request = engine.add_request(prompt, params)
    engine.run_to_completion()
    return request.output_token_ids


@pytest.mark.parametrize("setting", ["prefix-caching", "no-prefix-caching", "tiny-pool-preempts"])
def test_batch_of_24_prompts_equals_each_prompt_alone(tiny_model, setting):
    max_len = 30 if setting == "tiny-pool-preempts" else 60
    prompts = make_prompts(24, max_len)
    params = [SamplingParams(max_tokens=8 + i % 9, temperature=0, ignore_eos=True) for i in range(24)]
    config = EngineConfig(block_size=4, enable_prefix_caching=setting != "no-prefix-caching",
                          max_num_batched_tokens=64,
                          kv_cache_memory=kv_bytes(tiny_model, 14, 4) if setting == "tiny-pool-preempts" else None)
    engine = LLMEngine(tiny_model, None, config)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    run_checked(engine)
    for request, prompt, sp in zip(requests, prompts, params):
        assert request.output_token_ids == generate_alone(tiny_model, prompt, sp)
    if setting == "tiny-pool-preempts":
        assert engine.scheduler.num_preemptions > 0
    if setting == "prefix-caching":
        assert engine.kv_cache_stats().prefix_cache_hit_tokens > 0
    assert_pool_empty(engine)


def test_random_arrivals_aborts_and_forks_leave_every_block_free(tiny_model):
    rng = random.Random(1234)
    engine = LLMEngine(tiny_model, None, EngineConfig(block_size=4, max_num_seqs=12, max_num_batched_tokens=48,
                                                      kv_cache_memory=kv_bytes(tiny_model, 40, 4)))
    prompts = make_prompts(500, 24, seed=7)
    live: list[str] = []
    submitted = aborted = 0
    while submitted < len(prompts) or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 4)):  # arrivals between steps
            if submitted < len(prompts):
                params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=rng.choice([0, 1.0]),
                                        n=rng.choice([1, 1, 1, 2, 3]), seed=rng.randrange(1000), ignore_eos=True)
                live.append(engine.add_request(prompts[submitted], params).group_id)
                submitted += 1
        if live and rng.random() < 0.15:  # abort a random live request, whatever state it is in
            engine.abort(live.pop(rng.randrange(len(live))))
            aborted += 1
        for output in engine.step():
            if output.finished and output.request_id in live:
                live.remove(output.request_id)
                assert all(o.finish_reason == "length" for o in output.outputs)
        engine.kv.check_invariants()
    assert submitted == 500 and aborted > 20 and not live
    assert engine.scheduler.num_preemptions > 0
    assert_pool_empty(engine)


def test_n_samples_share_the_prompt_and_match_separately_seeded_requests(tiny_model):
    prompt = [7, 8, 9, 10, 11, 12]  # 6 tokens, block size 4: the shared last block is partial -> copy-on-write
    engine = LLMEngine(tiny_model, None, EngineConfig(block_size=4))
    request = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5, ignore_eos=True))
    engine.step()  # prefill + fork
    assert engine.kv_cache_stats().used_blocks == 2  # three samples, one copy of the prompt
    outputs = run_checked(engine)[request.group_id].outputs
    assert [o.index for o in outputs] == [0, 1, 2]
    for i, output in enumerate(outputs):
        alone = generate_alone(tiny_model, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=5 + i,
                                                                  ignore_eos=True))
        assert output.token_ids == alone, f"sample {i}"
    assert len({tuple(o.token_ids) for o in outputs}) > 1
    assert_pool_empty(engine)


def test_abort_mid_generation_frees_blocks_and_spares_the_others(tiny_model):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = LLMEngine(tiny_model, None, EngineConfig(block_size=4))
    keep = engine.add_request([1, 2, 3, 4, 5], params)
    doomed = engine.add_request([9, 8, 7, 6, 5, 4, 3], params)
    for _ in range(3):
        engine.step()
    engine.abort(doomed.group_id)
    assert doomed.finish_reason == "abort"
    run_checked(engine)
    assert keep.output_token_ids == generate_alone(tiny_model, [1, 2, 3, 4, 5], params)
    assert_pool_empty(engine)


def test_reference_and_batched_paged_attention_generate_the_same(tiny_llama_folder):
    prompts = make_prompts(6, 40, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    results = []
    for impl in ("batched", "reference"):
        model = AutoModel.from_pretrained(tiny_llama_folder, ops=f"paged_decode_attention={impl}")
        assert model.ops.names()["paged_decode_attention"] == impl
        engine = LLMEngine(model, None, EngineConfig(block_size=4))
        requests = [engine.add_request(p, params) for p in prompts]
        run_checked(engine)
        results.append([r.output_token_ids for r in requests])
    assert results[0] == results[1]


def test_generate_takes_one_sampling_params_per_prompt(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder))
    outputs = llm.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert [len(o.token_ids) for o in outputs] == [2, 5]


def test_closing_a_stream_early_aborts_the_request(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder))
    stream = llm.stream([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert llm.kv_cache_stats().used_blocks > 0
    stream.close()
    assert llm.kv_cache_stats().used_blocks == 0 and not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_chinas_capital_and_chinas_flag_store_their_common_prefix_once():
    llm = LLM("smollm2-135m", block_size=1, kv_cache_memory="64MiB")
    tokenizer = llm.tokenizer
    a, b = tokenizer.encode("China's capital"), tokenizer.encode("China's national flag")
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= 2  # "China", "'s"
    engine = llm.engine
    params = SamplingParams(max_tokens=4, temperature=0)
    first = engine.add_request(a, params)
    engine.step()  # a's prompt is computed and its blocks published; a keeps running
    second = engine.add_request(b, params)
    engine.step()  # b starts from a's blocks for the common prefix; a decodes one more token
    stats = engine.kv_cache_stats()
    assert stats.prefix_cache_hit_tokens == common
    table_a, table_b = engine.kv.block_table(first.request_id), engine.kv.block_table(second.request_id)
    assert table_a[:common] == table_b[:common] and set(table_a[common:]).isdisjoint(table_b[common:])
    assert stats.used_blocks == (len(a) + 1) + len(b) - common  # apart they would need `common` more


def test_the_runner_only_reads_requests_and_the_scheduler_updates_them(tiny_model):
    import copy

    engine = LLMEngine(tiny_model, None, EngineConfig(block_size=4))
    for prompt in make_prompts(3, 12, seed=5):
        engine.add_request(prompt, SamplingParams(max_tokens=4, n=2, temperature=0.8, seed=1, ignore_eos=True))
    forks_per_step = []
    for _ in range(3):
        batch = engine.scheduler.schedule()
        forks_per_step.append(sum(len(children) for _, children in batch.forks))
        fields = ("num_computed_tokens", "output_token_ids", "status", "finish_reason", "pending_forks")
        before = [copy.deepcopy([getattr(r, f) for f in fields]) for r in batch.requests]
        output = engine.runner.execute_model(batch)
        assert [[getattr(r, f) for f in fields] for r in batch.requests] == before
        assert len(output.token_ids) == len(batch.samples)
        engine.scheduler.update_from_output(batch, output)
        assert [r.num_computed_tokens for r in batch.requests] == [b[0] + n for b, n in
                                                                  zip(before, batch.num_new_tokens)]
        engine.kv.check_invariants()
    assert forks_per_step == [3, 0, 0]  # each prompt's second sample, forked when its prompt was computed
    assert all(len(engine._groups[g]) == 2 for g in engine._groups)


def test_a_scheduling_policy_is_one_queue_class(tiny_model, monkeypatch):
    from llminfer.engine import scheduler
    from llminfer.errors import ConfigError

    class NewestFirst(scheduler.RequestQueue):
        def add(self, request) -> None:
            self._items.appendleft(request)

    monkeypatch.setitem(scheduler.QUEUE_POLICIES, "newest", NewestFirst)
    engine = LLMEngine(tiny_model, None, EngineConfig(block_size=4, max_num_seqs=1, scheduling_policy="newest"))
    first = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    last = engine.add_request([4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
    assert engine.scheduler.schedule().requests == [last]
    assert first.status.value == "waiting"
    with pytest.raises(ConfigError, match=r"scheduling policy 'lottery' is not supported \(supported: fcfs"):
        LLMEngine(tiny_model, None, EngineConfig(scheduling_policy="lottery"))


def test_the_attention_backend_is_chosen_by_configuration(tiny_model, monkeypatch):
    """A backend registered by name is what the runner attends through; an unknown name is refused by name."""
    from llminfer import kv_cache
    from llminfer.errors import ConfigError

    calls = []

    class CountingBackend(kv_cache.PagedAttentionBackend):
        def forward(self, layer, q, k, v, metadata):
            calls.append(layer.layer_idx)
            return super().forward(layer, q, k, v, metadata)

    monkeypatch.setitem(kv_cache.ATTENTION_BACKENDS, "counting", CountingBackend)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = LLMEngine(tiny_model, None, EngineConfig(block_size=4))
    counted = LLMEngine(tiny_model, None, EngineConfig(block_size=4, attention_backend="counting"))
    requests = [engine.add_request([1, 2, 3, 4, 5], params) for engine in (expected, counted)]
    for engine in (expected, counted):
        engine.run_to_completion()
    assert requests[0].all_token_ids == requests[1].all_token_ids
    assert isinstance(counted.runner.backend, CountingBackend)
    assert len(calls) == 3 * tiny_model.config.num_hidden_layers  # one prefill and two decode steps
    with pytest.raises(ConfigError, match=r"attention backend 'flash9' is not available \(expected one of paged"):
        LLMEngine(tiny_model, None, EngineConfig(attention_backend="flash9"))
