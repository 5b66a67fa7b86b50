"""The reliability suite: real faults against real processes, checked by one invariant checker (``pytest -m fault``)."""
