"""The Folder layer: what a folder of committed checkpoints holds and needs, between the store (bytes, one commit
protocol) and its users (the session, the S3 uploader, the callbacks, the tools): the committed records of a folder
and its runs, what no deletion takes (``needed``), the best by a recorded metric (``best``), lineage (``lineage``),
copying to and from another location (``transfer``)."""
