"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with a MemGPT model, 2 CPU ranks over gloo.

An experiment, not a supported path: the Trainer wraps models in DDP only. Each block and then
the model are sharded; every rank trains on its half of a global batch of 8 with the loss over
global answers / ranks (as the Trainer does under DDP), and the run is compared with one
process training on the whole batch. The memory state is a returned value, so sharding the
parameters leaves it alone.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_cpu.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from memgpt import MemGPTConfig, MemGPTModel
from memgpt.tasks import RecallTask
from memgpt.training.distributed import init_from_env, shutdown
from memgpt.training.trainer import TaskLoss

torch.set_num_threads(1)
world, _ = init_from_env(torch.device("cpu"))
assert world.size == 2, "run me with torchrun --standalone --nproc_per_node 2"
config = MemGPTConfig(vocab_size=24, dim=32, depth=2, heads=2, segment_len=8, memory_capacity=32, memory_heads=2)
torch.manual_seed(0)
model = MemGPTModel(config)
single = MemGPTModel(config)
single.load_state_dict(model.state_dict())
for block in model.blocks:
    fully_shard(block)
fully_shard(model)

task = RecallTask(num_pairs=2, distance=2, num_keys=8, num_values=8, num_filler=8, segment_len=8)
sharded_loss, single_loss = TaskLoss(model, "memory"), TaskLoss(single, "memory")
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
single_opt = torch.optim.AdamW(single.parameters(), lr=3e-3)
data = torch.Generator().manual_seed(0)
rows = slice(4 * world.rank, 4 * world.rank + 4)
for step in range(3):
    batch = task.sample(8, data)  # the same global batch on both ranks
    opt.zero_grad()
    loss, _, state = sharded_loss(batch.input_ids[rows], batch.targets[rows], 8, None, int(batch.answer_mask.sum()) / 2)
    loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over ranks
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    single_opt.zero_grad()
    reference, _, _ = single_loss(batch.input_ids, batch.targets, 8)
    reference.backward()
    single_opt.step()
    if world.is_main:
        print(
            f"step {step}: loss {float(total) / 2:.7f}, one process {float(reference.detach()):.7f}, "
            f"|diff| {abs(float(total) / 2 - float(reference.detach())):.1e}"
        )
full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # gathers every shard
diff = max(float((full[k] - v).abs().max()) for k, v in single.state_dict().items())
print(
    f"rank {world.rank}: max |parameter - one process| after 3 steps {diff:.1e}; memory keys of its own rows "
    f"sum to {float(state.layers[0].memory.keys.sum()):.4f}"
)
shutdown()
