"""The storage backends: one module per storage type, each a `Driver` (base.py) with its
feature table. A backend imports the model (drivers' own modules) and base.py, never another
backend or the backup wing; the registry in drivers/__init__.py names them all."""
