"""The commands a user runs beside ``raydino pretrain`` (``raydino.cli`` dispatches to them).

``local_run`` (single-process run), ``attention_maps`` (``raydino attention``), ``compare``
(``raydino compare``), ``rehearsal`` (``python -m raydino.commands.rehearsal cluster.yaml``).
"""
