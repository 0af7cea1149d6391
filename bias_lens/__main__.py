"""``python -m bias_lens`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
