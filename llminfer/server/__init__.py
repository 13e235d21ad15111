"""The OpenAI-compatible server: an async front end over one engine worker thread."""

from llminfer.server.app import ServerConfig, ServerState, create_app
from llminfer.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "ServerConfig", "ServerState", "create_app"]
