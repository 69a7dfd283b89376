"""transformers' ``Trainer`` for a model that ``tp.apply`` sharded.

Use ``tp.trainer.Trainer`` where you would use ``transformers.Trainer``; the arguments are the same.
Unchanged, transformers' Trainer (5.24, with accelerate 1.15) treats the ranks of a tensor-parallel
group as data-parallel replicas, which a sharded model is not:

- accelerate wraps the model in ``DistributedDataParallel`` over all ranks (on CPU processes its
  first broadcast fails on the DTensor parameters; on GPUs accelerate refuses them);
- accelerate's data loader gives every rank its own slice of the data, while every rank of a
  tensor-parallel group must compute on the same batch;
- a checkpoint is written by rank 0 alone from its local shards.

transformers' own remedy, ``TrainingArguments(parallelism_config=ParallelismConfig(tp_size=N))``, asks
for a model that transformers itself sharded (``model.tp_size``) and is refused on CPU processes
(accelerate accepts it only on accelerators). This Trainer instead tells accelerate what the model
already is: the model owns its placement and gradient reductions (the path transformers takes for a
model it sharded at load time: no DDP wrap), the data loader deals batches by tensor-parallel group
(accelerate's ``"tp"`` mesh dimension: every rank of the group gets the same batch), and saving goes
through ``tp.save_pretrained`` on every rank. Gradient clipping and the default fused AdamW work
unchanged, since every parameter of a sharded model is a DTensor on the tensor-parallel mesh.

Not yet: data parallelism over several tensor-parallel groups (FSDP2 + TP) under the Trainer, and
checkpoints holding the optimizer state (resuming); pass ``save_only_model=True`` (the model is
saved whole, as ``tp.save_pretrained`` writes it) or ``save_strategy="no"``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpoint import save_pretrained
from .errors import MeshError, PlanError


def tensor_parallel_mesh(model: nn.Module) -> DeviceMesh:
    """The 1-D mesh ``tp.apply`` sharded ``model`` over, checked to be one the Trainer can train on:
    every trainable parameter a DTensor on it, and its ranks every rank of the job."""
    meshes = {param.device_mesh for param in model.parameters() if isinstance(param, DTensor)}
    if not meshes:
        raise PlanError(f"tp.trainer.Trainer trains a model that tp.apply sharded; {type(model).__name__} has no "
                        "sharded parameter: call tp.apply(model, mesh) first, or use transformers.Trainer")
    if len(meshes) > 1 or next(iter(meshes)).ndim != 1:
        raise MeshError("tp.trainer.Trainer trains a model sharded over one 1-D tensor-parallel mesh; this model's "
                        f"parameters are on {len(meshes)} mesh(es) of shapes "
                        f"{sorted({tuple(m.shape) for m in meshes})} (FSDP2 + TP under the Trainer is not supported yet)")
    mesh = next(iter(meshes))
    if mesh.size() != dist.get_world_size():
        raise MeshError(f"tp.trainer.Trainer: the model is sharded over {mesh.size()} of the job's "
                        f"{dist.get_world_size()} ranks; data parallelism over several tensor-parallel groups is "
                        f"not supported yet: launch {mesh.size()} processes")
    return mesh


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` for a model sharded by ``tp.apply``: the same arguments and behaviour,
    with every rank of the tensor-parallel group training on the same batches.

    Launch one process per tensor-parallel rank (``torchrun --nproc-per-node N``); on CPU processes
    pass ``use_cpu=True`` as for any distributed CPU run.

    Example::
        >>> mesh = init_device_mesh("cuda", (2,))
        >>> tp.apply(model, mesh)
        >>> args = TrainingArguments("out", max_steps=100, save_only_model=True)
        >>> tp.trainer.Trainer(model=model, args=args, train_dataset=dataset).train()
    """

    def __init__(self, model: nn.Module | None = None, args: transformers.TrainingArguments | None = None,
                 *positional, **kwargs):
        if model is None:
            raise PlanError("tp.trainer.Trainer needs the sharded model itself (model=...), not a model_init")
        self._tp_mesh = tensor_parallel_mesh(model)  # before super().__init__, which creates the accelerator
        super().__init__(model, args, *positional, **kwargs)
        if self.args.save_strategy != "no" and not self.args.save_only_model:
            raise ValueError("tp.trainer.Trainer cannot checkpoint the optimizer state of a sharded model yet (the "
                             "Trainer writes rank 0's shards only): pass save_only_model=True or save_strategy='no'")
        # transformers' flag for a model that owns its placement and gradient reductions (one it sharded
        # at load time): accelerate prepares it without a DistributedDataParallel wrap.
        self.is_distributed_loading_by_transformers = True

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate's data loaders deal one batch to all the ranks of a "tp" mesh dimension.
        mesh = self._tp_mesh
        if mesh.mesh_dim_names != ("tp",):
            mesh = init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("tp",))
        self.accelerator.state.device_mesh = mesh

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """A sharded model stays where ``tp.apply`` put it, on its mesh's devices. ``model.to(device)``
        would rebuild its parameters, and with them drop the layout tags that ``tp.save_pretrained``
        gathers fused parameters by (phi3's ``qkv_proj`` would be saved permuted)."""

    def get_tp_size(self) -> int:
        return self._tp_mesh.size()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every rank gathers the parameters, rank 0 writes an ordinary checkpoint (``tp.save_pretrained``);
        then the files the Trainer adds (tokenizer, training arguments) as usual."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_pretrained(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir)
        if self.args.should_save:
            processing_class = self.processing_class or getattr(self.data_collator, "tokenizer", None)
            if processing_class is not None:
                processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
