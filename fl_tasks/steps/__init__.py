"""One module per round step; each exposes ``run(env: StepEnv)``."""
