"""The public wire contract: subjects, request/reply types, events, codec, headers."""
