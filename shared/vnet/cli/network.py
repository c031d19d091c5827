"""`vnetctl network ...` verbs."""
