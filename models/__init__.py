"""The model zoo. Each family lives in its own file, written for one device; parallelism is
applied from outside (parallel/)."""
from models.gpt import GPT, GPTConfig, flops_per_token, gpt_config, num_params

__all__ = ["GPT", "GPTConfig", "flops_per_token", "gpt_config", "num_params"]
