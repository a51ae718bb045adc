"""``python -m factorlm``: the same command line as the ``factorlm`` script."""

import sys

from .cli import main

sys.exit(main())
