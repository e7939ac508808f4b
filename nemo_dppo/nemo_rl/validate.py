"""`python -m nemo_dppo.nemo_rl.validate FILE... [-o KEY=VALUE ...]` (README): `recipes/validate.py`."""

from nemo_dppo.nemo_rl.recipes.validate import main

if __name__ == "__main__":
    raise SystemExit(main())
