"""The interface vLLM's runner hooks (``install.py``, ``rpc.py``,
``sampler.py``) call on the drafter. ``AdaDecodeProposer`` implements it."""

from __future__ import annotations


class RunnerDrafter:
    """A drafter the patched model runner talks to.

    vLLM builds it as its custom-class proposer and calls ``load_model``; the
    hooks installed by ``install.install_runner_hooks`` then call the rest:

    * ``propose_for_runner`` instead of vLLM's ``propose_draft_token_ids``:
      the drafts for the next step, one list per request of the batch;
    * ``deferred_forward`` (None when off) instead of the runner's forward, in a
      step that verifies drafts; None from it means vLLM's own forward runs;
    * ``warm_up`` after vLLM's own warm-up;
    * ``sampling_seeds`` (None when off): per-request seeds for position-keyed
      sampling;
    * ``stats`` and ``reset_lookup_cache`` from the worker RPCs.
    """

    sampling_seeds = None
    deferred_forward = None

    def load_model(self, target_model) -> None:
        raise NotImplementedError

    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        raise NotImplementedError

    def propose(self, *args, **kwargs):  # vLLM's custom-class proposer signature
        raise RuntimeError(
            f"{type(self).__name__}.propose is never called: the runner hook installed by "
            "vllm_adadecode.engine.install calls propose_for_runner; the hook is missing")

    def warm_up(self) -> None:
        pass

    def stats(self, reset: bool = True) -> dict:
        raise NotImplementedError

    def reset_lookup_cache(self) -> int:
        return 0


def drafter_of(runner) -> RunnerDrafter | None:
    """The runner's drafter when it is an AdaDecode one, else None."""
    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, RunnerDrafter) else None
