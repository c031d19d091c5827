"""The services: thin I/O shells around vnet.core, each a vnet.runtime.service.ServiceDef."""
