"""What is applied to a plain model from outside: process groups, precision, the DeepSpeed engine, compile."""
