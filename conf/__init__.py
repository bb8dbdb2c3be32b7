"""The Hydra config tree (conf/), shipped inside the wheel as the package `ltm_conf`."""
