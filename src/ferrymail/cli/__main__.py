"""``python -m ferrymail.cli``."""

import sys

from ferrymail.cli import main

sys.exit(main())
