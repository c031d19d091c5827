"""Configuration and the one service pattern every VNet service runs on."""
