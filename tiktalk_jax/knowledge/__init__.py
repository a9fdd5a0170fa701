"""Commonsense knowledge for TikTalk (C3KG): reading the graph, sentence encoders, retrieval and
the per-dialogue side table.

  c3kg.py              the head/relation/tail TSV reader (tails grouped by head and family)
  sentence_encoder.py  SentenceEncoder (sentence-transformers BERT in Flax) and LexicalEncoder
  retrieval.py         cached head embeddings, sharded top-k search, knowledge text per dialogue
  prepare.py           `python -m tiktalk_jax.knowledge.prepare`: writes the side table
"""
