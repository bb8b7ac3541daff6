"""``python -m DTNRegistrationLib.cli ...``: how the Slicer module and the benchmarks start the command line."""

from .commands import main

raise SystemExit(main())
