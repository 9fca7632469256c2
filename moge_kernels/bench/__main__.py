"""`python -m moge_kernels.bench`: see moge_kernels/bench/__init__.py."""
import sys

from .cli import main

sys.exit(main())
