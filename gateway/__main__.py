"""``python -m gateway`` runs the ``cosigner`` command."""

import sys

from gateway.cli import main

sys.exit(main())
