"""One rank of tests/training/test_distributed.py, launched by ``torchrun --nproc_per_node 2``.

argv: OUT_DIR SPEC_JSON. For each run in the spec (a model kind and truncated-BPTT setting) it
trains a few DDP steps with memgpt's Trainer and writes, per rank, the flat parameters after
every step, the per-step records and the memory state this rank's model returns on its own rows.
Last, it runs ``memgpt train`` through the CLI in the same process group.
"""

from __future__ import annotations

import json
import sys

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from memgpt import MemGPTConfig, MemGPTModel  # noqa: E402
from memgpt.apps.cli import main  # noqa: E402
from memgpt.training.distributed import init_from_env, shutdown  # noqa: E402
from memgpt.training.trainer import TrainConfig, Trainer  # noqa: E402


def train(spec: dict, run: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    torch.manual_seed(spec["seed"])
    model = MemGPTModel(MemGPTConfig(**spec["model"]))
    cfg = TrainConfig(**(spec["train"] | {"bptt_segments": run["bptt_segments"]}))
    trainer = Trainer(model, run["kind"], "recall", spec["task"], cfg)
    tensors, records = {}, []
    for step in range(spec["steps"]):
        records.append(trainer.train_step())
        tensors[f"params.{step}"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # The memory each rank's model holds after reading its own rows of a fresh batch, through DDP.
    local = trainer.local_rows(trainer.next_batch())
    with torch.no_grad():
        _, _, state = trainer.task_loss(local.input_ids, local.targets, local.segment_len)
    if state is not None:
        tensors |= {f"state.{k}": v.contiguous() for k, v in state._flat().items()}
    return records, tensors


def run() -> None:
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    world, _ = init_from_env(torch.device("cpu"))
    assert world.size == 2, world
    for r in spec["runs"]:
        records, tensors = train(spec, r)
        name = f"{out}/{r['name']}.rank{world.rank}"
        save_file(tensors, name + ".safetensors")
        with open(name + ".json", "w") as f:
            json.dump(records, f)
    # The CLI trains with DDP in the group it finds, and leaves that group to its creator.
    main(["train", "--device", "cpu", "--out", f"{out}/cli", *spec["cli"]])
    shutdown()


if __name__ == "__main__":
    run()
