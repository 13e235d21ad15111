"""Calibration data: token windows the float model is run over to measure activations.

The default text is the docstrings of a fixed list of standard-library modules: it ships with every Python
(so results can be reproduced anywhere) and is not the perplexity text (pydoc_data.topics), so calibration
never sees the evaluation data.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Sequence

from llminfer.errors import InvalidPromptError

_DOCSTRING_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
                      "functools", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib",
                      "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
                      "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
                      "uuid", "xml.etree.ElementTree", "zipfile")


def default_calibration_text() -> str:
    parts = []
    for module_name in _DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a Python built without e.g. sqlite3
            continue
        own_members = [member for _, member in inspect.getmembers(module)  # sorted by name
                       if getattr(member, "__module__", None) == module.__name__]
        for doc in [module.__doc__, *(getattr(member, "__doc__", None) for member in own_members)]:
            if isinstance(doc, str) and len(doc) > 80:
                parts.append(inspect.cleandoc(doc))
    return "\n\n".join(dict.fromkeys(parts))


@dataclass
class CalibrationData:
    windows: list[list[int]]
    source: str
    sha256: str

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.num_tokens, "windows": len(self.windows)}


def calibration_data(calibration: str | Sequence[str] | Sequence[Sequence[int]] | None, tokenizer,
                     max_tokens: int, window: int, source: str | None = None) -> CalibrationData:
    """Text (one string or several), token id lists, or None for the default text -> windows of token ids."""
    if calibration is None:
        calibration, source = default_calibration_text(), source or "python stdlib docstrings"
    if isinstance(calibration, str):
        calibration = [calibration]
    calibration = list(calibration)
    if not calibration:
        raise InvalidPromptError("calibration data is empty")
    if all(isinstance(item, str) for item in calibration):
        if tokenizer is None:
            raise InvalidPromptError("the model has no tokenizer: pass calibration data as token ids")
        ids = [t for text in calibration for t in tokenizer.encode(text, add_special_tokens=False)]
        source = source or "text"
    else:
        ids = [int(t) for item in calibration for t in item]
        source = source or "token ids"
    ids = ids[:max_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise InvalidPromptError(f"calibration data has {len(ids)} tokens: need at least 2")
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return CalibrationData(windows, source, digest)
