"""``python -m meshnode.cli``: meshctl."""

import sys

from .meshctl import main

sys.exit(main())
