"""The job catalogue: kinds declared as data (kinds.py), their steps, the checks at submit
(prepare*, params, usage), backups and schedules. It imports the engine (worker's own
modules) and drivers; a step reads what it needs of a job's kind through its context."""
