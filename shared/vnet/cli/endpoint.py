"""`vnetctl endpoint ...` verbs."""
