"""``python -m phabmesh.kubectl``: the ``kubectl-phabmesh`` command."""

import sys

from phabmesh.kubectl import main

sys.exit(main.main())
