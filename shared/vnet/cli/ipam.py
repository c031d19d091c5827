"""`vnetctl ipam ...` verbs."""
