"""The exported router policy: a plain-torch MLP, stored in the registry tied to its model.

:class:`PolicyNet` is the trained RLlib actor network (``encoder.actor_encoder`` then ``pi``)
rebuilt as ``Linear -> tanh -> ... -> Linear``, so serving needs only torch.
:func:`save_policy` registers it as ``<model name>-router`` with the exact model version it
was trained on; :func:`load_policy` refuses a policy whose model version differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynray.errors import ConfigError, IntegrityError, RegistryError
from dynray.registry import ModelInfo, ModelRegistry, RegistryReader
from dynray.registry_bytes import weights_file

__all__ = ["PolicyNet", "StoredPolicy", "router_name", "save_policy", "load_policy", "find_policy"]

KIND = "router_policy"


class PolicyNet(nn.Module):
    """obs [B, D] -> action logits [B, A]; tanh MLP with layer sizes ``sizes``."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ConfigError("PolicyNet needs at least input and output sizes", got=sizes)
        self.sizes = list(sizes)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy actions [B] and action probabilities [B, A]."""
        p = torch.softmax(self(obs.float()), dim=1)
        return p.argmax(dim=1), p


@dataclass(frozen=True)
class StoredPolicy:
    policy: PolicyNet
    info: ModelInfo  # the router's registry entry
    model_ref: str  # the model version it routes
    meta: dict


def router_name(model_name: str) -> str:
    return f"{model_name}-router"


def save_policy(registry: ModelRegistry, model: ModelInfo, policy: PolicyNet, meta: dict) -> ModelInfo:
    """Register ``policy`` as the next version of ``<model>-router``, tied to ``model``."""
    full = {**meta, "kind": KIND, "attached_to": model.ref, "model_weights_sha256": model.meta.get("files", {}).get(weights_file(model.meta)), "sizes": policy.sizes}
    return registry.register(router_name(model.name), {k: v.detach().clone() for k, v in policy.state_dict().items()}, full)


def find_policy(registry: RegistryReader, model: ModelInfo) -> ModelInfo | None:
    """Newest router registered for exactly this model version, or None."""
    routers = [i for i in registry.list(router_name(model.name)) if i.meta.get("attached_to") == model.ref]
    return routers[-1] if routers else None


def load_policy(registry: RegistryReader, ref: str, model: ModelInfo) -> StoredPolicy:
    """Load router ``ref`` for serving ``model``; refuse one trained for another version."""
    loaded = registry.load(ref)
    meta = loaded.info.meta
    if meta.get("kind") != KIND:
        raise RegistryError(f"{loaded.info.ref} is not a router policy", got=meta.get("kind"), fix="pass a ref made by `dynray router train`")
    if meta.get("attached_to") != model.ref or meta.get("model_weights_sha256") != model.meta.get("files", {}).get(weights_file(model.meta)):
        raise IntegrityError(f"router {loaded.info.ref} was trained for {meta.get('attached_to')}, not {model.ref}", got=loaded.info.ref,
                             fix=f"train one for this version: dynray router train --model {model.ref}")
    net = PolicyNet(meta["sizes"])
    net.load_state_dict(loaded.tensors)
    return StoredPolicy(policy=net.eval(), info=loaded.info, model_ref=model.ref, meta=meta)
