"""vllm-adadecode: AdaDecode self-speculative decoding for vLLM.

vLLM loads ``register`` from the ``vllm.general_plugins`` entry point in every
process. It installs pass-through hooks that act only when an engine is started
with ``speculative_config={"method": "adadecode", ...}`` (or ``--spec-model``
naming an AdaDecode heads folder).
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM plugin entry point; safe to call any number of times."""
    global _registered
    if _registered:
        return
    from .engine import install

    install.install_engine_hooks()
    _registered = True
