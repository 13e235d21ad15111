"""Loads model paths read from stdin, one per line, under an address-space cap; prints one JSON line per path:
how it ended (loaded, refused with our typed error, or crashed), in how long, and the process's peak RSS."""

import json
import resource
import sys
import time

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

from llminfer.errors import LLMInferError  # noqa: E402 - after the cap, so imports count against it too
from llminfer.loading.resolve import open_checkpoint  # noqa: E402

for line in sys.stdin:
    path, started = line.rstrip("\n"), time.monotonic()
    try:
        checkpoint = open_checkpoint(path)
        checkpoint.config  # noqa: B018 - the config and its checks against the tensors
        tokenizer = checkpoint.tokenizer()
        if tokenizer is not None:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
        outcome, message = "loaded", ""
    except (LLMInferError, OSError) as exc:
        outcome, message = "refused", str(exc)
    except BaseException as exc:  # noqa: BLE001 - the bug this worker exists to report
        import traceback

        where = traceback.format_exc().replace("\n", " | ")[-1500:]
        outcome, message = "crashed", f"{type(exc).__name__}: {exc} | {where}"
    print(json.dumps({"outcome": outcome, "message": message[:2000], "seconds": time.monotonic() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
