"""Training: the one visible loop (``loop.train``) and its optimiser and schedules
(``schedules``)."""
