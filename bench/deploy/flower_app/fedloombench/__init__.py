"""fedloom's deployment benchmark, Flower side (see bench/deploy/README.md)."""
