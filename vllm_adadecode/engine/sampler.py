"""Position-keyed sampling in vLLM's CPU sampler (``vllm_adadecode.sampling``
holds the keys; this module puts them into vLLM's sampling path)."""

from __future__ import annotations

import torch

from .. import sampling
from .drafter import drafter_of
from .patching import patch


def install_keyed_sampling() -> None:
    """Position-keyed noise in vLLM's CPU sampler (AdaDecode workers with
    ``sampled_drafts``): inside ``sampling.keyed(keys)``, row i is drawn with
    vLLM's Gumbel-max kernel seeded by ``keys[i]``, after vLLM's own top-k and
    top-p; every step's keys come from the runner's requests (seed, position)."""
    from vllm.v1.sample.ops import topk_topp_sampler as tts
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def forward_cpu(original):
        def forward_cpu(self, logits, generators, k, p):
            keys = sampling.active_keys()
            if keys is None or self.use_fp64_gumbel or keys.shape[0] != logits.shape[0]:
                return original(self, logits, generators, k, p)
            logits = tts.apply_top_k_top_p(logits, k, p)
            to_return = None
            if self.logprobs_mode == "processed_logits":
                to_return = logits
            elif self.logprobs_mode == "processed_logprobs":
                to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
            return gumbel_argmax(logits, keys), to_return
        return forward_cpu

    patch(tts.TopKTopPSampler, "forward_cpu", forward_cpu)
    original_cpu = tts.TopKTopPSampler.forward_cpu.__wrapped__

    def _sample(original):
        def _sample(self, logits, spec_decode_metadata):
            seeds = getattr(drafter_of(self), "sampling_seeds", None)
            if seeds is None or not self.input_batch.random_reqs:
                # Nothing to draw (greedy rows need no noise).
                return original(self, logits, spec_decode_metadata)
            ts = self.sampler.topk_topp_sampler
            if getattr(ts.forward, "__func__", None) is original_cpu:
                # The sampler bound vLLM's CPU method before the drafter existed.
                ts.forward = ts.forward_cpu
            step = step_keys(self, seeds, spec_decode_metadata)
            self.rejection_sampler._adadecode_step = step
            try:
                with sampling.keyed(step.at_depth(0)):
                    return original(self, logits, spec_decode_metadata)
            finally:
                self.rejection_sampler._adadecode_step = None
        return _sample

    patch(GPUModelRunner, "_sample", _sample)

    def _bookkeeping_sync(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            # vLLM rolls a seeded request's generator back when its sampled
            # token is discarded (a prompt prefilled in chunks), with
            # set_offset, which CPU generators do not have: the engine dies
            # (vLLM 0.32, CPU). With position-keyed sampling the generators
            # draw nothing to roll back.
            if getattr(drafter_of(self), "sampling_seeds", None) is None:
                return original(self, *args, **kwargs)
            gens, self.input_batch.generators = self.input_batch.generators, {}
            try:
                return original(self, *args, **kwargs)
            finally:
                self.input_batch.generators = gens
        return _bookkeeping_sync

    patch(GPUModelRunner, "_bookkeeping_sync", _bookkeeping_sync)


def step_keys(runner, seeds, spec_decode_metadata):
    """Per request of this step: its seed, and the position its first logits
    row predicts (the position after its last scheduled token, minus its drafts)."""
    import numpy as np

    batch = runner.input_batch
    n = batch.num_reqs
    ends = runner.query_start_loc.np[1: n + 1].astype(np.int64) - 1
    if spec_decode_metadata is not None:
        ends = ends - np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64)
    first = runner.positions[torch.from_numpy(ends)].cpu().numpy() + 1
    req_seeds = np.empty(n, dtype=np.int64)
    for i, req_id in enumerate(batch.req_ids[:n]):
        state = runner.requests.get(req_id)
        seed = state.sampling_params.seed if state is not None and state.sampling_params else None
        req_seeds[i] = seeds.get(req_id, seed)
    if len(seeds) > 4 * n + 64:
        seeds.retain(set(batch.req_ids[:n]))
    return sampling.StepKeys(req_seeds, first)


def keyed_sampling_supported() -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    # vLLM's own loader picks the kernel library this CPU runs (_C, _C_AVX512
    # or _C_AVX2); importing vllm._C by name would load a second library that
    # registers the same operators, which aborts the process on CPUs without
    # AVX512-BF16.
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "fused_gumbel_argmax")


def gumbel_argmax(logits: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU Gumbel-max draw of each row, its noise keyed by ``row_keys``."""
    return torch.ops._C.fused_gumbel_argmax(logits.to(torch.float32).contiguous(),
                                            row_keys.to(torch.int64).contiguous())


def keyed_draw(logits: torch.Tensor, row_keys: torch.Tensor, temperature: float,
               top_k: int | None, top_p: float | None) -> torch.Tensor:
    """A drafter's draw: temperature, vLLM's top-k/top-p, then the keyed Gumbel-max."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    n = logits.shape[0]
    x = logits.to(torch.float32) / max(temperature, 1e-5)
    k = None if top_k is None else torch.full((n,), top_k, dtype=torch.int32)
    p = None if top_p is None else torch.full((n,), top_p, dtype=torch.float32)
    return gumbel_argmax(apply_top_k_top_p(x, k, p), row_keys)
