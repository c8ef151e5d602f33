"""The production launcher's door: `python serve.py --workers N` (the code is in gateway/serve.py).

Kept at the root so the command stays short and the project folder is on `sys.path` for the
supervisor and the workers it starts through this same file."""

import sys

from gateway.serve import main

if __name__ == "__main__":
    sys.exit(main())
