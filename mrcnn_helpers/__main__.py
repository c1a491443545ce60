"""`python -m mrcnn_helpers ...` is the `mrcnn` command."""

import sys

from .cli import main

sys.exit(main())
