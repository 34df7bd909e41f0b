"""Small FLUX models built offline for tests and benchmarks; serving code never imports this."""
