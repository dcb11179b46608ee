"""Batch predictions against a fleet of flaky HTTP servers: seed 000's real job, end to end.

``python -m examples.predict demo`` runs it all (``make demo``). The parts:

- :mod:`.model`: the model the servers run, and the checks a batch must pass;
- :mod:`.server`: ``POST /predict`` on hypercorn's trio worker, with fault injection;
- :mod:`.client`: CSV in, batches out through ``conveyor.run`` with retries, a per-server
  limit, the progress line and a resumable journal; predictions CSV out;
- :mod:`.demo`: 4 servers with faults on, the client over 100,000 rows, the report.
"""
