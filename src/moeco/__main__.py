"""`python -m moeco ...` (and `torchrun -m moeco ...`) runs the CLI."""

import sys

from moeco.cli import main

sys.exit(main())
