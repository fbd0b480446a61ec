"""What runs on each node: the head (coordinator + gateway) and the worker agent."""
