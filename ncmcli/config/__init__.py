"""The run's settings, torch-free: ``schema`` (the frozen dataclasses, their checks and the
``--set`` overrides) and ``presets`` (the YAML files, their inheritance and the sweeps).
``presets`` imports ``schema``, never the reverse."""
