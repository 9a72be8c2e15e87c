"""The two gears of the reference runs (docs/gkd.md). The fast gear is exactly the run-spec
defaults (``GKDSettings()``, ``OptimSettings()``, ``TraceSelection.min_reward``); the high-quality
gear differs in temperature, max_new_tokens, min_reward, learning rate and schedule. Pydantic only
(no torch), so policies and benchmarks can use it."""

from __future__ import annotations

from dataclasses import dataclass

from atlasd.runspec import GKDSettings, OptimSettings


@dataclass(frozen=True)
class Gear:
    gkd: GKDSettings
    optim: OptimSettings
    min_reward: float


GEARS: dict[str, Gear] = {
    "fast": Gear(gkd=GKDSettings(), optim=OptimSettings(), min_reward=0.8),
    "high-quality": Gear(
        gkd=GKDSettings(lmbda=1.0, beta=0.5, temperature=0.6, max_new_tokens=128),
        optim=OptimSettings(learning_rate=3e-6, max_steps=None, num_train_epochs=5,
                            per_device_train_batch_size=2, gradient_accumulation_steps=4),
        min_reward=0.9,
    ),
}
