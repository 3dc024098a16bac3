"""``python -m common.phantom``: see :func:`common.phantom.io.main`."""

from common.phantom.io import main

raise SystemExit(main())
