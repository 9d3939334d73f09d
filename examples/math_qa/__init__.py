"""The math_qa demo: arithmetic word problems answered by ``dspy.ChainOfThought``."""
