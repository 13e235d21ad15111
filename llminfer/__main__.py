"""`python -m llminfer ...` (and `torchrun -m llminfer ...`) is the `llminfer` command."""

import sys

from llminfer.cli.main import main

sys.exit(main())
