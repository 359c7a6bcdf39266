"""Training recipes, importable so the `rat-train` console script and `recipes/*.py` share one implementation."""
