"""The session of a checkpoint folder during ``fit`` (no Lightning): the options the saving callbacks share
(``options``), the session itself (``session``: writer, lock, requests, protections, after-commit steps), what a save
holds (``state``, ``rng``), backups (``backups``) and where to resume (``resume``). The callbacks are thin adapters
over it; what only a Lightning fit has (the undo handles of what is hooked into Lightning, the step plan, the resume
record and RNG states to put back, the inexact-resume warnings) is theirs: ``callbacks.context.FolderFit``, one per
Trainer and folder."""
