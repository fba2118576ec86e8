"""Speed and quality benchmarks: each script prints one JSON object as its last stdout line."""
