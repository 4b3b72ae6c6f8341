"""``python -m pathfactor``: the same as the ``pathfactor`` command."""
import sys

from .cli import main

sys.exit(main())
