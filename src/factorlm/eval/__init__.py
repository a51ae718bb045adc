"""Quality evaluation of dense and factored models (perplexity)."""
