"""``python -m lorakit`` (also what ``accelerate launch -m lorakit`` runs)."""

import sys

from lorakit.cli import main

sys.exit(main())
