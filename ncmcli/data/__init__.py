"""Data: the data sets and their on-disk formats (``datasets``, ``folders``, ``foldercache``,
``images``, ``fakedata``), class subsets and long-tail profiles (``subsets``), the replay memory
(``replay``) and the device-side batches that feed a step (``batching``)."""
