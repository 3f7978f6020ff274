"""Backups: the chunk store (a backup storage type) and the data path into and out of it.
It imports the model (drivers' own modules) and reaches volumes only through the `Driver`
interface, never a backend module."""
