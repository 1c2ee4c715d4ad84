import sys

if __package__ in (None, ""):
    # run as a file (``tether.command``, with -P): this file's own tether, also
    # when the process that started us found it only in its working directory
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _root not in sys.path:
        sys.path.insert(0, _root)

from tether.cli import main

sys.exit(main())
