"""Tools that measure the core (timings, memory, the GPU check); no script imports them."""
