"""``python -m attnplug``: the ``attnplug`` command."""

from attnplug.cli import main

raise SystemExit(main())
