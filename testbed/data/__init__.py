"""Domain sources, tokenizer, and the domain-mix data module."""
