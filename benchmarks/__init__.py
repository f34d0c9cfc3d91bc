"""The latency benchmark suite (scenarios, runner, report). Not yet built: see the benchmark issue."""
