"""One runtime per (backend, kind), behind the ``Runtime`` protocol (``protocol.py``); the
factory looks them up in the ``RuntimeTable`` it is given (``table.py``)."""
