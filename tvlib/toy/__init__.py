"""The embedded tiny model's factory: its training data, tokenizer, training, SAEs and card.

``python -m tvlib.toy train`` rebuilds everything under ``data/toy/`` from the
task files and a seed: a word-level tokenizer, a small Llama-architecture
decoder (rotary positions, the same module paths as Gemma) trained on few-shot
sequences and fact sentences, and one gated SAE per layer at resid_pre,
trained with sae-lens. ``python -m tvlib.toy card`` measures the shipped model
and writes its model card.
"""
