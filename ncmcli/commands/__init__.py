"""The work behind each ``ncm`` command: one module per command (the same names as ``cli/``), each a plain function that returns data and raises NcmError."""
