"""The router's caches beside Redis: the global prefix index (which worker holds which KV blocks), fed by the
workers' KV events, and the semantic response cache."""
