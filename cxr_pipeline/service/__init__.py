"""The running service around the pipeline: what keeps accepted images safe and sends results.

``spool`` (durable files) and ``ledger`` (SQLite job rows), ``jobs`` (the in-process worker
pool's unit of work), ``delivery`` and ``send`` (C-STORE to the destinations, with
retries), ``tls``, ``audit`` and ``syslog`` (the PS3.15 audit trail), ``metrics``
(Prometheus) and ``warmup``. May import everything below it (the shared top-level modules,
``dicom``, ``model``, ``explain``, ``encode``, ``pipeline``); ``batch`` may use it, nothing
lower may.
"""
