"""Queue names: each node consumes its own queue and the shared one."""

SHARED_QUEUE = "shared"  # steps touching only shared storage or guest configs: any node


def node_queue(node: str) -> str:
    return f"node.{node}"
