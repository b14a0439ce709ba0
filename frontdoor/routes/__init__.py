"""The front door's routes, one module per API family; ``frontdoor.app`` mounts them all."""
