"""`llminfer serve`: listen at once (health 503 while loading), load the model in the background, serve, and
on SIGTERM drain: new requests get 503, requests in flight finish, then the process exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

import uvicorn

from llminfer.server.app import ServerConfig, ServerState, create_app
from llminfer.server.async_engine import AsyncEngine
from llminfer.server.connections import uvicorn_config

logger = logging.getLogger("llminfer.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT drains instead of closing the socket at once
    (which would refuse new clients rather than answer them 503). A second signal exits immediately."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_deadline is not None or self.state.engine is None:
            return super().handle_exit(sig, frame)
        logger.warning("signal %d: draining (%d requests in flight); new requests get 503", sig,
                       self.state.engine.num_in_flight)
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            engine = self.state.engine
            idle = self.state.active_http_requests == 0 and engine.num_in_flight == 0
            if idle or time.monotonic() > self.drain_deadline:
                logger.warning("drained; exiting" if idle else "drain timeout; exiting with requests in flight")
                self.should_exit = True
        return await super().on_tick(counter)


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="llminfer: %(message)s",
                        force=True)
    from llminfer.engine.distributed import distributed_env

    if distributed_env()[0] > 0:  # a tensor-parallel follower: no HTTP, it runs rank 0's steps until told to stop
        from llminfer.cli.main import model_options
        from llminfer.engine import LLM

        LLM(args.model, **model_options(args), max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching)
        return 0  # not reached: the follower exits inside LLM()
    api_key = args.api_key or os.environ.get("LLMINFER_API_KEY") or None
    config = ServerConfig(model_name=args.served_model_name or served_name(args.model),
                          model_aliases=() if args.served_model_name else (args.model,), api_key=api_key,
                          max_queued=args.max_queued, max_batch_prompts=args.max_batch_prompts,
                          max_body_bytes=args.max_body_size, body_timeout_s=args.body_timeout, max_n=args.max_n)
    state = ServerState(config)
    server = DrainingServer(uvicorn_config(create_app(state), args.host, args.port,
                                           max_connections=args.max_connections,
                                           keep_alive_timeout_s=args.keep_alive_timeout),  # None: the default
                            state, args.drain_timeout)
    loader = threading.Thread(target=_load_model, args=(args, state, server), name="llminfer-loader", daemon=True)
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.stop()
    if state.load_error:
        print(f"llminfer: error: {state.load_error}", file=sys.stderr)
        return 2
    return 0


def served_name(model: str) -> str:
    """The model id a server announces: an alias or hub id as given, a local file or folder by its name."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def _load_model(args: argparse.Namespace, state: ServerState, server: DrainingServer) -> None:
    from llminfer.cli.main import model_options
    from llminfer.engine import LLM

    logger.info("loading %s (%s, %s); /health answers 503 until it is ready", args.model, args.dtype, args.device)
    try:
        llm = LLM(args.model, **model_options(args), max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=not args.no_prefix_caching)
    except Exception as exc:  # noqa: BLE001 - reported as the process's one-line error
        logger.debug("model load failed", exc_info=True)
        state.load_error = f"{type(exc).__name__}: {exc}" if args.debug else str(exc)
        server.should_exit = True
        return
    llm.engine.warm_up()  # /health stays 503 meanwhile: no request pays for a graph recording
    defaults = llm.sampling_defaults if args.generation_config == "auto" else {}
    if defaults:
        logger.info("sampling defaults from the model's generation config: %s",
                    ", ".join(f"{k}={v:g}" for k, v in defaults.items()))
    state.attach(AsyncEngine(llm.engine), llm.tokenizer, defaults)
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("ready: serving '%s' on http://%s:%d (chat page at /, OpenAI API at /v1)",
                state.config.model_name, host, args.port)
