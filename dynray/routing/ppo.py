"""PPO for the router with RLlib (new API stack), used here as a library, and its export.

:func:`make_ppo_config` turns a :class:`PPOTrainConfig` into an RLlib ``PPOConfig`` whose env
runners are Ray actors stepping :class:`~dynray.routing.env.RoutingEnv`. :func:`train_ppo`
runs the iterations with progress callbacks, and :func:`export_policy` copies the trained
RLModule's actor network into a plain :class:`~dynray.routing.policy.PolicyNet`, checked
for identical logits, so serving never imports RLlib. Needs a running Ray (the caller's job
connects it; this module never calls ``ray.init``).

**Iterate selection.** PPO's last iterate is a noisy draw: with one configuration, three runs
ranged from 18.5% cheaper than the thresholds to 16.7% costlier. So :func:`train_ppo` can
score the policy every ``select_every`` iterations (and at the last one) on a held-out split
that PPO never replays, and export the best-scoring iterate instead of the last. The score
(:class:`ValScorer`) is the mean reward per request of the greedy policy, replayed exactly with
:func:`~dynray.routing.rollout.rollout` on the held-out cached exits, over a fixed grid: each
λ_cost of ``select_lambdas`` at two tier conditions (nominal with λ_lat = 0, and the cloud
``select_cloud_slowdown`` times slower with λ_lat = ``select_lat``), minus what thresholds
re-tuned on the same split for that λ_cost earn there. Why this score:

- it is the training objective itself (mean reward over operating points), on data PPO never saw;
- subtracting the thresholds' reward is a constant per grid point, so it picks the same
  iterate as the plain mean reward and adds no noise; it only makes the number readable
  (> 0: the policy out-earns thresholds re-tuned for each λ on that split);
- a mean over the grid is less noisy than the worst grid point or a cost ratio at matched
  accuracy (a ratio divides by a small, noisy accuracy difference; a worst case is the max of
  several noisy gaps);
- the replay is deterministic (greedy actions, fixed tier conditions, no observation noise),
  so the only noise left is which held-out samples there are. That noise is real: the
  selection is biased towards the iterate that happens to suit those samples, so a score on
  the selection split is optimistic, and the split is no longer "unseen" for anything that
  is fitted on it afterwards (the hybrid's safety gate).

Seeding: ``seed`` goes to RLlib's ``debugging(seed=...)``, which seeds the learner's torch and
each env runner's environments (``reset(seed=seed + runner/env index)`` on the first reset,
the only source of the environment's randomness). RLlib does not promise bitwise-identical
runs (parallel sampling, thread scheduling), so runs are reproducible "as far as RLlib allows".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.env import RouterEnvConfig, RoutingEnv
from dynray.routing.features import CostWeights, obs_dim
from dynray.routing.policy import PolicyNet
from dynray.routing.rollout import rollout, threshold_decide
from dynray.routing.tuning import exit_prices, tune_thresholds

__all__ = ["PPOTrainConfig", "PPOTrainResult", "Selection", "ValScorer", "make_ppo_config", "train_ppo", "export_policy",
           "select_iterate", "is_selection_point"]
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
    """Adam learning rate (at the start, if lr_final is set)."""
    lr_final: float | None = None
    """If set, the learning rate falls linearly from lr to this over iterations x batch_size env steps (an RLlib schedule); default: constant lr."""
    entropy_coeff: float = 0.001
    """Entropy bonus weight (exploration; at the start, if entropy_coeff_final is set)."""
    entropy_coeff_final: float | None = None
    """If set, the entropy bonus falls linearly from entropy_coeff to this over the same steps; default: constant."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the policy (and value) MLP, tanh activations."""
    env_runners: int = 1
    """Env-runner actors sampling in parallel."""
    envs_per_runner: int = 8
    """Vectorised environments per env runner."""
    seed: int = 0
    """Seeds RLlib (debugging(seed=...)): the learner's torch and the environments' RNG."""
    select_every: int = 5
    """Score the policy on the held-out split every this many iterations (and at the last) and export the best-scoring iterate; 0: the last iterate."""
    select_lambdas: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.03)
    """λ_cost values of the selection score (the bench's λ-sweep points)."""
    select_lat: float = 1e-3
    """λ_lat (per ms) of the selection score's loaded condition."""
    select_cloud_slowdown: float = 5.0
    """Cloud slowdown of the selection score's loaded condition (the bench's load shift: x5)."""

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.minutes <= 0:
            raise ConfigError("PPO needs at least one iteration and a positive time budget", got=(self.iterations, self.minutes), fix="e.g. --iterations 60 --minutes 4")
        if self.minibatch_size > self.batch_size or self.batch_size < 1:
            raise ConfigError("minibatch_size must be <= batch_size", got=(self.minibatch_size, self.batch_size))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("hidden must list positive layer sizes", got=self.hidden, fix="e.g. (64, 64)")
        if self.env_runners < 0 or self.envs_per_runner < 1:
            raise ConfigError("env_runners must be >= 0 and envs_per_runner >= 1", got=(self.env_runners, self.envs_per_runner))
        if not (self.lr > 0 and (self.lr_final is None or self.lr_final > 0)):
            raise ConfigError("lr and lr_final must be > 0", got=(self.lr, self.lr_final), fix="e.g. --lr 1e-3 --lr-final 1e-4")
        if not (self.entropy_coeff >= 0 and (self.entropy_coeff_final is None or self.entropy_coeff_final >= 0)):
            raise ConfigError("entropy_coeff and entropy_coeff_final must be >= 0", got=(self.entropy_coeff, self.entropy_coeff_final), fix="e.g. --entropy-coeff 0.01 --entropy-coeff-final 0.001")
        if self.select_every < 0:
            raise ConfigError("select_every must be >= 0 (0: no iterate selection)", got=self.select_every, fix="e.g. --select-every 5")
        if not self.select_lambdas or any(not (math.isfinite(x) and x >= 0) for x in self.select_lambdas):
            raise ConfigError("select_lambdas must list finite λ_cost values >= 0", got=self.select_lambdas, fix="e.g. --select-lambdas 0.001 0.005 0.03")
        if not (math.isfinite(self.select_lat) and self.select_lat >= 0 and self.select_cloud_slowdown >= 1):
            raise ConfigError("select_lat must be >= 0 and select_cloud_slowdown >= 1", got=(self.select_lat, self.select_cloud_slowdown), fix="e.g. --select-lat 0.001 --select-cloud-slowdown 5")

    def schedule(self, start: float, final: float | None) -> float | list[list[float]]:
        """A constant, or RLlib's piecewise-linear [[env step, value], ...] from start to final over the budget."""
        return start if final is None else [[0, start], [self.iterations * self.batch_size, final]]


@dataclass(frozen=True)
class Selection:
    """Which iterate was exported, and the held-out score curve it was chosen from."""

    chosen_iteration: int
    score: float
    """The chosen iterate's score (mean val reward per request above re-tuned thresholds)."""
    curve: list[dict]
    """Per scored iterate: iteration, score, reward (mean), worst (least grid-point score)."""
    grid: list[dict]
    """The grid points: lambda_cost, lambda_lat, cloud_slowdown, thresholds_reward."""
    samples: int
    """Held-out samples replayed."""
    criterion: str = "mean over the grid of (policy reward - per-lambda re-tuned thresholds reward) on the held-out split; ties: the later iterate"

    def to_dict(self) -> dict:
        return {"chosen_iteration": self.chosen_iteration, "score": self.score, "curve": self.curve, "grid": self.grid, "samples": self.samples, "criterion": self.criterion}


@dataclass(frozen=True)
class PPOTrainResult:
    policy: PolicyNet
    history: list[dict]  # per iteration: mean episode return, env steps, seconds, lr, entropy_coeff (and val_score where scored)
    seconds: float
    iterations: int
    selection: Selection | None = None  # None: the last iterate, unselected


def select_iterate(curve: Sequence[tuple[int, float]]) -> int:
    """The iteration with the best score in ``[(iteration, score), ...]``; ties go to the later one.

    Non-finite scores never win; if every score is non-finite, the last iteration is chosen.
    """
    if not curve:
        raise ConfigError("no scored iterate to select from", got=list(curve), fix="score at least the last iteration")
    best_it, best = curve[-1][0], -math.inf
    for it, s in curve:
        if math.isfinite(s) and s >= best:
            best_it, best = it, s
    return best_it


def is_selection_point(iteration: int, cfg: PPOTrainConfig, *, last: bool) -> bool:
    """Whether iteration ``iteration`` (1-based) is scored: every ``select_every``-th, and the last."""
    return cfg.select_every > 0 and (last or iteration % cfg.select_every == 0)


class ValScorer:
    """The selection score of a policy on held-out cached exits (see the module docstring).

    The thresholds' rewards are computed once here; :meth:`__call__` replays a policy.
    """

    def __init__(self, records: ExitRecords, costs: RouteCosts, cfg: PPOTrainConfig) -> None:
        self.records, self.costs = records, costs
        prices = exit_prices(costs)
        conds = [(TierLoad(), 0.0), (TierLoad(slowdown=cfg.select_cloud_slowdown), cfg.select_lat)]
        self.points: list[tuple[CostWeights, TierLoad, float]] = []
        self.grid: list[dict] = []
        for lam in cfg.select_lambdas:
            rule = tune_thresholds(records, prices, CostWeights(cost=lam))
            for cloud, lat in conds:
                w = CostWeights(cost=lam, lat=lat)
                base = float(rollout(records, costs, threshold_decide(rule), w, cloud=cloud).reward(w).mean())
                self.points.append((w, cloud, base))
                self.grid.append({"lambda_cost": lam, "lambda_lat": lat, "cloud_slowdown": cloud.slowdown, "thresholds_reward": base})

    @property
    def samples(self) -> int:
        return int(self.records.labels.shape[0])

    def __call__(self, policy: PolicyNet) -> dict:
        """{score, reward, worst}: mean over the grid of reward minus the thresholds', the mean reward, the worst point's score."""

        def decide(obs: torch.Tensor, k: int, logits: torch.Tensor) -> torch.Tensor:
            return policy.act(obs)[0]

        rewards, gaps = [], []
        for w, cloud, base in self.points:
            r = float(rollout(self.records, self.costs, decide, w, cloud=cloud).reward(w).mean())
            rewards.append(r)
            gaps.append(r - base)
        return {"score": sum(gaps) / len(gaps), "reward": sum(rewards) / len(rewards), "worst": min(gaps)}


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
            # RLlib's new stack takes a float or [[env step, value], ...] (linear in between) for both
            lr=cfg.schedule(cfg.lr, cfg.lr_final),
            gamma=1.0,  # short episodes; the return is the reward exactly
            lambda_=1.0,
            entropy_coeff=cfg.schedule(cfg.entropy_coeff, cfg.entropy_coeff_final),
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
              select_on: ExitRecords | Callable[[PolicyNet], dict] | None = None,
              progress: Callable[[dict], None] | None = None, checkpoint_dir: str | None = None,
              on_scored: Callable[[int, PolicyNet, dict], None] | None = None) -> PPOTrainResult:
    """Train PPO within the budget and return the exported policy with the learning curve.

    With ``select_on`` (held-out cached exits, e.g. val; never the ``records`` PPO replays) and
    ``cfg.select_every > 0``, the policy is scored every ``select_every`` iterations and at the
    last (:class:`ValScorer`) and the best-scoring iterate is returned, with its
    :class:`Selection`; otherwise the last iterate. ``select_on`` may also be a scorer itself
    (policy -> ``{"score": float, ...}``), e.g. a :class:`ValScorer` built once for several runs. ``on_scored(iteration, policy, scores)``
    sees every scored iterate's export. ``checkpoint_dir`` saves the last iterate's RLlib state.
    """
    t0 = time.perf_counter()
    scorer = None
    if select_on is not None and cfg.select_every > 0:
        scorer = ValScorer(select_on, env_cfg.costs, cfg) if isinstance(select_on, ExitRecords) else select_on
    algo = make_ppo_config(cfg, records, env_cfg).build_algo()
    history: list[dict] = []
    curve: list[dict] = []
    kept: dict[int, dict[str, torch.Tensor]] = {}  # scored iteration -> its policy's weights (a few KB each)
    policy = None
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
            learner = r.get("learners", {}).get("default_policy", {})  # the schedules' current values, after this update
            for key, name in (("default_optimizer_learning_rate", "lr"), ("curr_entropy_coeff", "entropy_coeff")):
                if key in learner:
                    row[name] = float(learner[key])
            out_of_time = row["seconds"] > cfg.minutes * 60
            last = out_of_time or it + 1 == cfg.iterations
            if scorer is not None and is_selection_point(it + 1, cfg, last=last):
                policy = export_policy(algo.get_module(), obs_dim(records.num_exits))
                s = scorer(policy)
                curve.append({"iteration": it + 1, **s})
                row["val_score"] = s["score"]
                kept[it + 1] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
                if on_scored:
                    on_scored(it + 1, policy, s)
            history.append(row)
            if progress:
                progress(row)
            if out_of_time:
                log.info("PPO stopped at iteration %d: time budget of %.1f min reached", it + 1, cfg.minutes)
                break
        if checkpoint_dir:
            algo.save_to_path(checkpoint_dir)
        if scorer is None:
            policy = export_policy(algo.get_module(), obs_dim(records.num_exits))
    finally:
        algo.stop()
    selection = None
    if scorer is not None:
        assert policy is not None and curve  # the last iteration is always scored
        chosen = select_iterate([(c["iteration"], c["score"]) for c in curve])
        policy = PolicyNet(policy.sizes)
        policy.load_state_dict(kept[chosen])
        policy.eval()
        score = next(c["score"] for c in curve if c["iteration"] == chosen)
        selection = Selection(chosen_iteration=chosen, score=score, curve=curve, grid=getattr(scorer, "grid", []), samples=getattr(scorer, "samples", 0))
        log.info("PPO: exported iteration %d of %d (held-out score %.4f; last %.4f)", chosen, len(history), score, curve[-1]["score"])
    return PPOTrainResult(policy=policy, history=history, seconds=time.perf_counter() - t0, iterations=len(history), selection=selection)
