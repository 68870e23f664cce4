"""Progressive delivery: canary a registered model version, analyse it, promote or roll back."""
