"""``python -m queue_processor`` runs the CLI."""

from __future__ import annotations

import sys

from queue_processor.cli import main

sys.exit(main())
