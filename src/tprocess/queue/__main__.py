"""`python -m tprocess.queue enqueue|queue ...`: the queue commands on their own."""

from .commands import main

raise SystemExit(main())
