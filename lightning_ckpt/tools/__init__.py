"""Tools over committed checkpoints (no Lightning): consolidation (``merge``), comparison (``diff``), deletion by rule
(``prune``), the export folder (``export``), and copies between a local folder and S3 (``transfer``)."""
