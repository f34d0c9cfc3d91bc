"""Live video plumbing: frame sources, the answer scheduler, output sinks and the run loop."""
