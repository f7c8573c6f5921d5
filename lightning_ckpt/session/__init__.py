"""The session of a checkpoint folder during ``fit`` (no Lightning): the options the saving callbacks share
(``options``), the session itself (``session``: writer, lock, requests, protections, after-commit steps), what a save
holds (``state``, ``rng``), backups (``backups``) and where to resume (``resume``). The callbacks are thin adapters
over it."""
