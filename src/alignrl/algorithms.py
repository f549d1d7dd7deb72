"""The algorithm registry: the one list of what `alignrl train ALGO` runs, used by the CLI, the demo and torchrun.

Adding an algorithm is a module under alignrl/trainers/ (a config dataclass and `train(cfg)`) plus one entry here.
Modules are imported only when their algorithm runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from alignrl.registry import Registry


@dataclass(frozen=True)
class AlgorithmSpec:
    module: str  # imported when the algorithm runs; has `train(cfg) -> Path`
    config: str  # name of its config dataclass in `module`
    summary: str  # one line for `alignrl train --help`
    multi_process: bool = True  # runs under torchrun (DDP / FSDP2)

    def load(self) -> tuple[ModuleType, type]:
        module = importlib.import_module(self.module)
        return module, getattr(module, self.config)


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")
for _name, _spec in {
    "sft": AlgorithmSpec("alignrl.trainers.sft", "SFTConfig", "supervised fine-tuning on completions or messages"),
    "rm": AlgorithmSpec("alignrl.trainers.rm", "RMConfig", "Bradley–Terry reward model from preference pairs"),
    "dpo": AlgorithmSpec("alignrl.trainers.dpo", "DPOConfig", "DPO family (IPO, hinge, robust, SimPO, ORPO)"),
    "grpo": AlgorithmSpec("alignrl.trainers.grpo", "GRPOConfig", "GRPO family (DAPO, Dr. GRPO, GSPO, RLOO)"),
    "ppo": AlgorithmSpec("alignrl.trainers.ppo", "PPOConfig", "PPO with a critic and a KL-shaped reward (RLHF)"),
    "reinforce_pp": AlgorithmSpec(
        "alignrl.trainers.reinforce_pp", "ReinforcePPConfig", "REINFORCE++ and REINFORCE++-baseline (no critic)"
    ),
    "cispo": AlgorithmSpec("alignrl.trainers.cispo", "CISPOConfig", "CISPO: clipped stop-gradient IS weights"),
    "distill": AlgorithmSpec(
        "alignrl.trainers.distill", "DistillConfig", "on-policy distillation: reverse KL to a teacher"
    ),
}.items():
    ALGORITHMS.add(_name, _spec)


def register(name: str, module: str, config: str, summary: str = "", multi_process: bool = True) -> None:
    """Make `alignrl train NAME` run `module.train` with `module.<config>` (for algorithms outside alignrl)."""
    ALGORITHMS.add(name, AlgorithmSpec(module, config, summary, multi_process))


def name_of(cfg: Any) -> str:
    """The registered name of the algorithm a config belongs to (its class); a class outside the registry is named
    by the class (GRPOConfig -> grpo, TrainConfig -> train)."""
    cls = type(cfg)
    for name in ALGORITHMS:
        spec = ALGORITHMS[name]
        if spec.config == cls.__name__ and spec.module == cls.__module__:
            return name
    return cls.__name__.removesuffix("Config").lower()
