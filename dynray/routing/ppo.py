"""PPO for the router with RLlib (new API stack), used here as a library, and its export.

:func:`make_ppo_config` turns a :class:`PPOTrainConfig` into an RLlib ``PPOConfig`` whose env
runners are Ray actors stepping :class:`~dynray.routing.env.RoutingEnv`. :func:`train_ppo`
runs the iterations with progress callbacks, and :func:`export_policy` copies the trained
RLModule's actor network into a plain :class:`~dynray.routing.policy.PolicyNet`, checked
for identical logits, so serving never imports RLlib. Needs a running Ray (the caller's job
connects it; this module never calls ``ray.init``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.routing.env import RouterEnvConfig, RoutingEnv
from dynray.routing.features import obs_dim
from dynray.routing.policy import PolicyNet

__all__ = ["PPOTrainConfig", "PPOTrainResult", "make_ppo_config", "train_ppo", "export_policy"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PPOTrainConfig:
    """PPO hyperparameters and budget (defaults: the demo configuration, about 4 minutes on 2 CPUs)."""

    iterations: int = 75
    """PPO iterations (each samples ``batch_size`` env steps and runs ``epochs`` SGD epochs)."""
    minutes: float = 4.5
    """Wall-clock budget: training stops after the iteration that crosses it."""
    batch_size: int = 4000
    """Env steps per iteration (train_batch_size_per_learner)."""
    minibatch_size: int = 500
    """SGD minibatch (at most batch_size)."""
    epochs: int = 10
    """SGD epochs over each iteration's batch."""
    lr: float = 1e-3
    """Adam learning rate."""
    entropy_coeff: float = 0.001
    """Entropy bonus weight (exploration)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy (and value) MLP, tanh activations."""
    env_runners: int = 1
    """Env-runner actors sampling in parallel."""
    envs_per_runner: int = 8
    """Vectorised environments per env runner."""
    seed: int = 0
    """Seeds the environment and RLlib."""

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.minutes <= 0:
            raise ConfigError("PPO needs at least one iteration and a positive time budget", got=(self.iterations, self.minutes), fix="e.g. --iterations 60 --minutes 4")
        if self.minibatch_size > self.batch_size or self.batch_size < 1:
            raise ConfigError("minibatch_size must be <= batch_size", got=(self.minibatch_size, self.batch_size))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("hidden must list positive layer sizes", got=self.hidden, fix="e.g. (64, 64)")
        if self.env_runners < 0 or self.envs_per_runner < 1:
            raise ConfigError("env_runners must be >= 0 and envs_per_runner >= 1", got=(self.env_runners, self.envs_per_runner))


@dataclass(frozen=True)
class PPOTrainResult:
    policy: PolicyNet
    history: list[dict]  # per iteration: mean episode return, env steps, seconds
    seconds: float
    iterations: int


def make_ppo_config(cfg: PPOTrainConfig, records: ExitRecords, env_cfg: RouterEnvConfig):
    """The RLlib ``PPOConfig`` for the routing environment."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return (
        PPOConfig()
        .environment(RoutingEnv, env_config={"records": records, "config": env_cfg})
        .env_runners(num_env_runners=cfg.env_runners, num_envs_per_env_runner=cfg.envs_per_runner, num_cpus_per_env_runner=1)
        .learners(num_learners=0)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(cfg.hidden), fcnet_activation="tanh", vf_share_layers=False))
        .training(
            train_batch_size_per_learner=cfg.batch_size,
            minibatch_size=cfg.minibatch_size,
            num_epochs=cfg.epochs,
            lr=cfg.lr,
            gamma=1.0,  # short episodes; the return is the reward exactly
            lambda_=1.0,
            entropy_coeff=cfg.entropy_coeff,
        )
        .debugging(seed=cfg.seed, log_level="WARN")
    )


def _mlp_linears(seq: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in seq.modules() if isinstance(m, torch.nn.Linear)]


def export_policy(module, obs_dim: int, *, check: torch.Tensor | None = None) -> PolicyNet:
    """Copy an RLlib ``DefaultPPOTorchRLModule``'s actor into a plain :class:`PolicyNet`.

    The copy is checked against ``module.forward_inference`` on ``check`` observations
    (default: 256 random ones) and refused if any logit differs by more than 1e-5.
    """
    linears = _mlp_linears(module.encoder.actor_encoder.net.mlp) + _mlp_linears(module.pi.net.mlp)
    sizes = [linears[0].in_features] + [lin.out_features for lin in linears]
    net = PolicyNet(sizes)
    with torch.no_grad():
        for dst, src in zip(net.linears(), linears, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    obs = check if check is not None else torch.rand(256, obs_dim) * 2 - 0.5
    with torch.no_grad():
        want = module.forward_inference({"obs": obs})["action_dist_inputs"]
        got = net(obs)
    diff = float((want - got).abs().max())
    if diff > 1e-5:
        raise ConfigError("the exported policy does not reproduce the RLlib module", got=f"max logit difference {diff:.2e}",
                          fix="the RLModule architecture changed: update PolicyNet to match encoder.actor_encoder + pi")
    return net.eval()


def train_ppo(cfg: PPOTrainConfig, records: ExitRecords, env_cfg: RouterEnvConfig, *,
              progress: Callable[[dict], None] | None = None, checkpoint_dir: str | None = None) -> PPOTrainResult:
    """Train PPO within the budget and return the exported policy with the learning curve."""
    t0 = time.perf_counter()
    algo = make_ppo_config(cfg, records, env_cfg).build_algo()
    history: list[dict] = []
    try:
        for it in range(cfg.iterations):
            r = algo.train()
            runners = r.get("env_runners", {})
            row = {
                "iteration": it + 1,
                "episode_return_mean": float(runners.get("episode_return_mean", float("nan"))),
                "env_steps": int(r.get("num_env_steps_sampled_lifetime", runners.get("num_env_steps_sampled_lifetime", 0))),
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            if progress:
                progress(row)
            if row["seconds"] > cfg.minutes * 60:
                log.info("PPO stopped at iteration %d: time budget of %.1f min reached", it + 1, cfg.minutes)
                break
        if checkpoint_dir:
            algo.save_to_path(checkpoint_dir)
        module = algo.get_module()
        policy = export_policy(module, obs_dim(records.num_exits))
    finally:
        algo.stop()
    return PPOTrainResult(policy=policy, history=history, seconds=time.perf_counter() - t0, iterations=len(history))
