"""The runner's batch and attention metadata as the drafter sees them, and the
other small reaches into vLLM the drafter needs (tensor-parallel agreement,
vLLM's n-gram matcher, torch.compile counters)."""

from __future__ import annotations

import torch


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

    def plain(self, row: int) -> bool:
        """A request whose token at a position depends on nothing but that
        position's logits (and, sampled, its seed and the position): no
        penalties, bad words, logit bias, allowed tokens, min-tokens, logprobs
        or structured output. A token tree's node is drawn like that."""
        state = self.runner.requests.get(self.req_id(row))
        sp = getattr(state, "sampling_params", None)
        if sp is None:
            return False
        return (sp.logprobs is None and not sp.prompt_logprobs and sp.presence_penalty == 0
                and sp.frequency_penalty == 0 and sp.repetition_penalty == 1
                and not sp.bad_words and not sp.logit_bias and not sp.allowed_token_ids
                and not sp.min_tokens and sp.structured_outputs is None)

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

    def attention(self, *, positions, rows, query_lens,
                  rope_positions=None) -> "AttentionContext":
        """Attention metadata and KV slots for a contiguous query suffix of each
        request in ``rows`` (positions in flat order): build once, then run any
        number of layer segments inside it. ``rope_positions`` (default: the
        positions) are the rotary positions, when they differ from the slots'
        (a token tree's off-chain nodes)."""
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
        rope = pos if rope_positions is None else torch.as_tensor(rope_positions,
                                                                  dtype=torch.int64)
        return AttentionContext(self.runner.vllm_config, rope, attn_metadata, slots)


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
