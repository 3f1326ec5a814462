"""``python -m sdmaker.serving.container``: one worker process (see :mod:`._main`)."""

import sys

from sdmaker.serving.container._main import main

sys.exit(main())
