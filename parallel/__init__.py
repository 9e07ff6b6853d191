"""Parallel training written from scratch on torch.distributed (DDP, ZeRO-1/2/3, tensor,
sequence and pipeline parallelism) and its cost model: to come. Until then multi-process
runs of `ltk train` use torch's own DistributedDataParallel (training/trainer.py)."""
