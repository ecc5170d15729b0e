"""Corpus, tokenizer and prompt sets."""
