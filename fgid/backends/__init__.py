"""Model backends: `lite` (CPU, installs from PyPI) and `full` (the models the papers used)."""
