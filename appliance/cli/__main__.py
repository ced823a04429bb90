"""`python -m appliance.cli`."""

import sys

from . import main

sys.exit(main())
