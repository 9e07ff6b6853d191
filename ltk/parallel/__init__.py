"""Parallel training written from scratch on torch.distributed, and its cost model.

    dist.py          processes, the pp x dp x tp mesh, counted collectives, spawn for tests
    reference.py     the single-process yardstick every strategy is proven equal to
    ddp.py           naive DDP and bucketed, overlapped DDP (Li et al. 2020)
    zero.py, zero3.py   ZeRO stages 1, 2 and 3 (Rajbhandari et al. 2020)
    tensor.py, tp_plan.py   Megatron tensor + sequence parallelism (Shoeybi et al. 2019,
                     Korthikanti et al. 2022), plans for GPT and Llama applied from outside
    schedules.py, pipeline_sim.py, pipeline.py, pipeline_run.py
                     GPipe, 1F1B and interleaved 1F1B as data, their simulator, the executor,
                     and its composition with data parallelism (Narayanan et al. 2021)
    context_parallel.py, ring_attention.py, ulysses.py, block_attention.py
                     the sequence split over a CP group (contiguous, zig-zag), ring attention
                     (Liu et al. 2023; Brandon et al. 2023) and Ulysses (Jacobs et al. 2023)
    strategy.py      one interface for the training loop over all of them; dp_engines.py the
                     data-parallel engines behind it, named_state.py state by parameter name
    cost.py, plan.py the formulas (memory, bytes, bubble) and `ltk plan`

Every strategy wraps a model built for one device; nothing in ltk/models/ imports this package.
"""
