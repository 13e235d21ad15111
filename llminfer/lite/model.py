"""An exported model on onnxruntime: its own key/value cache, chat template, sampling, streaming, stop rules.

Needs onnxruntime, numpy, tokenizers and jinja2 only; nothing here (or below it) imports torch.

    model = LiteModel("./smollm2-onnx")
    for piece in model.stream(model.chat_prompt([{"role": "user", "content": "Hi"}]), SamplingParams(max_tokens=64)):
        print(piece.delta, end="")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llminfer.engine.sampling_params import SamplingParams
from llminfer.errors import (
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelFormatError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenizerError,
)
from llminfer.files import file_sha256, read_json_object
from llminfer.lite.sampler import sample
from llminfer.tokenizer import IncrementalDetokenizer, Tokenizer
from llminfer.tokenizer.text_stream import TextStream

EXPORT_MANIFEST = "export.json"  # written by llminfer.export.onnx
EXPORT_FORMAT = "llminfer-onnx"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


@dataclass
class LiteOutput:
    """A generation so far (streaming) or finished: the text (stop string cut off), its token ids, why it ended
    (None while running: "stop" or "length" after), and the text new since the previous output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    delta: str = ""
    prompt_tokens: int = 0


@dataclass
class StepTimes:
    """Wall time of the last generation: prefill (the whole prompt) and each decode step."""

    prefill_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_seconds: list[float] = field(default_factory=list)


def read_export_manifest(folder: Path, verify: bool = False) -> dict[str, Any]:
    """export.json, checked: the right format, and every file it lists present with its size (and, with
    verify, its sha256)."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder (expected the output of `llminfer export`)")
    file = folder / EXPORT_MANIFEST
    if not file.is_file():
        raise ModelFormatError(f"{folder}: no {EXPORT_MANIFEST}; not a folder written by `llminfer export`")
    manifest = read_json_object(file)
    if manifest.get("format") != EXPORT_FORMAT:
        raise ModelFormatError(f"{file}: 'format' is {manifest.get('format')!r}, expected '{EXPORT_FORMAT}'")
    for key in ("graph", "inputs", "outputs", "model", "files", "dtype"):
        if key not in manifest:
            raise ModelFormatError(f"{file}: missing the '{key}' field")
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ModelFormatError(f"{path}: listed in {EXPORT_MANIFEST} but missing")
        if path.stat().st_size != entry.get("bytes"):
            raise ModelFormatError(f"{path}: {path.stat().st_size} bytes, {EXPORT_MANIFEST} says {entry.get('bytes')} "
                                   "(truncated or replaced?)")
        if verify and file_sha256(path) != entry.get("sha256"):
            raise ModelFormatError(f"{path}: sha256 differs from {EXPORT_MANIFEST} (corrupt or replaced)")
    return manifest


class LiteModel:
    def __init__(self, folder: str | Path, threads: int | None = None, verify: bool = False) -> None:
        import onnxruntime

        self.folder = Path(folder).expanduser()
        self.manifest = read_export_manifest(self.folder, verify)
        graph = self.folder / self.manifest["graph"]
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelFormatError(f"{graph}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        self._check_graph_matches_manifest(graph)
        model = self.manifest["model"]
        self.num_layers, self.num_kv_heads = model["num_hidden_layers"], model["num_key_value_heads"]
        self.head_dim, self.vocab_size = model["head_dim"], model["vocab_size"]
        self.cache_dtype = np.float16 if self.manifest["dtype"] == "float16" else np.float32
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        generation = read_json_object(self.folder / "generation_config.json") if (
            self.folder / "generation_config.json").is_file() else {}
        self.generation_config = generation
        self.max_model_len = int(generation.get("max_length") or model["max_position_embeddings"])
        self.tokenizer = Tokenizer.from_folder(self.folder) if (self.folder / "tokenizer.json").is_file() else None
        self.eos_token_ids = frozenset(generation.get("eos_token_id") or ()) | (
            self.tokenizer.stop_token_ids if self.tokenizer else frozenset())
        self.last_times = StepTimes()

    def _check_graph_matches_manifest(self, graph: Path) -> None:
        """Names, element types and fixed sizes of the graph's inputs and outputs against export.json, and the
        inputs against the model it describes (ids, mask, positions, a key and a value per layer)."""
        model = self.manifest["model"]
        expected_inputs = 3 + 2 * model["num_hidden_layers"]
        if len(self.manifest["inputs"]) != expected_inputs:
            listed = len(self.manifest["inputs"])
            raise ModelFormatError(f"{self.folder / EXPORT_MANIFEST}: lists {listed} inputs, its model needs "
                                   f"{expected_inputs} (ids, mask, positions and a key and value per layer)")
        actual = {"inputs": self.session.get_inputs(), "outputs": self.session.get_outputs()}
        for kind, values in actual.items():
            listed = self.manifest[kind]
            if [v.name for v in values] != [entry["name"] for entry in listed]:
                names, wanted = {v.name for v in values}, [entry["name"] for entry in listed]
                first = next((n for n in wanted if n not in names), None) or next(v.name for v in values)
                raise ModelFormatError(f"{graph}: its {kind} do not match {EXPORT_MANIFEST} (first difference: "
                                       f"'{first}'; {len(values)} in the graph, {len(listed)} listed)")
            for value, entry in zip(values, listed):
                graph_type = _ORT_TYPES.get(value.type, value.type)
                fixed = [(i, d) for i, d in enumerate(value.shape) if isinstance(d, int)]
                if graph_type != entry.get("type") or any(entry["shape"][i] != d for i, d in fixed):
                    raise ModelFormatError(f"{graph}: {kind[:-1]} '{value.name}' is {graph_type} {value.shape}, "
                                           f"{EXPORT_MANIFEST} says {entry.get('type')} {entry.get('shape')}")

    # --- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.folder}: the export has no tokenizer; pass token ids")
        return self.tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self._require_tokenizer().encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise InvalidPromptError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not ids:
            raise InvalidPromptError("the prompt is empty")
        return ids

    # --- the model ----------------------------------------------------------------------------

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
                for _ in range(2 * self.num_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits [B, 1, V] (or [B, S, V] from an --all-logits export) and the key/value cache grown
        by S positions."""
        feeds = dict(zip(self.input_names, [input_ids.astype(np.int64), attention_mask.astype(np.int64),
                                            position_ids.astype(np.int64), *cache]))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | None = None) -> list[LiteOutput]:
        """One output per prompt (text or token ids), generated one prompt at a time."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        outputs = []
        for prompt in prompts:
            *_, last = self.stream(prompt, params)
            outputs.append(last)
        return outputs

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[LiteOutput]:
        """Yield after every token: the text so far and the new piece (held back while it could still become
        a stop string); the last output has a finish_reason."""
        params = params or self.default_params()
        if params.n != 1:
            raise InvalidPromptError("the lite runtime generates one sample per prompt (n=1)")
        for name in ("structured", "prompt_logprobs"):  # refused, never ignored
            if getattr(params, name) is not None:
                raise InvalidSamplingParamsError(f"the lite runtime does not support {name}; use the engine "
                                                 "(llminfer.LLM or llminfer serve)", field=name)
        if params.max_tokens < 1:
            raise InvalidSamplingParamsError("the lite runtime needs max_tokens >= 1", field="max_tokens")
        prompt_ids = self.encode(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                                     f"{self.max_model_len} tokens")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        text = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            text = TextStream(detokenizer, params.stop)
        rng = np.random.default_rng(params.seed)
        output = LiteOutput(prompt_tokens=len(prompt_ids))
        times = self.last_times = StepTimes(prompt_tokens=len(prompt_ids))

        start = time.perf_counter()
        logits, cache = self.step(np.array([prompt_ids]), np.ones((1, len(prompt_ids))),
                                  np.arange(len(prompt_ids))[None], self.empty_cache())
        times.prefill_seconds = time.perf_counter() - start
        while True:
            token = sample(logits[0, -1], params, prompt_ids, output.token_ids, rng)
            output.token_ids.append(token)
            total = len(prompt_ids) + len(output.token_ids)
            if token in stop_ids:
                output.finish_reason = "stop"
            elif text is not None and text.add(token):
                output.finish_reason = "stop"
            elif len(output.token_ids) >= params.max_tokens or total >= self.max_model_len:
                output.finish_reason = "length"
                if text is not None:
                    text.flush()
            if text is not None:
                output.text, output.delta = text.text, text.take_delta(output.finish_reason is not None)
            yield replace(output, token_ids=list(output.token_ids))  # a snapshot: later steps do not change it
            if output.finish_reason is not None:
                return
            start = time.perf_counter()
            logits, cache = self.step(np.array([[token]]), np.ones((1, total)), np.array([[total - 1]]), cache)
            times.decode_seconds.append(time.perf_counter() - start)

    def default_params(self) -> SamplingParams:
        """The export's generation defaults (the source's generation_config.json), else SamplingParams'."""
        g = self.generation_config
        settings = {k: g[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in g}
        if g.get("do_sample") is False:
            settings["temperature"] = 0.0
        return SamplingParams(max_tokens=256, **settings)
