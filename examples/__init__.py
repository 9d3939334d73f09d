"""Example programs for dmipro: ``math_qa`` (the demo) and ``multistage``."""
