"""``python -m lightning_ckpt.cli``: the same as the ``lightning-ckpt`` command."""
import sys

from . import main

sys.exit(main())
