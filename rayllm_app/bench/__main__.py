"""``python -m rayllm_app.bench ...``: the same as ``rayllm bench ...``."""

import sys

from rayllm_app.bench.runner import main

sys.exit(main())
