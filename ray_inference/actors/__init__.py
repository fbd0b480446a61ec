"""Ray actors: the coordinator (on the head) and the inference actors (on workers)."""
