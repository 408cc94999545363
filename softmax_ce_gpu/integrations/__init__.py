"""Integrations with other libraries, one module per library, each an optional dependency.

    softmax_ce_gpu.integrations.transformers   Hugging Face transformers (pip extra 'transformers')

Importing this package imports nothing heavy; each module imports its library only when used.
"""
