"""Tools built on the library: the CLI, the benchmark, the FLOPs command, evaluation and pictures."""
