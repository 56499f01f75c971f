"""``python -m simvg ...`` (and ``torchrun -m simvg train ...``)."""

import sys

from simvg.cli import main

sys.exit(main())
