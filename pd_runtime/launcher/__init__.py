"""Launch a deployment: plan the parts (topology) and run them (a launch backend)."""
