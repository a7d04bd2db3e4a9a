"""The embedded tiny model: synthetic shapes scenes, tokenizers, training and evaluation."""
