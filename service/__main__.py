"""``python -m service``: the same command line as ``rightfoot-poller``."""

import sys

from service import main

sys.exit(main())
