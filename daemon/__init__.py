"""imputationd: drive genotype-imputation jobs through remote imputation servers."""

import sys

__version__ = "0.1.0"

# httpx imports its command-line tool (and with it click) whenever click is installed, and Flask (the API's
# framework) installs it: 0.8 MiB of every daemon's RSS for a tool it never runs, and the ratio to the Celery stack
# has less room than that (bench/README). Marking the module absent makes httpx define its placeholder instead.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
