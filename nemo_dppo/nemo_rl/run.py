"""`python -m nemo_dppo.nemo_rl.run CONFIG [KEY=VALUE ...]` (slurm scripts, recipes, README): `launch/run.py`."""

from nemo_dppo.nemo_rl.launch.run import main

if __name__ == "__main__":
    raise SystemExit(main())
