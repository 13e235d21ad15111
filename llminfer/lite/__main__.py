"""`python -m llminfer.lite generate ...`: the same as the `llminfer-lite` command."""

import sys

from llminfer.lite.cli import main

sys.exit(main())
