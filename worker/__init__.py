"""The Celery side of stork; it imports drivers, never producer.

This folder is the engine: the Celery app, step tasks, the runner (undo/commit), job records,
events, locks, liveness, recovery and dead letters. `jobs/` is the job catalogue (kinds as
data, their steps, submit-time checks, backups, schedules); `run/` starts a node (launcher,
worker entry point, local Redis, Flower)."""
