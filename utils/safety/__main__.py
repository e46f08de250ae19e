"""``python -m utils.safety <command>``: the command line of ``utils.safety.study``."""
import sys

from .study import main

sys.exit(main())
