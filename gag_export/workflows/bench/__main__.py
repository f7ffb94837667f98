"""`python -m gag_export.workflows.bench --worker CONFIG OUT`: the child process of isolate="backend"/"variant"."""

import logging
import sys
from pathlib import Path

from .run import worker

if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
else:
    sys.exit("usage: python -m gag_export.workflows.bench --worker CONFIG.json OUT.json (use `gag-export bench`)")
