"""`vnetctl policy ...` verbs."""
