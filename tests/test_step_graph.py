"""Recorded decode steps (engine/step_graph.py, ops/recording.py): a replay computes exactly what the eager
step computes, on every architecture, cache and weight format; what cannot be replayed is refused, not baked in."""

import pytest
import torch
import torch.nn.functional as F

from llminfer import LLM, SamplingParams
from llminfer.ops import cpu_kernels, resolve_ops
from llminfer.ops.recording import Recorder, RecordingError

pytestmark = pytest.mark.skipif(cpu_kernels.build_requirement() is not None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.build_requirement()}")

PROMPTS = [list(range(3, 40)), list(range(50, 57)), list(range(3, 40)) + [9, 10, 11]]  # the last shares a prefix


def generate_both_ways(folder, **options):
    """Greedy and seeded-sampled tokens, one prompt at a time and batched, with and without step graphs."""
    runs = {}
    options.setdefault("dtype", "float32")
    for eager in (True, False):
        llm = LLM(str(folder), enforce_eager=eager, kv_cache_memory="4MiB", **options)
        greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
        tokens = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in PROMPTS]
        tokens += [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
        tokens += [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sampled)]
        runs[eager] = (tokens, llm.engine.runner.step_graphs)
    return runs[True][0], runs[False][0], runs[False][1]


def test_replayed_decode_steps_generate_what_eager_steps_generate_on_every_architecture(tiny_hf):
    variant, _, folder = tiny_hf
    eager, replayed, graphs = generate_both_ways(folder)
    assert replayed == eager, variant
    assert graphs.replays > 100 and graphs.graphs[1] is not None and graphs.graphs[3] is not None


@pytest.mark.parametrize("options", [dict(dtype="bfloat16"), dict(kv_cache_dtype="int8"),
                                     dict(quantization="a16w8"), dict(quantization="a16w4"),
                                     dict(quantization="a8w8", kv_cache_dtype="int8")],
                         ids=["bf16", "int8-kv", "a16w8", "a16w4", "a8w8-int8-kv"])
def test_replayed_decode_steps_match_eager_for_every_weight_and_cache_format(tiny_llama_folder, options):
    eager, replayed, graphs = generate_both_ways(tiny_llama_folder, **options)
    assert replayed == eager
    assert graphs.replays > 100


def test_an_implementation_that_cannot_be_replayed_keeps_its_steps_eager(tiny_llama_folder):
    # the batched reference attention reads the lengths into Python: recording it would freeze them
    eager, replayed, graphs = generate_both_ways(tiny_llama_folder, ops="paged_decode_attention=batched")
    assert replayed == eager
    assert graphs.graphs == {1: None, 3: None} and graphs.replays == 0


def test_enforce_eager_records_nothing(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder), dtype="float32", enforce_eager=True, kv_cache_memory="4MiB")
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0.0))
    assert llm.engine.runner.step_graphs is None


# --- the recorder ----------------------------------------------------------------------------------------------

def test_a_recorded_pass_replays_on_new_inputs_in_place():
    ops = resolve_ops(None)
    generator = torch.Generator().manual_seed(0)
    table, norm_weight = torch.randn(10, 8, generator=generator), torch.rand(8, generator=generator)
    ids, residual = torch.tensor([3, 1]), torch.randn(2, 8, generator=generator)

    def step():
        hidden = F.embedding(ids, table) * 2 + 1  # operators through the dispatcher
        hidden, summed = ops.add_rms_norm(hidden.view(2, 8), residual, norm_weight, 1e-6)  # one of our kernels
        return ops.silu_and_mul(torch.cat([hidden, summed], dim=1)).t()  # a view of the last output

    graph = cpu_kernels.kernels().StepGraph()
    with Recorder(graph):
        out = step()
    assert len(graph) == 6  # embedding, mul, add, add_rms_norm, cat, silu_and_mul (not the views, allocations)
    ids.copy_(torch.tensor([7, 4]))
    residual.normal_(generator=generator)
    graph.replay()
    assert torch.equal(out, step())


def test_the_recorder_refuses_what_a_replay_would_freeze():
    ops = resolve_ops(None)
    x = torch.randn(3, 8)
    cases = [(lambda: x + torch.tensor([1.0]), "a tensor built from Python values"),
             (lambda: x * x.sum().item(), r"read into Python \(.item\(\), int\(\)\)"),
             (lambda: x[x > 0], "shape depends on values"),
             (lambda: resolve_ops("paged_decode_attention=reference").paged_decode_attention(
                  x.view(3, 1, 8), torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8), None, None,
                  torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long), 0, 1.0, None),
              "op paged_decode_attention: implementation 'reference' cannot be recorded"),
             (lambda: cpu_kernels.kernels().dequantize_int8(torch.ones(1, 1, 4, 64, dtype=torch.int8), torch.ones(4),
                                                            32, torch.float32),
              "kernel dequantize_int8 cannot be replayed")]
    for fn, message in cases:
        with pytest.raises(RecordingError, match=message):
            with Recorder(cpu_kernels.kernels().StepGraph()):
                fn()
    with Recorder(cpu_kernels.kernels().StepGraph()):  # the recorder is left cleanly after each refusal
        ops.rms_norm(x, torch.ones(8), 1e-6)


def test_a_kernel_node_with_the_wrong_arguments_is_refused_when_added():
    with pytest.raises(RuntimeError, match="a recorded kernel call has 1 arguments and outputs, its replay takes 4"):
        cpu_kernels.kernels().StepGraph().add_kernel("rms_norm", (torch.ones(2, 8),))


def test_batches_above_the_graph_size_limit_run_eagerly(tiny_llama_folder):
    from llminfer.config import EngineConfig
    from llminfer.engine.llm_engine import LLMEngine
    from llminfer.model.auto import AutoModel

    engine = LLMEngine(AutoModel.from_pretrained(tiny_llama_folder), None, EngineConfig(max_graph_batch_size=2))
    for prompt in PROMPTS:
        engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    engine.run_to_completion()
    graphs = engine.runner.step_graphs
    assert 3 not in graphs.graphs and graphs.replays == 0  # every decode step had 3 sequences
    with pytest.raises(Exception, match="max_graph_batch_size must be an integer >= 1, got 0"):
        EngineConfig(max_graph_batch_size=0)


@pytest.mark.parametrize("quantization", [None, "a16w4"])
def test_warm_up_records_every_batch_size_and_changes_no_output(tiny_llama_folder, quantization):
    """A server records its decode graphs before it takes requests: the dummy steps leave nothing behind that a
    request could read, so what it generates afterwards is what an engine without warm-up generates."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(warm: bool) -> list[list[int]]:
        llm = LLM(str(tiny_llama_folder), quantization=quantization, max_num_seqs=3, kv_cache_memory="4MiB")
        engine = llm.engine
        if warm:
            engine.warm_up()
            graphs = engine.runner.step_graphs.graphs
            assert sorted(graphs) == [1, 2, 3] and all(g is not None for g in graphs.values())  # not refused
            replays_before = engine.runner.step_graphs.replays
        requests = [engine.add_request(p, greedy) for p in PROMPTS]
        engine.run_to_completion()
        if warm:
            assert engine.runner.step_graphs.replays > replays_before
        return [r.output_token_ids for r in requests]

    assert run(warm=True) == run(warm=False)
