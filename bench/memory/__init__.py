"""Memory benchmarks: peak host memory of pieces of a step at long context."""
