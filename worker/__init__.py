"""The Celery side of stork: app, job records, step tasks, locks, events, reconciliation."""
