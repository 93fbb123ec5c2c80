"""entrl: reinforcement learning of LLM reasoning with verifiable rewards, in JAX.

The core method is SENT (Cao et al., arXiv 2512.04359): a curriculum ordered by
semantic entropy plus a token-level KL constraint on low-entropy tokens. Every
baseline of the paper's comparison is available as a named loss.
"""

__version__ = "0.1.0"
