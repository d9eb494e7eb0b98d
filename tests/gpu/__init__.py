"""GPU-tier tests: need a CUDA device; skipped with gpu_status()'s reason elsewhere."""
