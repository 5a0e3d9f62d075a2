"""Reports over finished runs: the paper's numbers and labels (``paper``), gathering runs into cells (``collect``), tables (``tables``) and figures (``figures``)."""
