"""A two-stage example: plan the arithmetic, then solve with the plan."""
