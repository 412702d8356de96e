"""`flagstaff-job`: run one linear-algebra job (conf/job/<name>.yaml) and write its run directory.

flagstaff-job job=lstsq                    # local Ray, one block host per CPU
flagstaff-job job=rsvd backend=local       # same code in-process, no Ray
flagstaff-job job=lstsq cluster.address=auto
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flagstaff.jobs.config import register_configs

register_configs()


@hydra.main(config_path="pkg://flagstaff.conf", config_name="job", version_base="1.3")
def app(cfg: DictConfig) -> float:
    """Setup (Ray, blocks), run the job, write results.json and the plot, clean up."""
    from flagstaff.system.config import ConfigError
    from flagstaff.system.strict import check_config

    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    try:
        check_config(cfg, dict(hc.runtime.choices), hc.overrides.task, "job")  # before imports
        from flagstaff.jobs.runner import run

        results = run(cfg, out_dir)
    except ConfigError as err:  # e.g. cluster.address without a Ray token: one line, no work
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return float(results.get("objective", results["time_s"]))


def main() -> None:
    """``flagstaff-job``: the command line checked first (system/strict.py: an unknown key is one
    line and exit code 2, before Hydra starts the job), then the Hydra app."""
    from flagstaff.system.strict import preflight

    preflight(sys.argv[1:], "flagstaff.conf", "job")
    app()


if __name__ == "__main__":
    main()
