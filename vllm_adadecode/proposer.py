"""AdaDecodeProposer: the drafter that runs inside vLLM's model runner.

Each draft step feeds every drafting request's newest token through the
target's own decoder layers (the same modules: no copy of weights), segment by
segment between exit layers. At each exit layer the exit head (T_i, then the
model's final norm and LM head) gives a top-1 token and probability; the token
exits at the first exit layer whose probability reaches the threshold. A
request whose token is confident at no exit layer stops drafting for this step.

Earlier drafted tokens that exited shallower than the newest token goes are
carried along (their deferred layers run batched with it), so every layer the
newest token attends through has the KV of all earlier positions. All KV goes
into the target's own paged KV blocks through the target's attention layers.
"""

from __future__ import annotations

import atexit
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import patches
from .config import AdaDecodeConfig
from .heads import ExitHeads
from .policy import carried_suffix, draft_budget, exits, top1


@dataclass
class _Draft:
    """One request's drafting state within a step."""

    row: int  # index in the runner's input batch
    token: int  # newest token: input of the current draft step
    position: int
    budget: int
    drafted: list[int] = field(default_factory=list)
    # Per drafted token (position order): hidden, residual (1 x d each), depth.
    hidden: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)


class AdaDecodeProposer:
    """vLLM drafter (loaded through vLLM's custom-class proposer hook)."""

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.config = AdaDecodeConfig.from_dict(vllm_config.additional_config["adadecode"])
        self.max_model_len = vllm_config.model_config.max_model_len
        self.model = None
        self.exit_counts: Counter[int] = Counter()
        self.seconds = 0.0  # time spent drafting
        self.layer_evals = 0  # decoder-layer token evaluations in drafting
        self.head_evals = 0  # exit-head token evaluations
        self.calls = 0
        patches.install_runner_hooks()
        self.profile = os.environ.get("VLLM_ADADECODE_PROFILE") == "1"
        if self.profile:
            atexit.register(self._report)

    def _report(self) -> None:
        print(f"[adadecode] drafting: {self.calls} calls, {self.seconds:.2f} s, "
              f"exits per layer {dict(sorted(self.exit_counts.items()))}, "
              f"layer evals {self.layer_evals}, head evals {self.head_evals}", flush=True)

    # ---- vLLM hooks ----------------------------------------------------------
    def load_model(self, target_model) -> None:
        self.model = target_model
        self.layers = patches.decoder_layers(target_model)
        hidden_size = patches.hidden_size(target_model)
        if self.config.heads:
            heads = ExitHeads.load(self.config.heads)
        else:
            heads = ExitHeads.identity(self.config.exit_layers, hidden_size)
        param = next(target_model.parameters())
        # None = identity head (skip the matmul).
        self.transforms = {
            x: None if heads.is_identity(x) else heads.transforms[x].to(param.dtype)
            for x in self.config.exit_layers
        }

    def propose(self, *args, **kwargs):  # vLLM's custom-class signature
        raise RuntimeError(
            "AdaDecodeProposer.propose is reached through the runner hook installed "
            "by vllm_adadecode.patches; the hook is missing"
        )

    # ---- drafting -----------------------------------------------------------
    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        try:
            return self._propose(runner, sampled_token_ids)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            if self.profile and self.calls % 100 == 0:
                self._report()

    @torch.inference_mode()
    def _propose(self, runner, sampled_token_ids: list[list[int]]) -> list[list[int]]:
        batch = patches.RunnerBatch(runner)
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        drafting: list[_Draft] = []
        for row, sampled in enumerate(sampled_token_ids):
            # Sampled requests get no drafts: they are sampled exactly as without speculation.
            if not sampled or not batch.is_greedy(row):
                continue
            position = batch.num_tokens(row) - 1
            budget = draft_budget(self.config.num_speculative_tokens, position, self.max_model_len)
            if budget > 0:
                drafting.append(_Draft(row, sampled[-1], position, budget))

        requests = list(drafting)
        while drafting:
            exited = self._draft_step(batch, drafting)
            drafting = [d for d in exited if len(d.drafted) < d.budget]
        for d in requests:
            out[d.row] = d.drafted
        return out

    def _draft_step(self, batch: "patches.RunnerBatch", drafting: list[_Draft]) -> list[_Draft]:
        """Draft one more token for each request; return those whose token exited."""
        new_h = patches.embed(self.model, torch.tensor([d.token for d in drafting]))
        new_res: torch.Tensor | None = None
        alive = list(range(len(drafting)))
        exited: list[_Draft] = []
        depth = -1
        for exit_layer in self.config.exit_layers:
            reqs = [drafting[i] for i in alive]
            n_carry = [carried_suffix(d.depth, depth) for d in reqs]
            hs, rs, pos, q_lens = [], [], [], []
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                if c:
                    hs.extend(d.hidden[-c:])
                    rs.extend(d.residual[-c:])
                hs.append(new_h[j : j + 1])
                if new_res is not None:
                    rs.append(new_res[j : j + 1])
                pos.extend(range(d.position - c, d.position + 1))
                q_lens.append(c + 1)
            hidden = torch.cat(hs)
            residual = torch.cat(rs) if new_res is not None else None
            hidden, residual = batch.run_layers(
                self.layers[depth + 1 : exit_layer + 1],
                hidden,
                residual,
                positions=pos,
                rows=[d.row for d in reqs],
                query_lens=q_lens,
            )
            self.layer_evals += len(pos) * (exit_layer - depth)
            self.head_evals += len(reqs)
            depth = exit_layer
            ends = torch.tensor(q_lens).cumsum(0) - 1  # row of each newest token
            token, prob = top1(self._exit_logits(exit_layer, hidden[ends], residual[ends]))
            go = exits(prob, self.config.threshold).tolist()
            token = token.tolist()
            still = []
            start = 0
            for j, (d, c) in enumerate(zip(reqs, n_carry)):
                for k in range(c):  # carried tokens now reach this depth
                    idx = len(d.depth) - c + k
                    d.hidden[idx] = hidden[start + k : start + k + 1]
                    d.residual[idx] = residual[start + k : start + k + 1]
                    d.depth[idx] = depth
                end = start + c
                if go[j]:
                    d.hidden.append(hidden[end : end + 1])
                    d.residual.append(residual[end : end + 1])
                    d.depth.append(depth)
                    d.drafted.append(token[j])
                    d.token = token[j]
                    d.position += 1
                    exited.append(d)
                    self.exit_counts[exit_layer] += 1
                else:
                    still.append(j)
                start = end + 1
            if not still:
                break
            new_h = hidden[ends[still]]
            new_res = residual[ends[still]]
            alive = [alive[j] for j in still]
        return exited

    def _exit_logits(self, exit_layer: int, hidden: torch.Tensor, residual: torch.Tensor):
        transform = self.transforms[exit_layer]
        if transform is None:
            # Identical to the model's own final step: fused add + final norm.
            normed = patches.final_norm(self.model, hidden.clone(), residual.clone())
        else:
            normed = patches.final_norm(self.model, (hidden + residual) @ transform.T, None)
        return patches.compute_logits(self.model, normed)
