"""One module per script: a published format -> records, and the benchmark's official scorer."""
