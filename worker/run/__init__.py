"""Starting a node: the launcher behind `make run`, the worker's entry point, a local Redis
when none answers, Flower. It imports the engine and drivers; nothing imports it but the
Procfile, the Makefile and tests."""
