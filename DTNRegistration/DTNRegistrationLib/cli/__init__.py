"""The ``dtnreg`` command line (``python -m DTNRegistrationLib.cli``): one registration, batches, the demo.

Nothing is imported here: the subcommands load the engine when they run.
"""
