"""The user side of stork: the `stork` CLI and the Python client."""
