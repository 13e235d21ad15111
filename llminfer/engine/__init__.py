"""Requests in, tokens out: sampling params, requests, scheduler, model runner, sampler, engine."""

from llminfer.engine.llm import LLM
from llminfer.engine.outputs import RequestOutput
from llminfer.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
