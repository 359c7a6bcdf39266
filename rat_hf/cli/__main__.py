"""`python -m rat_hf.cli TOOL ARGS...`: the console scripts without installing them."""

import sys

from . import main

sys.exit(main())
