"""Process entry points: the control worker and the node worker."""
