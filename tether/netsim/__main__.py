"""``python3 -m tether.netsim ...`` (same as ``tether netsim ...``)."""

import sys

from .cli import main

sys.exit(main())
