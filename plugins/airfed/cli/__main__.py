"""``python -m airfed.cli ...``: the same as the ``airfed`` console script."""

import sys

from airfed.cli import main

sys.exit(main())
