"""cortexlens offline science: data, decoder, SAE, training, interpretation, export, bundles.

Never imports ray, grpc or the service package.
"""
