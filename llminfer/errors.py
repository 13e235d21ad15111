"""Typed errors: the library raises these, the CLI prints them as one line and exits 2."""


class LLMInferError(Exception):
    """Base class of every error llminfer reports to its user."""


class ModelNotFoundError(LLMInferError, FileNotFoundError):
    """A model path, alias or hub id that does not resolve to anything readable."""


class ModelFormatError(LLMInferError, ValueError):
    """A checkpoint file that exists but cannot be read: truncated, corrupt, missing tensors."""


class ConfigError(LLMInferError, ValueError):
    """A model or engine config with a missing or invalid field."""


class UnsupportedModelError(LLMInferError, ValueError):
    """An architecture, tensor type or feature this engine does not implement."""


class InvalidSamplingParamsError(LLMInferError, ValueError):
    """A sampling parameter outside its allowed range; `field` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidPromptError(LLMInferError, ValueError):
    """A prompt the model cannot take: empty, or with token ids outside the vocabulary."""


class PromptTooLongError(InvalidPromptError):
    """A prompt that leaves no room to generate within the model's context."""


class RequestFailedError(LLMInferError, RuntimeError):
    """One request could not go on (its logits were not finite, say); the engine and other requests did."""


# The one message for a request whose logits are NaN or inf, from the engine's sampler and the lite runtime's.
NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"


class MissingDependencyError(LLMInferError, ImportError):
    """An optional feature whose packages are not installed; the message says what to install."""


def require_modules(feature: str, modules: list[str], install: str) -> None:
    """Refuse a feature whose optional packages are missing, in one line that says how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{feature} needs {', '.join(missing)}, which is not installed: {install}")


class TokenizerError(LLMInferError, ValueError):
    """A tokenizer that cannot be built, or a chat template that cannot be rendered."""
