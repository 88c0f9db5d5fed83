"""Deployment of cortexlens: container images, KubeRay manifests, monitoring (see
``docs/operations.md``). ``python -m deploy.render`` renders the manifests from the Serve config."""
