"""How a model's requests pick among its replicas (Ray Serve request routers)."""
