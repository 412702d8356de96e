"""flagstaff-train: the Hydra app for federated / distributed training (conf/train.yaml).

A short recipe (STYLE.md point 8): compose and validate the config, (start Ray,) train, print the run
directory.
Returns the final test accuracy so Hydra sweepers can optimize it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from flagstaff.system.config import ConfigError, mode_of, register

register()
log = logging.getLogger("flagstaff")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train on a composed config as flagstaff-train does. With ``backend=ray`` (not the
    peer-to-peer mode), Ray starts on this thread while torch and the training code import in
    another (each takes seconds); Ray is shut down at the end if this call started it."""
    t0 = time.perf_counter()
    started = False
    if cfg.get("backend") == "ray" and mode_of(cfg) != "p2p":
        from flagstaff.system.ray_start import import_ray, importing_in_background, init_ray

        cl = OmegaConf.to_container(cfg.cluster, resolve=True)
        # ray first, on this thread, then Ray's processes; the imports run while the raylet
        # waits for its agents and the workers start (each import holds the GIL: import_ray)
        import_ray(cl)
        launched = threading.Event()
        with importing_in_background(*_modules_to_warm(cfg), after=launched):
            started = init_ray(cl, on_launch=launched.set)
    try:
        from flagstaff.system.runner import train

        return train(cfg, started_at=t0)
    finally:
        if started:
            import ray

            ray.shutdown()


def _modules_to_warm(cfg: DictConfig) -> list[str]:
    """What train() imports first: the training code (torch) and the dataset's loader (scikit-learn
    takes about a second; mnist1d brings matplotlib)."""
    mods = ["flagstaff.system.runner", "sklearn.model_selection", "sklearn.datasets"]
    if cfg.get("data", {}).get("name") == "mnist1d":
        mods.append("mnist1d.data")
    return mods


def check(cfg: DictConfig) -> None:
    """The job's keys, missing values and plain values (system/strict.py, system/config.py),
    before anything heavy is imported; raises ConfigError naming the key and the fix."""
    from hydra.core.hydra_config import HydraConfig

    from flagstaff.system.config import check_values
    from flagstaff.system.strict import check_config

    hc = HydraConfig.get()
    check_config(cfg, dict(hc.runtime.choices), hc.overrides.task, "train", check_values)


def quiet(verbose: bool) -> None:
    """Python warnings become log records (logger ``py.warnings``), which conf/train.yaml sends to
    the run's train.log only, as it does INFO lines; ``verbose=true`` puts both on the console
    too. The progress bar, the final line and one-line errors are printed, not logged."""
    logging.captureWarnings(True)
    if not verbose:
        return
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # Hydra's console handler (not the file one)
            handler.setLevel(logging.NOTSET)
    warn = logging.getLogger("py.warnings")
    warn.handlers.clear()  # the root's console and file handlers take them
    warn.propagate = True


@hydra.main(config_path="pkg://flagstaff.conf", config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    from flagstaff.system.rundir import NoSpaceError, RunDirError

    try:
        check(cfg)
        quiet(bool(cfg.get("verbose")))
        result = run(cfg)
    except (ConfigError, RunDirError) as err:
        # a bad input, a checkpoint that does not fit, a run directory in use: refused before
        # any work (exit 2); a disk that filled up mid-run (exit 1). One line, no traceback.
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1 if isinstance(err, NoSpaceError) else 2) from None
    except RuntimeError as err:  # a run that stopped itself (system/loop.py RunStopped): exit 1
        from flagstaff.system.runner import RunStopped

        if not isinstance(err, RunStopped):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    acc = result["accuracy"]
    ran = result.get("rounds_completed", result["rounds"])  # fewer after a budget stop
    stopped = f" stopped={result['stopped']!r}" if result.get("stopped") else ""
    print(
        f"done: accuracy={acc if acc is None else round(acc, 4)} "
        f"rounds={ran}/{result['rounds']}{stopped} run_dir={result['run_dir']}"
    )
    return acc


def main() -> None:
    from flagstaff.system.config import check_values
    from flagstaff.system.strict import preflight

    preflight(sys.argv[1:], "flagstaff.conf", "train", check_values)  # a bad key: one line, exit 2
    app()


if __name__ == "__main__":
    main()
