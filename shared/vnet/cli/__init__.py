"""``vnetctl``: the command line."""
