"""`vishwamai-edge eval`: what quantization (or pruning, or fine-tuning) cost in quality, measured on the bundles
themselves in their own runtime: perplexity over a text and, against a reference bundle, the KL divergence of
every token's distribution, as llama.cpp's llama-perplexity reports them."""
