"""The errors AdaDecode raises on bad input, in one module every other imports.

Each names the field (or file) at fault and what is allowed, at engine start.
"""

from __future__ import annotations


class AdaDecodeConfigError(ValueError):
    """Bad AdaDecode input; the message names the field and what is allowed."""


class CorpusError(ValueError):
    """A draft corpus that is not one 1-D tensor of token ids within the vocabulary."""


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the one version this package is written for."""


class UnsupportedModel(AdaDecodeConfigError):
    """A model architecture the drafter has no adapter for."""
