"""The runtime: loading HLWQ artifacts into transformers models, and what runs them (KV cache, kernels)."""
