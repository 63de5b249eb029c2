"""The `dynray` command: the face of the jobs, plus the registry and job-submission commands.

Every job command runs the job's own ``main`` in this process, so ``dynray train ARGS`` and
``python -m jobs.train ARGS`` parse the same flags (each job's frozen ``Config``) and print
the same thing. This is the one module of ``dynray`` allowed to import ``jobs``, lazily.

Exit codes: 0 success, 2 bad usage or input (one line naming the fix), 1 any other failure.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dynray.flags import UsageError, guarded, parse, setup_logging

__all__ = ["main", "COMMANDS", "SUBMIT_STEPS"]


@dataclass(frozen=True)
class Command:
    help: str
    """One line for `dynray --help`."""
    run: Callable[[list[str], str], int]
    """(arguments after the command, prog name) -> exit code."""


def _job(module: str) -> Callable[[list[str], str], int]:
    def run(args: list[str], prog: str) -> int:
        return importlib.import_module(f"jobs.{module}").main(args, prog=prog)

    return run


def _actions(actions: dict[str, str]) -> Callable[[list[str], str], int]:
    """A command whose first argument picks a job (``dynray router train|cache``)."""

    def run(args: list[str], prog: str) -> int:
        if not args or args[0] not in actions:
            if args and args[0] in ("-h", "--help"):
                print(f"usage: {prog} {{{','.join(actions)}}} [--help | ARGS]")
                return 0
            got = args[0] if args else None
            raise UsageError(f"{prog} needs an action", got=got, fix=f"one of: {', '.join(f'{prog} {a}' for a in actions)}")
        return importlib.import_module(f"jobs.{actions[args[0]]}").main(args[1:], prog=f"{prog} {args[0]}")

    return run


# -- models -----------------------------------------------------------------------------

def _models(args: list[str], prog: str) -> int:
    from dynray.registry import ModelRegistry

    p = _parser(prog, "list, show or promote registered models; make a master key (keygen) or re-wrap every encrypted version under a new one (rewrap)")
    p.add_argument("action", choices=["list", "show", "promote", "keygen", "rewrap"])
    p.add_argument("ref", nargs="?", default=None, help="model ref (show, promote)")
    p.add_argument("stage", nargs="?", default=None, choices=["staging", "production"], help="stage (promote)")
    p.add_argument("--out", default=None, help="keygen: write the new master key to this file (mode 0600, refused if it exists) instead of stdout")
    p.add_argument("--new-key-file", default=None, help="rewrap: file holding the new master key; the current one comes from DYNRAY_MASTER_KEY or DYNRAY_MASTER_KEY_FILE")
    a = p.parse_args(args)
    if a.action == "keygen":
        return _keygen(a.out)
    reg = ModelRegistry()
    if a.action == "rewrap":
        from dynray.security.crypto import Keyring

        if not a.new_key_file:
            raise UsageError("rewrap needs the new master key", fix=f"{prog} keygen --out NEW; then {prog} rewrap --new-key-file NEW")
        done = reg.rewrap(Keyring.read_file(a.new_key_file))
        print(f"re-wrapped the data keys of {len(done)} encrypted versions under the new master key" + (f": {', '.join(done)}" if done else "")
              + "; from now on set DYNRAY_MASTER_KEY_FILE to the new file on every node")
        return 0
    if a.action == "list":
        infos = reg.list()
        if not infos:
            print(f"no models in {reg.home}; run `dynray train` or `make demo`")
        for i in infos:
            acc = i.meta.get("metrics", {}).get("val_accuracy_full")
            print(f"{i.ref:<28} {','.join(i.stages) or '-':<12} {i.meta.get('dataset', '?'):<14} val_acc={acc if acc is None else round(acc, 4)}  {i.meta.get('thresholds_source', '')}  {i.meta.get('created_at', '')[:19]}")
    elif a.action == "show":
        info = reg.verify(a.ref)
        print(json.dumps({k: v for k, v in info.meta.items() if k != "history"}, indent=2))
    else:
        if not a.ref or not a.stage:
            raise UsageError("promote needs a model and a stage", got=(a.ref, a.stage), fix=f"{prog} promote NAME:vN production")
        print(f"{reg.promote(a.ref, a.stage).ref} is now {a.stage}")
    return 0


def _keygen(out: str | None) -> int:
    import os

    from dynray.security.crypto import generate_master_key

    key = generate_master_key()
    if out is None:
        print(key)
        return 0
    try:  # O_EXCL: never overwrite a key that may still be needed
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError("the key file exists", got=out, fix="pick a new path; an old key may still be needed to open artifacts") from None
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    print(f"wrote a new master key to {out} (mode 0600); keep it outside DYNRAY_HOME and set DYNRAY_MASTER_KEY_FILE={os.path.abspath(out)}")
    return 0


# -- keys -------------------------------------------------------------------------------

def _keys(args: list[str], prog: str) -> int:
    import time

    from dynray.security.keys import SCOPES, KeyStore

    p = _parser(prog, "API keys of the ingress, stored hashed in $DYNRAY_HOME/keys.db; a new key is printed once")
    p.add_argument("action", choices=["create", "list", "revoke", "rotate"])
    p.add_argument("id", nargs="?", default=None, help="key id (revoke, rotate), as `list` shows it")
    p.add_argument("--name", default=None, help="create: who the key is for")
    p.add_argument("--scope", action="append", choices=SCOPES, default=None, help="create: a scope; repeat for more (default: predict)")
    p.add_argument("--rate", type=float, default=50.0, help="create: requests per second the key may make, over every ingress replica (default 50)")
    p.add_argument("--burst", type=float, default=None, help="create: requests the key may make at once (default: the rate)")
    p.add_argument("--ttl-days", type=float, default=None, help="create: days until the key expires (default: never)")
    p.add_argument("--grace-s", type=float, default=3600.0, help="rotate: seconds the old key keeps working (default 3600)")
    a = p.parse_args(args)
    store = KeyStore.at_home()
    if a.action in ("revoke", "rotate") and not a.id:
        raise UsageError(f"{a.action} needs a key id", fix=f"{prog} list, then {prog} {a.action} ID")
    if a.action == "create":
        if not a.name:
            raise UsageError("create needs --name", fix=f"{prog} create --name my-client [--scope predict] [--rate 50]")
        key, rec = store.create(a.name, scopes=a.scope or ["predict"], rate_per_s=a.rate, burst=a.burst, ttl_s=a.ttl_days * 86400 if a.ttl_days else None)
        print(f"created key {rec.id} ({rec.name}, scopes {','.join(rec.scopes)}, {rec.rate_per_s:g}/s); it is shown only now:\n{key}")
    elif a.action == "list":
        now = time.time()
        for r in store.list():
            exp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.expires)) if r.expires else "never"
            print(f"{r.id}  {r.name:<20} {','.join(r.scopes):<14} {r.rate_per_s:>7g}/s  {r.state(now):<8} expires {exp}" + (f"  replaced by {r.replaced_by}" if r.replaced_by else ""))
    elif a.action == "revoke":
        print(f"revoked {store.revoke(a.id).id}")
    else:
        key, rec = store.rotate(a.id, grace_s=a.grace_s)
        print(f"rotated {a.id} -> {rec.id}; the old key works for {a.grace_s:g} s more. The new key is shown only now:\n{key}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, fix=f"see {self.prog} --help")


def _parser(prog: str, description: str) -> _Parser:
    return _Parser(prog=prog, description=description)


# -- submit -----------------------------------------------------------------------------

SUBMIT_STEPS = ("train", "finetune", "calibrate", "bench", "nas", "train_router", "router_cache", "deploy", "demo", "automl", "compress", "gan", "federated")
"""Jobs `dynray submit` can send (each runs as ``python -m jobs.STEP`` on the cluster)."""
_SUBMIT_FLAGS = {"--address": True, "--local-python": False, "--env": True, "--no-wait": False}


def _split_submit(args: list[str], prog: str) -> tuple[dict, list[str]]:
    """Submit's own flags, wherever they stand before ``--``; everything else goes to the job."""
    own: dict = {"env": []}
    job: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            job += args[i + 1 :]
            break
        flag, eq, value = a.partition("=")
        if flag in _SUBMIT_FLAGS:
            if _SUBMIT_FLAGS[flag]:
                if not eq:
                    if i + 1 >= len(args):
                        raise UsageError(f"{flag} needs a value", fix=f"{prog} STEP {flag} VALUE -- JOB ARGS")
                    i += 1
                    value = args[i]
                if flag == "--env":
                    own["env"].append(value)
                else:
                    own[flag[2:].replace("-", "_")] = value
            else:
                own[flag[2:].replace("-", "_")] = True
        else:
            job.append(a)
        i += 1
    return own, job


def _submit(args: list[str], prog: str) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: {prog} STEP [--address URL] [--env KEY=VALUE ...] [--local-python] [--no-wait] [--] [JOB ARGS ...]\n\n"
              f"Send `python -m jobs.STEP JOB ARGS` to a Ray cluster as a Ray job, stream its logs, exit with its status.\n"
              f"STEP: {', '.join(SUBMIT_STEPS)}. The job's arguments are checked here first. --address defaults to $RAY_ADDRESS.")
        return 0
    own, rest = _split_submit(args, prog)  # submit's flags may stand before or after STEP
    step, job_args = (rest[0], rest[1:]) if rest else ("", [])
    if step not in SUBMIT_STEPS:
        close = difflib.get_close_matches(step, SUBMIT_STEPS, n=1)
        raise UsageError("unknown job step", got=step or None, fix=f"{'did you mean ' + close[0] + '? ' if close else ''}steps: {', '.join(SUBMIT_STEPS)}")
    env_vars = {}
    for kv in own["env"]:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise UsageError("--env needs KEY=VALUE", got=kv, fix="e.g. --env DYNRAY_HOME=/shared/dynray")
        env_vars[k] = v
    _check_job_args(step, job_args)  # refuse bad job flags here, not minutes later on the cluster
    from jobs import _submit as submit

    address, auth_mode = submit.resolve_address(own.get("address"))
    entry = " ".join([sys.executable if own.get("local_python") else "python", "-m", f"jobs.{step}", *map(_quote, job_args)])
    return submit.submit(address, entry, env_vars=env_vars, wait=not own.get("no_wait"), auth_mode=auth_mode)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _check_job_args(step: str, args: list[str]) -> None:
    mod = importlib.import_module(f"jobs.{step}")
    check = getattr(mod, "parse_args", None)
    if check is not None:
        check(args)
    else:
        parse(mod.Config, args, prog=f"python -m jobs.{step}")


# -- the command table --------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "demo": Command("the main job: train -> calibrate -> promote -> bench -> router -> serve -> operations tour -> report on mnist-5k", _job("demo")),
    "train": Command("train a DynamicNet with Ray Train and register it", _job("train")),
    "finetune": Command("fine-tune a registered model (freeze, unfreeze last N, gradual, split LRs)", _job("finetune")),
    "calibrate": Command("calibrate thresholds on the val split (registers a child version)", _job("calibrate")),
    "bench": Command("measure a section (core, serve, router, moe, nas, cluster, security, drift, compress, gan, federated, calibration) into the bench JSON", _job("bench")),
    "compress": Command("edge variants of a model: int8 quantisation, channel pruning or distillation (registers a child version)", _job("compress")),
    "gan": Command("train a class-conditional GAN on a dataset (sample grid PNG, quality check); registers the generator for train --synthetic", _job("gan")),
    "federated": Command("FedAvg across device actors on edge nodes (non-IID shards; compressed updates, secure aggregation); registers the model", _job("federated")),
    "router": Command("train the PPO router of a model (train), or cache its exit outputs (cache)", _actions({"train": "train_router", "cache": "router_cache"})),
    "nas": Command("neural architecture search with Ray Tune (run)", _actions({"run": "nas"})),
    "models": Command("list, show or promote registered models; keygen or rewrap the master key of encrypted ones", _models),
    "serve": Command("start (up), inspect (status), roll versions (roll) or stop (down) the Serve app", _job("deploy")),
    "cluster": Command("start (up --local), inspect (status) or stop (down) a local autoscaling cluster with edge and cloud node types", _job("cluster")),
    "automl": Command("NAS -> train -> calibrate -> router -> register -> deploy -> check, in one time budget (resumable)", _job("automl")),
    "report": Command("PNG plots of a run log: exit mix over time, latency per tier, drift score with its alarms", _job("report")),
    "keys": Command("create, list, revoke or rotate the ingress's API keys (stored hashed)", _keys),
    "submit": Command("submit a job step to a Ray cluster (dynray submit STEP --address URL -- ARGS)", _submit),
}


def _usage() -> str:
    w = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{w}}  {c.help}" for name, c in COMMANDS.items())
    return (f"usage: dynray [-v] COMMAND [ARGS]\n\nAdaptive inference on Ray: train, calibrate, benchmark, serve and manage early-exit networks.\n\n"
            f"commands:\n{rows}\n\n  -v, --verbose  debug logging and tracebacks\n\n`dynray COMMAND --help` lists a command's flags.")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while args and args[0] in ("-v", "--verbose"):
        verbose = True
        args.pop(0)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    setup_logging(verbose)

    def dispatch() -> int:
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise UsageError("unknown command", got=name, fix=f"{'did you mean ' + close[0] + '? ' if close else ''}commands: {', '.join(COMMANDS)}")
        return COMMANDS[name].run(rest, f"dynray {name}")

    return guarded(dispatch, prog="dynray", verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
