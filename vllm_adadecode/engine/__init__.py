"""The only place that touches vLLM internals, checked against one pinned vLLM version.

Split by job:

* ``install.py``: the version pin and the hooks on vLLM's engine start,
  config, sampling params and model runner;
* ``patching.py``: the guarded wrapping helper every hook goes through (``patch``);
* ``drafter.py``: the interface the runner hooks call (``RunnerDrafter``);
* ``rpc.py``: the methods added to vLLM's workers (``LLM.collective_rpc``)
  and the step timers behind one of them;
* ``runner.py``: the runner's batch and attention metadata as the drafter sees
  them (``RunnerBatch``, ``AttentionContext``), tensor-parallel agreement,
  vLLM's n-gram matcher;
* ``model.py``: the model adapter: decoder layers, embedding, final norm, LM
  head (one adapter per architecture family);
* ``segments.py``: decoder-layer segments, compiled like vLLM compiles the
  model, and their ahead-of-time cache;
* ``sampler.py``: position-keyed sampling in vLLM's CPU sampler;
* ``verify.py``: verification, all of it: the exact-match rule, the hook that
  replaces vLLM's rejection sampler, and the deferred forward.

Every hook is installed once per process and is a pass-through unless the
engine was configured for AdaDecode.
"""
