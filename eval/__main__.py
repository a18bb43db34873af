"""``python -m seqzoo.eval`` is ``seqzoo-eval``."""

import sys

from seqzoo.eval.cli import main

sys.exit(main())
