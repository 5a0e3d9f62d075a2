"""The run folder and what it holds: ``rundir.RunDir`` (its one owner), file names and atomic
writes (``runfiles``), checkpoints (``checkpoint``), the resumable train state (``trainstate``),
TensorBoard (``tblog``) and the lineage of ``--extend`` runs (``incremental``)."""
