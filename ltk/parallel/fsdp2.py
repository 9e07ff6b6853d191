"""PyTorch's production engines behind the interface of ltk/parallel/strategy.py: FSDP2
(`torch.distributed.fsdp.fully_shard`) over the data-parallel ranks, composed with DTensor tensor
parallelism (ltk/parallel/torch_tp.py) on a 2-D (dp, tp) DeviceMesh, torchtitan's order: the TP
plan first, then fully_shard per block and on the root over the dp mesh.

    fsdp2       every parameter a DTensor Shard(0) over dp (FSDP2's per-parameter sharding,
                Zhao et al. 2023 / torchtitan §2.1): all-gather a block before its forward and
                backward, reduce-scatter its gradients after; ZeRO-3's sharding, with
                the root gathered once a micro-batch and one reduce-scatter a step
                (cost.fsdp2_comm_bytes, counted equal by ltk/parallel/comm_meter.py)
    torch-tp    DTensor ColwiseParallel / RowwiseParallel over all ranks (dp = 1, no fully_shard)
    fsdp2 x tp  both: TP DTensors over the tp dim, then sharded over dp (FSDP2's 2-D layout)

Settings, from our flags:

    MixedPrecisionPolicy   --trainer.dtype bf16: param_dtype bf16 (the all-gathered copies the
                           forward and backward run in), reduce_dtype = --parallel.reduce_dtype
                           (auto: bf16, the gradients' dtype); the sharded parameters stay fp32,
                           so the optimizer's parameters are the fp32 masters (no MasterOptimizer)
    reshard_after_forward  --parallel.reshard_after_forward (default true: ZeRO-3, gathered twice;
                           false: kept whole from forward to backward, ZeRO-2's memory, one gather)
    prefetch               FSDP2's default: the next block's all-gather is issued while this one
                           computes (implicit forward prefetch of one module, backward likewise);
                           no explicit `set_modules_to_forward_prefetch`
    no_sync                `set_requires_gradient_sync(False)`: micro-batches before the last
                           accumulate unsharded gradients, one reduce-scatter per step
    clip_grad_norm_        ‖g‖² = Σ_p ‖g_p‖², each DTensor gradient's local ‖·‖² summed over the
                           mesh dims it is sharded on (replicated dims counted once)

Meta init: a model built on the meta device (ltk/models/init.py: every parameter tagged with its
model's init_parameter and name) is sharded on meta, `to_empty` gives each rank its local shards,
and each shard is cut from the parameter's full initial value, computed one parameter at a time
from its per-name generator — so the weights are exactly those of one process with this seed.

AdamW (ltk/training/optim.py) runs on the DTensor parameters: its moments are DTensors placed like
them. Where plain and DTensor parameters mix (torch-tp's replicated norms) or DTensors live on two
meshes (fsdp2 x tp), the optimizer runs its per-parameter loop (foreach off): same update.

Checkpoints. torch.distributed.checkpoint (DCP) saves each rank's DTensor shards with their
(offsets, sizes) and reshards on load. Our sharded format (ltk/training/sharded_checkpoint.py) is
that box model in our own files, and these engines write it too: each rank's box of a parameter is
its DTensor's local shard (shard_state.dtensor_boxes). One format for every engine beats DCP's
files here: a run saved by fsdp2 resumes under our ZeRO-3, on one process or under torch-tp, and
the other way round, at any world size, and `ltk generate` / `ltk export --hf` read it without a
converter (DCP's files would need dcp_to_torch_save first, and our engines could not resume them).
Resume is exact: N steps + resume + N == 2N bit for bit on a CPU.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate

from ltk.models.init import initial_value, materialized
from ltk.parallel.mixed import as_dtype

ENGINES = ("fsdp2", "torch-tp")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: every child of an nn.ModuleList (GPT's h, Llama's layers)."""
    out = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    if not out:
        raise ValueError(f"fsdp2 shards {type(model).__name__} block by block, but it has no nn.ModuleList of blocks")
    return out


def device_mesh(dp: int, tp: int, device: torch.device):
    """The (dp, tp) DeviceMesh over the world, tp innermost as ltk.parallel.dist.Mesh orders ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def shard_model(model: nn.Module, dp_mesh, *, compute_dtype: str, reduce_dtype: str,
                reshard_after_forward: bool, block_list: list[nn.Module] | None = None) -> None:
    """fully_shard every block (default: `blocks(model)`), then the root (embeddings, final norm,
    head), over dp_mesh."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns that a block returns a view (DTensor TP's to_local outputs, the head's logits): an
    # in-place op on it would skip the pre-backward hook. Our models only add out of place (the
    # residual adds are fused into the next norm, ltk/models/norms.py), so the warning says nothing here
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy()
    if as_dtype(compute_dtype) != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=as_dtype(compute_dtype), reduce_dtype=as_dtype(reduce_dtype))
    for block in blocks(model) if block_list is None else block_list:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # the root's parameters are used first (embeddings) and last (head): resharding them after the
    # forward would only gather them again for the backward at once (torchtitan keeps them, too)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)


def storage_as_parameters(model: nn.Module) -> int:
    """QLoRA under FSDP2: fully_shard shards parameters, never buffers, so NF4Linear's storage
    (ltk/kernels/nf4.py) would stay whole on every rank. Its integer buffers — the packed 4-bit
    codes and the double-quantized absmax codes, all but ~0.03% of its bytes — become frozen
    parameters (requires_grad False: no gradient, no optimizer state, nothing reduced) that FSDP2
    shards like any weight (dim 0 over dp, all-gathered per block; a block's mixed dtypes go
    through one uint8 all-gather): the byte sharding of the FSDP + QLoRA recipes. The fp32
    statistics (one scale per 256 blocks, one offset a layer) stay replicated buffers, since
    FSDP2's mixed precision would cast a floating parameter to bf16 (it leaves integer ones
    alone). Returns how many buffers were converted."""
    from ltk.kernels.nf4 import NF4Linear

    n = 0
    for mod in model.modules():
        if isinstance(mod, NF4Linear):
            for name in [k for k, b in mod._buffers.items() if b is not None and not b.is_floating_point()]:
                buf = mod._buffers.pop(name)
                param = nn.Parameter(buf, requires_grad=False)
                if hasattr(buf, "_ltk_init"):  # on meta: how its value is made (ltk/training/instruct_setup.py)
                    param._ltk_init = buf._ltk_init
                mod.register_parameter(name, param)
                n += 1
    return n


def local_part(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's block of a DTensor (the whole tensor otherwise)."""
    if not isinstance(p, DTensor):
        return tuple(p.shape), (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(shape), tuple(offset)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's memory of t: the local shard of a DTensor, t itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def materialize_local(model: nn.Module, tags: dict[str, tuple], device: torch.device,
                      layout: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Give every meta parameter its local storage and fill it with its block of the parameter's
    full initial value (tags: name -> (init, name) taken before sharding; layout: name, full ->
    the full tensor in the DTensor's own layout, e.g. torch_tp's head-major qkv)."""
    if not any(p.is_meta for p in model.parameters()):
        return
    saved = [(mod, k, b) for mod in model.modules() for k, b in mod._buffers.items() if b is not None]
    model.to_empty(device=device)  # buffers too: put the real ones (RoPE tables, ...) back
    for mod, k, b in saved:
        mod._buffers[k] = b
    for name, p in model.named_parameters():
        if name not in tags:
            raise ValueError(f"{name} was on the meta device without an init tag (build with build_on_meta)")
        full = initial_value(tags[name], p.shape, p.dtype)  # on the CPU, as a whole model is initialized
        if layout is not None:
            full = layout(name, full)
        shape, offset = local_part(p)
        block = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        local(p).copy_(block)
        del full, block  # one parameter's full value at a time
    for mod, k, b in saved:  # a meta buffer (QLoRA's fp32 NF4 statistics, replicated) made from its tag, after
        if b.is_meta:        # its layer's parameters (the packed codes), which quantize the layer once for both
            mod._buffers[k] = materialized(b, device)


def init_tags(model: nn.Module) -> dict[str, tuple]:
    return {n: p._ltk_init for n, p in model.named_parameters() if p.is_meta and hasattr(p, "_ltk_init")}


def _mesh_key(p: torch.Tensor) -> tuple | None:
    if not isinstance(p, DTensor):
        return None
    return tuple(p.device_mesh.mesh.flatten().tolist()), p.device_mesh.mesh_dim_names


def _sharded_dims(t: DTensor) -> tuple[int, ...]:
    return tuple(i for i, pl in enumerate(t.placements) if not isinstance(pl, Replicate))


class TorchEngine:
    """The engine interface (dp_engines.py) over a model whose parameters are DTensors (FSDP2,
    DTensor TP or both) or plain replicated tensors: torch's AdamW on them as they are."""

    def __init__(self, model: nn.Module, param_groups, optimizer_factory: Callable, *, fsdp: bool):
        self.module, self.fsdp = model, fsdp
        self.optimizer = optimizer_factory(param_groups)
        if len({_mesh_key(p) for p in model.parameters()}) > 1:
            # plain and DTensor parameters (torch-tp's norms), or DTensors on two meshes (fsdp2 x tp:
            # the norms are sharded over dp only): the multi-tensor kernels refuse the mix, the
            # per-parameter loop computes the same update
            for g in self.optimizer.param_groups:
                g["foreach"] = False
        self.names = {id(p): n for n, p in model.named_parameters()}

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def reshard(self) -> None:
        """Free every gathered parameter and register the sharded DTensors again. A forward
        without backward (evaluation) leaves the modules not resharded after forward (the root,
        or all with --parallel.reshard_after_forward false) holding whole tensors under the
        parameters' names; whatever reads parameters by name (checkpoints) calls this first."""
        from torch.distributed.fsdp import FSDPModule

        for mod in self.module.modules():
            if isinstance(mod, FSDPModule):
                mod.reshard()

    @contextlib.contextmanager
    def no_sync(self):
        if not self.fsdp:  # DTensor TP alone: its collectives are in the forward and backward, none to defer
            yield
            return
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global gradient norm, clipped to max_norm where finite (module docstring)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        buckets: dict[tuple, list] = {}  # (mesh, sharded dims) -> [local Σ g²]
        for p in params:
            g = p.grad
            if isinstance(g, DTensor):
                if g.placements != p.placements:  # a pending partial sum: make it the parameter's layout
                    g = p.grad = g.redistribute(placements=p.placements)
                key = (id(g.device_mesh), _sharded_dims(g))
                buckets.setdefault(key, [g.device_mesh, []])[1].append(g.to_local().float().pow(2).sum())
            else:
                buckets.setdefault((None, ()), [None, []])[1].append(g.float().pow(2).sum())
        total = torch.zeros((), dtype=torch.float64)
        for (_, dims), (mesh, sums) in buckets.items():
            sq = torch.stack(sums).sum() if sums else torch.zeros(())
            for d in dims:
                torch.distributed.all_reduce(sq, group=mesh.get_group(d))
            total += sq.double().cpu()
        norm = total.sqrt().item()
        if norm == norm and max_norm != float("inf"):
            coef = min(1.0, max_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            for p in params:
                p.grad.mul_(coef)
        return norm

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole under its name, in the single-process layout (collective)."""
        from ltk.parallel.torch_tp import to_single_layout

        self.reshard()
        return {n: to_single_layout(self.module, n, _full(p.detach())) for n, p in self.module.named_parameters()}

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The single-process optimizer state by parameter name (collective: moments gathered)."""
        from ltk.parallel.named_state import by_name_state
        from ltk.parallel.torch_tp import to_single_layout

        sd = by_name_state(self.optimizer, self.names)
        for n, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, DTensor):
                    st[k] = to_single_layout(self.module, n, _full(v))
        return sd

    def load_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        raise NotImplementedError("the DTensor engines load optimizer state from sharded checkpoints "
                                  "(ltk/training/reshard.py), box by box")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def build_torch_engine(model: nn.Module, param_groups_fn: Callable, optimizer_factory: Callable, *, strategy: str,
                       dp: int, tp: int, device: torch.device, compute_dtype: str = "fp32",
                       reduce_dtype: str | None = None, reshard_after_forward: bool = True,
                       sequence_parallel: bool = False) -> TorchEngine:
    """`strategy` (fsdp2 or torch-tp) on a dp x tp DeviceMesh: the DTensor TP plan where tp > 1,
    then fully_shard over dp (fsdp2), then the local shards of a meta model made and initialized,
    then AdamW on the parameters as they are now (module docstring)."""
    if strategy not in ENGINES:
        raise ValueError(f"unknown torch engine {strategy!r}; choose one of {', '.join(ENGINES)}")
    if strategy == "torch-tp" and (dp != 1 or tp < 2):
        raise ValueError(f"torch-tp runs DTensor tensor parallelism over every rank (dp 1), got dp {dp} x tp {tp}: "
                         "with data parallelism use fsdp2 with --parallel.tp")
    if strategy == "torch-tp" and as_dtype(compute_dtype) != torch.float32:
        raise ValueError("torch-tp trains in fp32 (there is no fp32 master for DTensor parameters without FSDP2's "
                         "mixed precision): for bf16 use --parallel fsdp2 --parallel.tp N")
    from ltk.parallel.torch_tp import apply_torch_tp, to_dtensor_layout

    mesh = device_mesh(dp, tp, device)
    if strategy == "fsdp2":
        storage_as_parameters(model)  # before the tags are taken: a meta NF4 buffer's tag moves to its parameter
    tags = init_tags(model)
    if tp > 1:
        apply_torch_tp(model, mesh["tp"], sequence_parallel=sequence_parallel)
    if strategy == "fsdp2":
        shard_model(model, mesh["dp"], compute_dtype=compute_dtype, reduce_dtype=reduce_dtype or compute_dtype,
                    reshard_after_forward=reshard_after_forward)
    materialize_local(model, tags, device, layout=lambda name, full: to_dtensor_layout(model, name, full))
    engine = TorchEngine(model, param_groups_fn(model), optimizer_factory, fsdp=strategy == "fsdp2")
    engine.mesh = mesh
    return engine
