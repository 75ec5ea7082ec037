"""``python -m lama_fast``: the ``lama-fast`` command line."""
import sys

from lama_fast.cli import main

sys.exit(main())
