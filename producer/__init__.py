"""The user side of stork: the `stork` CLI, the Python client, text views. It imports worker
(the job protocol: kinds, records) and drivers; nothing imports it."""
