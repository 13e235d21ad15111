"""Reading the small files beside the weights: digests and JSON objects, with one-line errors (no PyTorch: the
lite runtime uses these too)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llminfer.errors import ModelFormatError


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: JSON nested too deeply to be a model file") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data
