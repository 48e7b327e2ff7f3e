"""``python -m stampray`` is the ``stampray`` command."""

import sys

from .cli import main

sys.exit(main())
