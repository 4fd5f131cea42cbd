"""``python -m loraq`` (and ``torchrun -m loraq train ...``): the command line of :mod:`loraq.cli`."""

import sys

from loraq.cli import main

sys.exit(main())
